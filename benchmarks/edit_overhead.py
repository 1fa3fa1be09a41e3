"""Edit overhead (issue 2): what the Perfusion hooks cost at inference, as ratios measured side by side.

1. U-Net: one forward of the SD1.5-shaped ldm U-Net (random weights, eval, no_grad, fp32, CPU;
   latent [2, 4, 64, 64], context [2, 77, 768] holding each active concept's i* at a token row)
   with the hooks detached ("unhooked"), attached with no concept active, with 1 and with 4 active
   concepts. Variants run round-robin (order rotated every round) after one warm-up forward; the
   ratio is the median over rounds of (variant / unhooked forward of the same round). Timing hooks
   placed around ours also measure the time spent inside our to_k/to_v hooks during each forward
   (a precise figure; the end-to-end ratio carries the machine's noise).
2. One projection: `to_v(e)` of a 320-, 640- and 1280-wide attn2 layer of that U-Net, e [2, 77, 768]:
   bare nn.Linear (same weight), ours (the hooked to_v, 1 concept) and perfusion-pytorch 0.1.23's
   `Rank1EditModule` (eval, 1 concept, same W, C, i*, o*, beta, tau), interleaved, medians of
   per-call means. perfusion-pytorch is imported behind benchmarks/_open_clip_stub (see there).

Run: ./dev.sh bench edit_overhead [--rounds 3] [--samples 15]. Progress goes to stderr.
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


def context_with(concepts, seed: int = 5) -> torch.Tensor:
    """[2, 77, 768] encodings; batch row 1 (the conditional half) holds concept k's i* at token 5 + k."""
    ctx = encodings(2 * 77, 768, seed).reshape(2, 77, 768)
    for k, c in enumerate(concepts):
        ctx[1, 5 + k] = c.i_star
    return ctx


class HookTimer:
    """Seconds spent inside our forward hooks on every attn2 to_k/to_v: a forward hook prepended
    before ours stamps the time, one appended after ours reads it. Nested calls (our to_k/to_v
    hooks call the projection again for W i*) count once, inside the outer call."""

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


def unet_section(rounds: int):
    log("building the SD1.5-shaped U-Net (random weights)...")
    unet = sd15_unet(seed=0)
    cov = random_covariance(768)
    widths = layer_widths(unet)
    concepts = [make_concept(widths, 768, cov, seed=k, token=f"tok{k}") for k in range(4)]
    x, t = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 500])
    ctx = context_with(concepts)
    variants = {"unhooked": None, "attached, no concept": [], "1 concept": concepts[:1], "4 concepts": concepts}
    times = {v: [] for v in variants}
    hook_s = {v: [] for v in variants}

    def forward(name: str) -> None:
        hooks, timer = None, None
        if variants[name] is not None:
            hooks = perfusion.attach(unet, perfusion.Activations([perfusion.Activation(c) for c in variants[name]]))
            timer = HookTimer(unet)
        start = time.perf_counter()
        unet(x, t, context=ctx)
        times[name].append(time.perf_counter() - start)
        if hooks is not None:
            timer.remove()
            hooks.detach()
            hook_s[name].append(timer.total)

    names = list(variants)
    with torch.no_grad():
        log("warm-up forward...")
        forward("unhooked")
        times["unhooked"].clear()
        for r in range(rounds):
            for name in names[r % 4:] + names[:r % 4]:
                forward(name)
                log(f"round {r + 1}/{rounds} {name}: {times[name][-1]:.2f} s")

    base = times["unhooked"]
    lines = ["variant                 | forward s (median) | ratio vs unhooked | inside our hooks, ms (% of forward)",
             "------------------------|--------------------|-------------------|------------------------------------"]
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(times[name], base))
        inside = "-"
        if hook_s[name]:
            ms = 1e3 * statistics.median(hook_s[name])
            inside = f"{ms:.2f} ({100 * ms / 1e3 / statistics.median(base):.3f} %)"
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        lines.append(f"{name:<23} | {statistics.median(times[name]):6.2f} ({spread:>11}) | "
                     f"{ratio:17.4f} | {inside}")
    return lines, unet, cov, concepts[0]


def per_call(fn, e: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(e)
    return (time.perf_counter() - start) / calls


def layer_section(unet, cov, concept, samples: int) -> list[str]:
    import perfusion_pytorch  # behind the open_clip stand-in (sys.path above)

    hooks = perfusion.attach(unet, perfusion.Activations([perfusion.Activation(concept)]))
    e = context_with([concept], seed=9)
    beta, tau = perfusion.Activation(concept).gate
    picks = {}
    for name, attn in perfusion.find_cross_attention(unet).items():
        picks.setdefault(attn.to_v.out_features, (name, attn.to_v))
    lines = ["to_v width | bare Linear us | ours us (x bare) | perfusion-pytorch us (x bare) | theirs / ours | "
             "ours - bare us | theirs - bare us | max |ours - theirs| / max |out|",
             "-----------|----------------|------------------|-------------------------------|---------------|"
             "----------------|------------------|-------------------------------"]
    with torch.no_grad():
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
            calls = max(5, round(0.05 / per_call(bare, e, 5)))  # ~50 ms per sample
            for fn in variants.values():
                per_call(fn, e, calls)  # warm-up
            t = {v: [] for v in variants}
            for s in range(samples):
                order = list(variants)[s % 3:] + list(variants)[:s % 3]
                for v in order:
                    t[v].append(per_call(variants[v], e, calls))
            med = {v: statistics.median(t[v]) for v in variants}
            rel = {v: statistics.median(a / b for a, b in zip(t[v], t["bare"])) for v in variants}
            vs = statistics.median(a / b for a, b in zip(t["theirs"], t["ours"]))
            lines.append(f"{width:>10} | {1e6 * med['bare']:14.0f} | {1e6 * med['ours']:6.0f} ({rel['ours']:6.3f}x) | "
                         f"{1e6 * med['theirs']:17.0f} ({rel['theirs']:6.3f}x) | {vs:12.3f}x | "
                         f"{1e6 * (med['ours'] - med['bare']):14.0f} | {1e6 * (med['theirs'] - med['bare']):16.0f} | "
                         f"{agree:.1e}")
            log(f"to_v {width}: {calls} calls/sample x {samples} samples done")
    hooks.detach()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="U-Net rounds (4 forwards of ~20 s each per round)")
    ap.add_argument("--samples", type=int, default=15, help="interleaved samples per projection variant")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    unet_lines, unet, cov, concept = unet_section(args.rounds)
    layer_lines = layer_section(unet, cov, concept, args.samples)
    print(f"Edit overhead: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, "
          f"ratios are medians of side-by-side per-round ratios ({args.rounds} U-Net rounds, "
          f"{args.samples} projection samples)")
    print("\n1. SD1.5-shaped ldm U-Net forward, latent [2, 4, 64, 64], context [2, 77, 768]")
    print("\n".join(unet_lines))
    print("\n2. One cross-attention value projection, e [2, 77, 768], 1 concept (us = microseconds per call)")
    print("\n".join(layer_lines))
    log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
