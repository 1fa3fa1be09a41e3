"""Training-step cost of the Perfusion edit on an SD1.5-shaped ldm U-Net (random weights, CPU, fp32).

Measured side by side in one run (variants interleaved, medians):
  bare    forward + backward of the frozen U-Net w.r.t. its input x (1 image, 64x64 latents)
  edited  the same U-Net with one concept active at the train gate (beta 0.75, tau 0.10), forward +
          backward to the concept parameters (16 value targets and i*), U-Net frozen
and peak memory of one step of each, each in a fresh process (peak RSS above the RSS after the
model is built). Target: edited / bare <= 1.10. *checkpointed*: the edited step with gradient
checkpointing of the U-Net's blocks (the training tab's option): its memory and time against edited.

Run: ./dev.sh bench train_step [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from concepts import layer_widths, make_concept, random_covariance  # noqa: E402
from models import sd15_unet  # noqa: E402

import perfusion  # noqa: E402
from perfusion.checkpointing import checkpointed_blocks  # noqa: E402


def setup():
    torch.manual_seed(0)
    unet = sd15_unet().requires_grad_(False)
    concept = make_concept(layer_widths(unet), 768, random_covariance(768))
    for v in concept.values.values():
        v.requires_grad_(True)
    concept.i_star.requires_grad_(True)
    hooks = perfusion.attach(unet)
    x = torch.randn(1, 4, 64, 64)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, 768)
    ctx[0, 5] = concept.i_star.detach()
    return unet, hooks, concept, x, t, ctx


def bare_step(unet, hooks, concept, x, t, ctx):
    hooks.clear()
    x = x.clone().requires_grad_(True)
    unet(x, t, context=ctx).square().mean().backward()


def edited_step(unet, hooks, concept, x, t, ctx):
    hooks.activate([perfusion.Activation(concept, 0.75, 0.10)])
    unet(x, t, context=ctx).square().mean().backward()
    for v in concept.values.values():
        v.grad = None


def checkpointed_step(unet, hooks, concept, x, t, ctx):
    with checkpointed_blocks(unet):
        edited_step(unet, hooks, concept, x, t, ctx)


STEPS = {"bare": bare_step, "edited": edited_step, "checkpointed": checkpointed_step}


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(variant: str) -> None:
    """Print the peak RSS (KiB) one step adds above the resident model."""
    args = setup()
    before = _rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    STEPS[variant](*args)
    print(_rss_kb("VmHWM:") - before)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--memory-child", choices=list(STEPS))
    a = parser.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores", file=sys.stderr)
    args = setup()
    for fn in STEPS.values():  # warm-up
        fn(*args)
    times = {k: [] for k in STEPS}
    for r in range(a.repeats):
        for name, fn in STEPS.items():
            start = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - start)
        print(
            f"  round {r + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr
        )
    ratios = [e / b for e, b in zip(times["edited"], times["bare"])]
    mem = {
        k: int(
            subprocess.run(
                [sys.executable, __file__, "--memory-child", k], check=True, capture_output=True, text=True
            ).stdout.split()[-1]
        )
        for k in STEPS
    }
    saving = [c / e for c, e in zip(times["checkpointed"], times["edited"])]
    print("| measure | bare | edited | checkpointed | edited / bare | checkpointed / edited |")
    print("|---|---|---|---|---|---|")
    print(
        f"| step time, median of {a.repeats} (s) | "
        + " | ".join(f"{statistics.median(times[k]):.2f}" for k in STEPS)
        + f" | {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
        f"{statistics.median(saving):.3f} ({min(saving):.3f}-{max(saving):.3f}) |"
    )
    print(
        "| peak memory of one step above the model (MiB) | "
        + " | ".join(f"{mem[k] / 1024:.0f}" for k in STEPS)
        + f" | {mem['edited'] / mem['bare']:.3f} | {mem['checkpointed'] / mem['edited']:.3f} |"
    )


if __name__ == "__main__":
    main()
