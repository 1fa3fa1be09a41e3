"""Edit overhead per projection (issue 2): our hooked to_v against a bare Linear and perfusion-pytorch's module.

`to_v(e)` of a 320-, 640- and 1280-wide attn2 layer of an SD1.5-shaped U-Net (random weights), e [2, 77, 768]:
bare nn.Linear (same weight), ours (the hooked to_v, 1 concept) and perfusion-pytorch 0.1.23's
`Rank1EditModule` (eval, 1 concept, same W, C, i*, o*, beta, tau), interleaved with the order rotated every
sample, thread CPU time, medians of per-sample ratios. perfusion-pytorch is imported behind the open_clip
stand-in in benchmarks/_open_clip_stub (its real open_clip needs torchvision). What the hooks add to a whole
U-Net forward, by concepts, projection, context rows and batch: benchmarks/scaling.py.

Threads: --threads (default 1). Thread CPU time counts the calling thread only, so with more intra-op threads
it misses the others' work: keep 1 for figures that compare.

Run: ./dev.sh bench edit_overhead [--samples 15] [--threads 1]. ~2 min on 2 cores; progress on stderr.
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


def per_call(fn, e: torch.Tensor, calls: int) -> float:
    """Thread CPU seconds per call of fn(e)."""
    start = time.thread_time()
    for _ in range(calls):
        fn(e)
    return (time.thread_time() - start) / calls


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
    ap.add_argument("--samples", type=int, default=15, help="interleaved samples per projection variant")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (thread CPU time counts one)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    log("building the SD1.5-shaped U-Net (random weights)...")
    unet = sd15_unet(seed=0)
    cov = random_covariance(768)
    concept = make_concept(layer_widths(unet), 768, cov, seed=0, token="tok0")
    lines = layer_section(unet, cov, concept, args.samples, [args.threads])
    print(
        f"Edit overhead per projection: torch {torch.__version__}, CPU fp32, {os.cpu_count()} cores, thread CPU "
        f"time; medians of side-by-side ratios over {args.samples} rotated samples"
    )
    print("\nto_v(e), e [2, 77, 768], 1 concept (us: microseconds per call)")
    print("\n".join(lines))
    log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
