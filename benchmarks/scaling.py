"""How the Perfusion hooks' cost and the concepts folder scale (issue 15), as markdown tables.

Hooks. They edit the cross-attention projections to_k / to_v, which read the text context and never the
latent, so their whole cost per U-Net forward arises in those calls. Measured there: the 32 to_k / to_v calls
of one SD1.5-shaped forward (its 16 attn2 layers, their own weights; context [batch, rows, 768] holding each
active concept's i* at a token row), hooked with n active concepts against the same calls with the hooks
attached and nothing active (bare). One round times every variant once, in an order rotated every round;
extra = median over rounds of (variant - bare of the same round); share = extra / one bare U-Net forward at
256 px and at 512 px (32x32 and 64x64 latents, batch 2, measured in the same run). Each activation's first
call (which projects W i* once per generation) is untimed, as in a host.

Concepts folder. N copies of an SD1 concept file (~35 KB); the cards page's first build (scan, then each
card's header-only read) against reading every file in full (what it did before), the page rebuilt
(cached), and per generation an unknown tag's lookup (a folder stat, no rescan) and a known concept's load.

Timing: thread CPU time of this thread at 1 intra-op thread (the dev VM's second thread only adds noise).
Run: ./dev.sh bench scaling [--rounds 9] [--quick]  (~6 min; --quick skips the 512 px forward and N = 1,000)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from concepts import layer_widths, make_concept, random_covariance  # noqa: E402
from models import sd15_unet  # noqa: E402

import perfusion  # noqa: E402
from perfusion.concept import load_concept, save_concept  # noqa: E402
from perfusion.webui.library import Library  # noqa: E402

REPEAT = 5  # forwards' worth of projections per timing


def log(msg: str) -> None:
    print(f"[scaling] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def rotated(variants: dict, rounds: int, prepare: dict | None = None) -> dict[str, list[float]]:
    """{name: [thread CPU seconds per round]}: each variant once per round, the order rotated every round;
    prepare[name]() runs untimed before each timed call of that variant."""
    names, times, prepare = list(variants), {n: [] for n in variants}, prepare or {}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            prepare.get(name, lambda: None)()
            times[name].append(cpu_seconds(variants[name]))
    return times


def per_call(fn, calls: int, rounds: int) -> float:
    """Median over rounds of the thread CPU seconds per call of fn, called `calls` times a round."""
    return statistics.median(cpu_seconds(lambda: [fn() for _ in range(calls)]) / calls for _ in range(rounds))


def extra_ms(times: dict[str, list[float]], name: str) -> float:
    return 1e3 * statistics.median(v - b for v, b in zip(times[name], times["bare"]))


class Projections:
    """The to_k / to_v calls of one forward of `unet`, with the hooks' activation chosen per variant."""

    def __init__(self, unet, concepts):
        self.unet, self.concepts = unet, concepts
        self.layers = perfusion.find_cross_attention(unet)
        self.hooks = perfusion.attach(unet)

    def variant(self, n: int, projection: str, batch: int, rows: int):
        """(prepare, run): prepare activates the variant's concepts and makes the first calls (which project
        W i* once per generation in a host: untimed); run is the calls of one forward."""
        ctx = torch.randn(batch, rows, 768, generator=torch.Generator().manual_seed(rows))
        for k, c in enumerate(self.concepts[:n]):
            ctx[:, 1 + k % (rows - 2)] = c.i_star  # the concept's word in every prompt of the batch
        activations = perfusion.Activations([perfusion.Activation(c) for c in self.concepts[:n]], projection)

        def forward():
            for attn in self.layers.values():
                attn.to_k(ctx)
                attn.to_v(ctx)

        def run():  # REPEAT forwards' worth per timing: a difference of ~1 ms stands out of the timer's noise
            for _ in range(REPEAT):
                forward()

        def prepare():
            self.hooks.activate(activations)
            forward()

        return prepare, run

    def table(self, rows_of_variants: list[tuple[str, int, str, int, int]], rounds: int, forward_s: dict) -> list[str]:
        """One markdown row per (label, n, projection, batch, rows); each group of one (batch, rows) shares its bare."""
        out = []
        groups: dict[tuple[int, int], list] = {}
        for label, n, projection, batch, rows in rows_of_variants:
            groups.setdefault((batch, rows), []).append((label, n, projection))
        for (batch, rows), members in groups.items():
            pairs = {"bare": self.variant(0, "approximate", batch, rows)}
            pairs |= {label: self.variant(n, projection, batch, rows) for label, n, projection in members}
            times = rotated({k: run for k, (_, run) in pairs.items()}, rounds, {k: p for k, (p, _) in pairs.items()})
            bare_ms = 1e3 * statistics.median(times["bare"]) / REPEAT
            for label, _, _ in members:
                ms = extra_ms(times, label) / REPEAT
                shares = " | ".join(f"{100 * ms / 1e3 / s:.2f} %" for s in forward_s.values())
                out.append(f"| {label} | {batch} | {rows} | {bare_ms:.1f} | {ms:.2f} | {shares} |")
            log(f"batch {batch}, rows {rows}: {', '.join(m[0] for m in members)}")
        return out


def bench_hooks(rounds: int, quick: bool) -> list[str]:
    torch.set_grad_enabled(False)
    unet = sd15_unet(seed=0).requires_grad_(False)
    cov = random_covariance(768)
    concepts = [make_concept(layer_widths(unet), 768, cov, seed=k, token=f"tok{k}") for k in range(32)]
    forward_s = {}
    for px in (256,) if quick else (256, 512):
        x = torch.randn(2, 4, px // 8, px // 8)
        ctx = torch.randn(2, 77, 768)
        log(f"bare U-Net forward at {px} px...")
        forward_s[px] = cpu_seconds(lambda: unet(x, torch.tensor([500, 500]), context=ctx))  # noqa: B023
    proj = Projections(unet, concepts)
    variants = [(f"{n} concept{'s' * (n > 1)}, {p}", n, p, 2, 77) for p in ("approximate", "exact") for n in (1, 2, 4, 8, 16, 32)]  # fmt: skip
    variants += [(f"{n} concept{'s' * (n > 1)}, approximate", n, "approximate", 2, rows) for rows in (154, 231) for n in (1, 4)]  # fmt: skip
    variants += [(f"{n} concept{'s' * (n > 1)}, approximate", n, "approximate", b, 77) for b in (1, 4, 8) for n in (1, 4)]  # fmt: skip
    head = " | ".join(f"share of a {px} px forward ({s:.2f} s)" for px, s in forward_s.items())
    lines = [
        f"| concepts, projection | batch | context rows | bare to_k/to_v calls, ms | extra, ms | {head} |",
        "|---|---|---|---|---|" + "---|" * len(forward_s),
    ]
    return lines + proj.table(variants, rounds, forward_s)


def bench_folder(rounds: int, quick: bool) -> list[str]:
    unet_layers = {f"layer{k}.attn2": w for k, w in enumerate([320] * 5 + [640] * 5 + [1280] * 6)}
    source = make_concept(unet_layers, 768, random_covariance(768), seed=0, token="hugsy")
    lines = [
        "| concept files | cards, first build: headers, ms | reading every file in full, ms | ratio | cards rebuilt, ms "
        "| unknown tag, us | known tag's load (cached), us |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in (10, 100) if quick else (10, 100, 1000):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            first = save_concept(source, folder / "c0000.safetensors")
            for k in range(1, n):
                shutil.copyfile(first, folder / f"c{k:04d}.safetensors")

            def cards_first(folder=folder):  # a fresh process's page: scan, then every card's header
                lib = Library([folder])
                for entry in lib.entries.values():
                    lib.peek(entry)

            def full_reads(folder=folder):
                lib = Library([folder])
                for entry in lib.entries.values():
                    load_concept(entry.path)

            times = rotated({"headers": cards_first, "full": full_reads}, rounds)
            lib = Library([folder])
            cards_first()
            rebuilt = per_call(lambda lib=lib: [lib.peek(e) for e in lib.entries.values()], 1, rounds)
            lib.load(lib.find("c0000"))
            unknown = per_call(lambda lib=lib: lib.find("nobody"), 100, rounds)
            known = per_call(lambda lib=lib: lib.load(lib.find("c0000")), 100, rounds)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            ratio = statistics.median(h / f for h, f in zip(times["headers"], times["full"]))
            lines.append(
                f"| {n:,} | {med['headers']:.1f} | {med['full']:.1f} | {ratio:.3f} | "
                f"{1e3 * rebuilt:.1f} | {1e6 * unknown:.1f} | {1e6 * known:.1f} |"
            )
            log(f"folder of {n}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="no 512 px forward, no 1,000-file folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    folder = bench_folder(args.rounds, args.quick)
    hooks = bench_hooks(args.rounds, args.quick)
    print(f"torch {torch.__version__}, CPU, 1 thread, thread CPU time, {args.rounds} rotated rounds, medians\n")
    print("Hooks: SD1.5-shaped U-Net's 32 to_k/to_v calls per forward\n")
    print("\n".join(hooks))
    print("\nConcepts folder\n")
    print("\n".join(folder))
    log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
