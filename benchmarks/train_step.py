"""What a training step costs against the bare U-Net's (issue 3, redone for issue 15), side by side in one run.

SD1.5-shaped ldm U-Net (random weights, CPU fp32), one image of --latent x --latent latents, context
[1, 77, 768]. Variants, each once per round, their order rotated every round, timed in thread CPU time:
  bare          forward + backward of the frozen U-Net to its context (the gradient reaches every attn2's
                to_k/to_v input, as the edited step's does: the same extent)
  edited        the same with one concept active at the train gate (beta 0.75, tau 0.10): the backward also
                reaches the concept's 16 value targets
  checkpointed  edited under gradient checkpointing of the U-Net's blocks (the tab's option)
  trainer       the trainer's own optimiser step (perfusion.train.Trainer._step at batch 1 x accumulation 1):
                a template prompt through a 12-layer CLIP-L-shaped text encoder with the learned embedding,
                the i* EMA and gate, the masked loss, backward through the U-Net and the text encoder, AdamW
Ratios are medians of per-round ratios. Peak memory: bare, edited and checkpointed each in a fresh process
(peak RSS above the RSS after the model is built).

Run: ./dev.sh bench train_step [--rounds 3] [--latent 64] [--threads 1]   (~12 min at the defaults)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from concepts import layer_widths, make_concept, random_covariance  # noqa: E402
from gpu import bench_adapter  # noqa: E402
from models import sd15_unet, small_text_encoder  # noqa: E402

import perfusion  # noqa: E402
from perfusion.checkpointing import checkpointed_blocks  # noqa: E402
from perfusion.corpus import prompt_corpus  # noqa: E402
from perfusion.covariance import adapter_encoder  # noqa: E402
from perfusion.train import TrainConfig, Trainer, loss_scaler  # noqa: E402

UNET_VARIANTS = ("bare", "edited", "checkpointed")


def log(msg: str) -> None:
    print(f"[train_step] {msg}", file=sys.stderr, flush=True)


def unet_steps(latent: int):
    """{variant: step()} for the U-Net-only variants, sharing one U-Net and concept."""
    torch.manual_seed(0)
    unet = sd15_unet().requires_grad_(False)
    concept = make_concept(layer_widths(unet), 768, random_covariance(768))
    for v in concept.values.values():
        v.requires_grad_(True)
    hooks = perfusion.attach(unet)
    x, t = torch.randn(1, 4, latent, latent), torch.tensor([500])
    base = torch.randn(1, 77, 768)
    base[0, 5] = concept.i_star

    def step(edited: bool, checkpointed: bool):
        def run():
            context = base.clone().requires_grad_(True)  # the same extent in every variant
            hooks.activate([perfusion.Activation(concept, 0.75, 0.10)] if edited else [])
            with checkpointed_blocks(unet) if checkpointed else torch.enable_grad():
                unet(x, t, context=context).square().mean().backward()
            for v in concept.values.values():
                v.grad = None

        return run

    steps = {"bare": step(False, False), "edited": step(True, False), "checkpointed": step(True, True)}
    return unet, steps


def trainer_step(unet, latent: int):
    """The Trainer's optimiser step over the same U-Net, ready to call repeatedly."""
    resolution = latent * 8
    adapter = bench_adapter(unet, small_text_encoder(hidden=768, layers=12, heads=12), resolution, torch.device("cpu"))
    cov = perfusion.build_covariance(adapter_encoder(adapter), prompt_corpus(256, seed=5), batch_size=64)
    images = torch.rand(4, 3, resolution, resolution) * 2 - 1
    cfg = TrainConfig(name="bench", token="hugsy", superclass="teddy", steps=10**6, batch_size=1, grad_accum=1)
    work = tempfile.mkdtemp(prefix="train_step-")
    trainer = Trainer(adapter, cov, cfg, images, None, work, Path(work) / "bench.safetensors")
    state = trainer._init_state()
    state.trainable()
    opt = trainer._optimizer(state)
    hooks = perfusion.attach(unet, context_dim=adapter.context_dim)
    scaler = loss_scaler(unet)
    return lambda: trainer._step(state, opt, hooks, scaler, lambda: False)


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(variant: str, latent: int) -> None:
    """Print the peak RSS (KiB) one step adds above the resident model."""
    _, steps = unet_steps(latent)
    before = _rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    steps[variant]()
    print(_rss_kb("VmHWM:") - before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: a 512 px image)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-child", choices=UNET_VARIANTS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.memory_child:
        return memory_child(a.memory_child, a.latent)
    unet, steps = unet_steps(a.latent)
    steps["trainer"] = trainer_step(unet, a.latent)
    names = list(steps)
    for name in names:  # warm-up
        steps[name]()
    times = {n: [] for n in names}
    for r in range(a.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.thread_time()
            steps[name]()
            times[name].append(time.thread_time() - t0)
        log(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in times.items()))
    mem = {
        n: int(subprocess.run([sys.executable, __file__, "--memory-child", n, "--latent", str(a.latent),
                               "--threads", str(a.threads)], check=True, capture_output=True, text=True).stdout.split()[-1])
        for n in UNET_VARIANTS
    }  # fmt: skip

    def ratio(n: str, d: str) -> str:
        r = [x / y for x, y in zip(times[n], times[d])]
        return f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"

    print(f"torch {torch.__version__}, CPU fp32, {a.threads} thread(s), latent {a.latent}x{a.latent}, "
          f"{a.rounds} rotated rounds, thread CPU time\n")  # fmt: skip
    print("| variant | step, s (median) | / bare (median, range of rounds) | peak memory above the model, MiB |")
    print("|---|---|---|---|")
    for n in names:
        peak = f"{mem[n] / 1024:.0f}" if n in mem else "-"
        print(f"| {n} | {statistics.median(times[n]):.2f} | {ratio(n, 'bare')} | {peak} |")
    print(f"\ncheckpointed / edited: {ratio('checkpointed', 'edited')}; trainer / edited: {ratio('trainer', 'edited')}")


if __name__ == "__main__":
    main()
