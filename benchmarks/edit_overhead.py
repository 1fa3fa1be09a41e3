"""Edit overhead (issue 2): what the Perfusion hooks cost at inference, as ratios measured side by side.

1. U-Net: one forward of the SD1.5-shaped ldm U-Net (random weights, eval, no_grad, fp32, CPU, torch's
   default thread count; latent [2, 4, 64, 64], context [2, 77, 768] holding each active concept's i*
   at a token row) with the hooks detached ("unhooked"), attached with no concept active, with 1 and
   with 4 active concepts. Variants run round-robin (order rotated every round) after one warm-up
   forward; "end to end" is the median over rounds of (variant forward / unhooked forward of the same
   round). Timing hooks placed around ours also measure the time spent inside our to_k/to_v hooks in
   each forward; "hooks / forward" is that time over the same round's unhooked forward: the precise
   figure (a forward here varies by several % from run to run, far more than the hooks cost).
2. One projection: `to_v(e)` of a 320-, 640- and 1280-wide attn2 layer of that U-Net, e [2, 77, 768]:
   bare nn.Linear (same weight), ours (the hooked to_v, 1 concept) and perfusion-pytorch 0.1.23's
   `Rank1EditModule` (eval, 1 concept, same W, C, i*, o*, beta, tau), interleaved, medians of per-sample
   ratios; at 1 thread (compute) and at the default thread count. perfusion-pytorch is imported behind
   the open_clip stand-in in benchmarks/_open_clip_stub (its real open_clip needs torchvision).

Run: ./dev.sh bench edit_overhead [--rounds 3] [--samples 15]. Takes ~5-6 min on 2 cores; progress on stderr.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks" / "_open_clip_stub")]

import torch  # noqa: E402

import perfusion  # noqa: E402
from concepts import encodings, layer_widths, make_concept, random_covariance  # noqa: E402
from models import sd15_unet  # noqa: E402


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

    names = list(variants)
    log("warm-up forward...")
    forward("unhooked")
    times["unhooked"].clear()
    for r in range(rounds):
        for name in names[r % 4:] + names[:r % 4]:
            forward(name)
            log(f"round {r + 1}/{rounds} {name}: {times[name][-1]:.2f} s")

    base = times["unhooked"]
    lines = ["variant              | forward s: median (min-max) | end to end | inside our hooks ms | hooks / forward",
             "---------------------|-----------------------------|------------|--------------------|----------------"]
    for name in names:
        hooks_ms = share = "-"
        if inside[name]:
            hooks_ms = f"{1e3 * statistics.median(inside[name]):.1f}"
            share = f"{100 * median_ratio(inside[name], base):.3f} %"
        lines.append(f"{name:<20} | {statistics.median(times[name]):6.2f} ({min(times[name]):6.2f}-{max(times[name]):6.2f})"
                     f"       | {median_ratio(times[name], base):10.4f} | {hooks_ms:>18} | {share:>14}")
    return lines


def per_call(fn, e: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(e)
    return (time.perf_counter() - start) / calls


def layer_section(unet, cov, concept, samples: int, thread_counts: list[int]) -> list[str]:
    import perfusion_pytorch  # behind the open_clip stand-in (sys.path above)

    hooks = perfusion.attach(unet, perfusion.Activations([perfusion.Activation(concept)]))
    e = context_with([concept], seed=9)
    beta, tau = perfusion.Activation(concept).gate
    picks = {}
    for name, attn in perfusion.find_cross_attention(unet).items():
        picks.setdefault(attn.to_v.out_features, (name, attn.to_v))
    lines = ["threads | to_v width | bare Linear us | ours / bare | theirs / bare | theirs / ours | ours - bare us "
             "| theirs - bare us | max|ours - theirs| / max|out|",
             "--------|------------|----------------|-------------|---------------|---------------|----------------"
             "|------------------|------------------------------"]
    default_threads = torch.get_num_threads()
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
            calls = max(3, round(0.03 / per_call(theirs, e, 3)))  # ~30 ms per sample for the slowest
            t = {v: [] for v in variants}
            for s in range(samples):
                for v in list(variants)[s % 3:] + list(variants)[:s % 3]:
                    t[v].append(per_call(variants[v], e, calls))
            med = {v: 1e6 * statistics.median(t[v]) for v in variants}
            lines.append(f"{threads:>7} | {width:>10} | {med['bare']:14.0f} | {median_ratio(t['ours'], t['bare']):11.3f} | "
                         f"{median_ratio(t['theirs'], t['bare']):13.3f} | {median_ratio(t['theirs'], t['ours']):13.3f} | "
                         f"{med['ours'] - med['bare']:14.0f} | {med['theirs'] - med['bare']:16.0f} | {agree:.1e}")
            log(f"to_v {width} at {threads} thread(s): {calls} calls/sample x {samples} samples")
    torch.set_num_threads(default_threads)
    hooks.detach()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="U-Net rounds (4 forwards of ~20 s each per round)")
    ap.add_argument("--samples", type=int, default=15, help="interleaved samples per projection variant")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    log("building the SD1.5-shaped U-Net (random weights)...")
    unet = sd15_unet(seed=0)
    cov = random_covariance(768)
    concepts = [make_concept(layer_widths(unet), 768, cov, seed=k, token=f"tok{k}") for k in range(4)]
    unet_lines = unet_section(unet, concepts, args.rounds)
    layer_lines = layer_section(unet, cov, concepts[0], args.samples, sorted({1, threads}))
    print(f"Edit overhead: torch {torch.__version__}, CPU fp32, default {threads} threads; ratios are medians of "
          f"side-by-side ratios ({args.rounds} U-Net rounds, {args.samples} samples per projection)")
    print(f"\n1. SD1.5-shaped ldm U-Net forward at {threads} threads, latent [2, 4, 64, 64], context [2, 77, 768]")
    print("\n".join(unet_lines))
    print("\n2. One cross-attention value projection to_v(e), e [2, 77, 768], 1 concept (us: microseconds per call)")
    print("\n".join(layer_lines))
    log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
