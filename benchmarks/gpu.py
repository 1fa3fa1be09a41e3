"""The prepared accelerator benchmark (issue 15): one table of what Perfusion costs where users run it.

Rows (random weights, fp16 on CUDA, fp32 on CPU):
  hooks      U-Net forward with 1 / 4 / 16 active concepts against the bare forward of the same round
             (batch 2: cond + uncond), SD1.5-shaped at 512 px and an SDXL-shaped approximation at 1024 px
  train      one step, forward + backward, bare (gradients to the context only) against edited (gradients to
             the context and the concept's value targets: the same extent plus the edit), each with and
             without gradient checkpointing; peak memory on CUDA
  concept    a whole concept: the trainer's real step (text encoder, masks off, AdamW) for --train-steps at the
             tab's defaults (batch 1 x accumulation 4), extrapolated to 400 steps
  covariance the text-encoding covariance of a CLIP-L-shaped encoder over --prompts prompts
Timing: CUDA events on a GPU, thread CPU time on the CPU; variants interleaved and their order rotated every
round; medians of per-round ratios. --smoke: tiny shapes on the CPU (CI runs it; the numbers mean nothing).
The SDXL-shaped U-Net is ldm's UNetModel with SDXL's widths (320, 640, 1280), a 2048-wide context and six
transformer blocks at both attention levels (66 attn2 layers against SDXL's 70; no adm vector).

Run: benchmarks/gpu.sh [--smoke] [--rounds N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from concepts import layer_widths, make_concept, random_covariance  # noqa: E402
from models import sd15_unet, sdxl_shaped_unet, small_text_encoder, small_unet  # noqa: E402

import perfusion  # noqa: E402
from perfusion.adapter import LdmClipAdapter  # noqa: E402
from perfusion.checkpointing import checkpointed_blocks  # noqa: E402
from perfusion.clip_tokenizer import load_tokenizer  # noqa: E402
from perfusion.corpus import prompt_corpus  # noqa: E402
from perfusion.covariance import adapter_encoder  # noqa: E402
from perfusion.train import TrainConfig, Trainer  # noqa: E402


class Clock:
    """Elapsed seconds of fn(): CUDA events on a GPU, this thread's CPU time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.thread_time()
        fn()
        return time.thread_time() - t0


def rotated(variants: dict, rounds: int, clock: Clock, prepare: dict | None = None) -> dict[str, list[float]]:
    """{name: [seconds per round]}, the variants' order rotated every round (after one warm-up pass);
    prepare[name]() runs untimed before each timed call of that variant."""
    names, prepare = list(variants), prepare or {}
    for name in names:
        prepare.get(name, lambda: None)()
        variants[name]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            prepare.get(name, lambda: None)()
            times[name].append(clock(variants[name]))
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def concepts_for(unet, d: int, n: int) -> list[perfusion.Concept]:
    cov = random_covariance(d, seed=1)
    return [make_concept(layer_widths(unet), d, cov, seed=s, token=f"c{s}") for s in range(n)]


def bench_hooks(name, unet, latent, d, dtype, device, rounds, clock, rows, counts=(1, 4, 16)):
    unet = unet.to(device, dtype).requires_grad_(False)
    cs = concepts_for(unet, d, max(counts))
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    ctx = torch.randn(2, 77, d, device=device, dtype=dtype)
    for k, c in enumerate(cs[:16]):  # each concept's i* at a row of the cond half
        ctx[0, 1 + k] = c.i_star.to(device, dtype)
    hooks = perfusion.attach(unet)

    def forward():
        with torch.no_grad():
            unet(x, t, context=ctx)

    def concepts(n):  # once per generation in a host, so untimed; the forward's first call projects W i*
        def prepare():
            hooks.activate([perfusion.Activation(c) for c in cs[:n]])
            forward()

        return prepare

    names = ["bare", *(f"{n} concepts" for n in counts)]
    times = rotated({n: forward for n in names}, rounds, clock, dict(zip(names, map(concepts, (0, *counts)))))
    for n in counts:
        rows.append((f"hooks {name}", f"{n} concepts / bare forward", ratio(times, f"{n} concepts", "bare"),
                     f"bare {statistics.median(times['bare']) * 1000:.1f} ms"))  # fmt: skip
    hooks.detach()
    return unet.cpu()


def bench_train(name, unet, latent, d, dtype, device, rounds, clock, rows):
    unet = unet.to(device, dtype).requires_grad_(False)
    (c,) = concepts_for(unet, d, 1)
    values = {k: v.to(device, torch.float32).requires_grad_(True) for k, v in c.values.items()}
    c.values = values
    x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    base_ctx = torch.randn(1, 77, d, device=device, dtype=dtype)
    base_ctx[0, 5] = c.i_star.to(device, dtype)
    hooks = perfusion.attach(unet)

    def step(edited, checkpointed):
        def run():
            ctx = base_ctx.clone().requires_grad_(True)  # same extent: both reach every attn2 through the context
            hooks.activate([perfusion.Activation(c, 0.75, 0.10)] if edited else [])
            with checkpointed_blocks(unet) if checkpointed else torch.enable_grad():
                unet(x, t, context=ctx).float().square().mean().backward()
            for v in values.values():
                v.grad = None

        return run

    variants = {f"{e}{' ckpt' if k else ''}": step(e == "edited", k) for e in ("bare", "edited") for k in (False, True)}
    times = rotated(variants, rounds, clock)
    peak = {}
    if device.type == "cuda":
        for n, fn in variants.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            peak[n] = torch.cuda.max_memory_allocated() / 2**30
    note = lambda n: f"{statistics.median(times[n]):.3f} s" + (f", peak {peak[n]:.2f} GiB" if peak else "")  # noqa: E731
    rows.append((f"train {name}", "edited / bare step", ratio(times, "edited", "bare"), note("edited")))
    rows.append(
        (f"train {name}", "edited+ckpt / bare+ckpt", ratio(times, "edited ckpt", "bare ckpt"), note("edited ckpt"))
    )
    rows.append((f"train {name}", "bare+ckpt / bare", ratio(times, "bare ckpt", "bare"), note("bare")))
    hooks.detach()
    return unet.cpu()


def bench_adapter(unet, text, resolution, device) -> LdmClipAdapter:
    """The U-Net and text encoder as the trainer sees them; a space-to-depth mix (8x at 256 px and above, else 2x)
    stands in for the VAE's encoder."""
    down = 8 if resolution >= 256 else 2
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(4, 3 * down * down, generator=g).to(device) / down
    encode = lambda im: torch.einsum("oc,bchw->bohw", mix, torch.nn.functional.pixel_unshuffle(im, down))  # noqa: E731
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return LdmClipAdapter(unet.to(device).float(), text.to(device), load_tokenizer(), torch.cumprod(1 - betas, 0),
                          "eps", (encode, None), model_hash="bench")  # fmt: skip


def bench_concept(unet, text, resolution, steps, device, rows):
    """The trainer's real step at the tab's defaults, over `steps` steps, extrapolated to 400."""
    adapter = bench_adapter(unet, text, resolution, device)
    cov = perfusion.build_covariance(adapter_encoder(adapter), prompt_corpus(256, seed=5), batch_size=64)
    images = torch.rand(4, 3, resolution, resolution) * 2 - 1
    cfg = TrainConfig(name="bench", token="hugsy", superclass="teddy", steps=steps, batch_size=1, grad_accum=4)
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(adapter, cov, cfg, images, None, work, Path(work) / "bench.safetensors")
        t0 = time.perf_counter()
        trainer.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    rows.append(("concept", f"{steps} steps x 4 images at {resolution} px, wall", seconds / steps * 400,
                 f"s per 400 steps (measured {seconds:.1f} s; includes the latent cache)"))  # fmt: skip


def bench_covariance(text, prompts, device, rows):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    adapter = LdmClipAdapter(small_unet(text.config.hidden_size).to(device), text.to(device), load_tokenizer(),
                             torch.cumprod(1 - betas, 0))  # fmt: skip
    corpus = prompt_corpus(prompts, seed=1)
    t0 = time.perf_counter()
    perfusion.build_covariance(adapter_encoder(adapter), corpus, batch_size=128)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows.append(("covariance", f"{prompts} prompts, {text.config.num_hidden_layers}-layer {text.config.hidden_size}-wide", time.perf_counter() - t0, "s wall"))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    clock, rows = Clock(device), []
    rounds = args.rounds or (2 if args.smoke else 10)
    if device.type == "cpu":
        torch.set_num_threads(1)  # thread CPU time measures this thread only
    hardware = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU, 1 thread"
    if args.smoke:
        shapes = [("tiny 64 ctx", small_unet(64), 8, 64)]
        text = small_text_encoder(hidden=64, layers=2)
        resolution, steps, prompts = 32, args.train_steps or 2, args.prompts or 64
    else:
        shapes = [("SD1.5-shaped 512 px", sd15_unet(), 64, 768), ("SDXL-shaped 1024 px", sdxl_shaped_unet(), 128, 2048)]
        text = small_text_encoder(hidden=768, layers=12, heads=12)
        resolution, steps, prompts = 512, args.train_steps or 40, args.prompts or 25_000
    for name, unet, latent, d in shapes:
        unet = bench_hooks(name, unet, latent, d, dtype, device, rounds, clock, rows)
        bench_train(name, unet, latent, d, dtype, device, rounds, clock, rows)
    bench_concept(shapes[0][1], text, resolution, steps, device, rows)
    bench_covariance(text, prompts, device, rows)
    print(f"\n| {hardware} | measure | value | note |\n|---|---|---|---|")
    for what, measure, value, note in rows:
        print(f"| {what} | {measure} | {value:.4g} | {note} |")
    if args.out:
        args.out.write_text(json.dumps({"hardware": hardware, "smoke": args.smoke, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
