"""Edit overhead (issue 2): what the Perfusion hooks cost at inference, as ratios measured side by side.

1. U-Net: one forward of the SD1.5-shaped ldm U-Net (random weights, eval, no_grad, fp32, CPU;
   latent [2, 4, 64, 64], context [2, 77, 768] holding each active concept's i* at a token row)
   unhooked, with 1 and with 4 active concepts, round-robin (order rotated every round) after a
   warm-up forward with the hooks attached but no concept active. "end to end" is the median over
   rounds of (variant forward / unhooked forward of the same round). Timing hooks around ours also
   measure the time spent inside our to_k/to_v hooks during each forward: "1 + hooks / forward"
   (hook time over the same round's unhooked forward) is the precise figure, since a forward here
   varies by a few % from run to run, more than the hooks cost.
2. One projection: `to_v(e)` of a 320-, 640- and 1280-wide attn2 layer of that U-Net, e [2, 77, 768]:
   bare nn.Linear (same weight), ours (the hooked to_v, 1 concept) and perfusion-pytorch 0.1.23's
   `Rank1EditModule` (eval, 1 concept, same W, C, i*, o*, beta, tau), interleaved, medians of
   per-sample ratios. perfusion-pytorch is imported behind the open_clip stand-in in
   benchmarks/_open_clip_stub (its real open_clip needs torchvision).

Threads: --threads (default 1) for part 1 and the first rows of part 2; part 2 repeats at torch's
default count. On the 2-core dev VM, an op that enters a 2-thread OpenMP region often waits ~4-8 ms
for the second thread, which swamps small ops (the edit's); 1 thread measures the compute.

Run: ./dev.sh bench edit_overhead [--rounds 2] [--samples 15] [--threads 1]. ~5 min on 2 cores;
progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from concepts import encodings, layer_widths, make_concept, random_covariance  # noqa: E402
from models import sd15_unet  # noqa: E402

import perfusion  # noqa: E402


def log(msg: str) -> None:
    print(f"[edit_overhead] {msg}", file=sys.stderr, flush=True)


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def context_with(concepts, seed: int = 5) -> torch.Tensor:
    """[2, 77, 768] encodings; batch row 1 (the conditional half) holds concept k's i* at token 5 + k."""
    ctx = encodings(2 * 77, 768, seed).reshape(2, 77, 768)
    for k, c in enumerate(concepts):
        ctx[1, 5 + k] = c.i_star
    return ctx


class HookTimer:
    """Seconds spent inside our forward hooks on every attn2 to_k/to_v: a forward hook prepended before
    ours stamps the time, one appended after ours reads it. Nested calls (our hooks call the projection
    again for W i*) count once, inside the outer call."""

    def __init__(self, unet):
        self.total, self._stack, self._handles = 0.0, [], []
        for attn in perfusion.find_cross_attention(unet).values():
            for proj in (attn.to_k, attn.to_v):
                self._handles.append(proj.register_forward_hook(self._start, prepend=True))
                self._handles.append(proj.register_forward_hook(self._stop))

    def _start(self, *_):
        self._stack.append(time.perf_counter())

    def _stop(self, *_):
        elapsed = time.perf_counter() - self._stack.pop()
        if not self._stack:
            self.total += elapsed

    def remove(self):
        for h in self._handles:
            h.remove()


def unet_section(unet, concepts, rounds: int) -> list[str]:
    x, t = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 500])
    ctx = context_with(concepts)
    variants = {"unhooked": None, "attached, no concept": [], "1 concept": concepts[:1], "4 concepts": concepts}
    times, inside = {v: [] for v in variants}, {v: [] for v in variants}

    def forward(name: str) -> None:
        hooks = timer = None
        if variants[name] is not None:
            hooks = perfusion.attach(unet, perfusion.Activations([perfusion.Activation(c) for c in variants[name]]))
            timer = HookTimer(unet)
        start = time.perf_counter()
        unet(x, t, context=ctx)
        times[name].append(time.perf_counter() - start)
        if hooks is not None:
            timer.remove()
            hooks.detach()
            inside[name].append(timer.total)

    # The warm-up forward is the no-concept one: its hooks only return None (far below what an
    # end-to-end timing here resolves), so only the time inside them is kept. This saves a forward
    # per round on a machine where one takes ~35 s.
    log("warm-up forward (hooks attached, no concept active)...")
    forward("attached, no concept")
    times["attached, no concept"].clear()
    timed = ["unhooked", "1 concept", "4 concepts"]
    for r in range(rounds):
        for name in timed[r % 3 :] + timed[: r % 3]:
            forward(name)
            log(f"round {r + 1}/{rounds} {name}: {times[name][-1]:.2f} s")

    base = times["unhooked"]
    lines = [
        "variant              | forward s: median (min-max) | end to end | inside our hooks ms | 1 + hooks / forward",
        "---------------------|-----------------------------|------------|--------------------|--------------------",
    ]
    for name in variants:
        forward_s = end_to_end = hooks_ms = implied = "-"
        if times[name]:
            forward_s = f"{statistics.median(times[name]):6.2f} ({min(times[name]):6.2f}-{max(times[name]):6.2f})"
            end_to_end = f"{median_ratio(times[name], base):.4f}"
        if inside[name]:
            hooks_ms = f"{1e3 * statistics.median(inside[name]):.2f}"
            shares = (
                [h / statistics.median(base) for h in inside[name]]
                if not times[name]
                else [h / b for h, b in zip(inside[name], base)]
            )
            implied = f"{1 + statistics.median(shares):.5f}"
        lines.append(f"{name:<20} | {forward_s:<27} | {end_to_end:>10} | {hooks_ms:>18} | {implied:>19}")
    return lines


def per_call(fn, e: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(e)
    return (time.perf_counter() - start) / calls


def layer_section(unet, cov, concept, samples: int, thread_counts: list[int]) -> list[str]:
    # perfusion-pytorch imports open_clip (whose real package needs torchvision): put the stand-in first,
    # only now, so that nothing earlier (e.g. perfusion.clip_tokenizer's find_spec) could see it.
    sys.path.insert(0, str(ROOT / "benchmarks" / "_open_clip_stub"))
    import perfusion_pytorch

    hooks = perfusion.attach(unet, perfusion.Activations([perfusion.Activation(concept)]))
    e = context_with([concept], seed=9)
    beta, tau = perfusion.Activation(concept).gate
    picks = {}
    for name, attn in perfusion.find_cross_attention(unet).items():
        picks.setdefault(attn.to_v.out_features, (name, attn.to_v))
    lines = [
        "threads | to_v width | bare Linear us | ours / bare | theirs / bare | theirs / ours | ours - bare us "
        "| theirs - bare us | max|ours - theirs| / max|out|",
        "--------|------------|----------------|-------------|---------------|---------------|----------------"
        "|------------------|------------------------------",
    ]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for width in sorted(picks):
            name, to_v = picks[width]
            bare = torch.nn.Linear(768, width, bias=False)
            bare.weight = to_v.weight  # the same Parameter: identical compute, no hooks
            theirs = perfusion_pytorch.Rank1EditModule(bare, C=cov.float(), eval_beta=beta, eval_temperature=tau)
            theirs.eval()
            theirs.initted.fill_(True)
            theirs.ema_concept_text_encs[0] = concept.i_star
            theirs.concept_outputs.data[0] = concept.values[name]
            variants = {"bare": bare, "ours": to_v, "theirs": theirs}
            ref = to_v(e)
            agree = ((ref - theirs(e)).abs().max() / ref.abs().max()).item()
            for fn in variants.values():
                per_call(fn, e, 3)  # warm-up
            calls = max(2, round(0.03 / per_call(theirs, e, 3)))  # ~30 ms per sample for the slowest
            t = {v: [] for v in variants}
            for s in range(samples):
                for v in list(variants)[s % 3 :] + list(variants)[: s % 3]:
                    t[v].append(per_call(variants[v], e, calls))
            med = {v: 1e6 * statistics.median(t[v]) for v in variants}
            lines.append(
                f"{threads:>7} | {width:>10} | {med['bare']:14.0f} | {median_ratio(t['ours'], t['bare']):11.3f} | "
                f"{median_ratio(t['theirs'], t['bare']):13.3f} | {median_ratio(t['theirs'], t['ours']):13.3f} | "
                f"{med['ours'] - med['bare']:14.0f} | {med['theirs'] - med['bare']:16.0f} | {agree:.1e}"
            )
            log(f"to_v {width} at {threads} thread(s): {calls} calls/sample x {samples} samples")
    hooks.detach()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="U-Net rounds (3 forwards of ~35 s each per round)")
    ap.add_argument("--samples", type=int, default=15, help="interleaved samples per projection variant")
    ap.add_argument(
        "--threads", type=int, default=1, help="intra-op threads for the U-Net and the main projection rows"
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    log("building the SD1.5-shaped U-Net (random weights)...")
    unet = sd15_unet(seed=0)
    cov = random_covariance(768)
    concepts = [make_concept(layer_widths(unet), 768, cov, seed=k, token=f"tok{k}") for k in range(4)]
    unet_lines = unet_section(unet, concepts, args.rounds)
    layer_lines = layer_section(
        unet, cov, concepts[0], args.samples, list(dict.fromkeys([args.threads, default_threads]))
    )
    print(
        f"Edit overhead: torch {torch.__version__}, CPU fp32, {os.cpu_count()} cores; ratios are medians of "
        f"side-by-side ratios ({args.rounds} U-Net rounds, {args.samples} samples per projection)"
    )
    print(
        f"\n1. SD1.5-shaped ldm U-Net forward at {args.threads} thread(s), latent [2, 4, 64, 64], context [2, 77, 768]"
    )
    print("\n".join(unet_lines))
    print("\n2. One cross-attention value projection to_v(e), e [2, 77, 768], 1 concept (us: microseconds per call)")
    print("\n".join(layer_lines))
    log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
