"""What regional composition costs per sampling step, against the same two concepts applied together (issue 12).

One classifier-free-guidance U-Net call of an SD1.5-shaped U-Net (random weights, 16 attn2 layers), batch 2: the
prompt's row and the negative prompt's, context [2, 77, 768]. Variants: bare (no concept), together (two
concepts in the one edit, the paper's), regional (the same two concepts through RegionalComposition's prediction
blend: the base pass over both rows, each concept's pass over the prompt's row, the attention maps and the blend)
and attention (its attention blend: one pass, each attn2 layer run again per concept on the prompt's row). One
round times every variant once, the order rotated every round; the ratios are medians over rounds of per-round
ratios. Expected from the passes alone: regional = (2 + 1 + 1) rows / 2 rows = 2x a bare call; attention = a bare
call plus two attn2 runs per layer on one row.

Timing: thread CPU time at 1 intra-op thread. Run: ./dev.sh bench regional [--rounds 5] [--size 32]
(~2 min on 2 cores at --size 32, the latent side of a 256 px image).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from concepts import encodings, layer_widths, make_concept, random_covariance  # noqa: E402
from models import sd15_unet  # noqa: E402

from perfusion.hooks import Activation, attach  # noqa: E402
from perfusion.regional import RegionalComposition, Twins  # noqa: E402


def log(msg: str) -> None:
    print(f"[regional] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="latent side (32: 256 px, 64: 512 px)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    unet = sd15_unet().requires_grad_(False)
    hooks = attach(unet)
    cov = random_covariance(768)
    items = [
        Activation(make_concept(layer_widths(unet), 768, cov, seed, token=word))
        for seed, word in ((0, "hugsy"), (1, "boxy"))
    ]
    prompt, negative = encodings(77, 768, 1), encodings(77, 768, 2)
    for k, item in enumerate(items):  # the concepts' words at rows 4 and 9: their gates open there
        prompt[4 + 5 * k] = item.concept.i_star
    context = torch.stack([prompt, negative])
    twins = Twins(encodings(77, 768, 3), (encodings(77, 768, 4), encodings(77, 768, 5)), (4, 9))
    x = torch.randn(2, 4, args.size, args.size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])

    def bare():
        hooks.clear()
        unet(x, t, context=context)

    def together():
        hooks.activate(items)
        unet(x, t, context=context)
        hooks.clear()

    def composed(blend: str):
        composition = RegionalComposition(hooks, items, model=unet, blend=blend)
        composition.add(prompt[None], [twins])
        try:
            unet(x, t, context=context)
        finally:
            composition.detach()

    variants = {
        "bare": bare,
        "together": together,
        "regional": lambda: composed("prediction"),
        "attention": lambda: composed("attention"),
    }
    with torch.no_grad():
        for fn in variants.values():  # warm-up (each activation's first call projects W i* once)
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.thread_time()
                variants[name]()
                times[name].append(time.thread_time() - start)
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(
        f"| latent {args.size}x{args.size}, batch 2 (prompt + negative) | thread CPU s (median) | / bare | / together |"
    )
    print("|---|---|---|---|")
    for name in names:
        print(
            f"| {name} | {statistics.median(times[name]):.2f} | {ratio(name, 'bare'):.2f} | "
            f"{ratio(name, 'together'):.2f} |"
        )


if __name__ == "__main__":
    main()
