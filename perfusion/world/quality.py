"""Quality benchmark on the mini model: identity fidelity against prompt alignment, per method.

    ./dev.sh python -m perfusion.world.quality [--images DIR --superclass WORD] [--quick]

For a folder of instance images (default: the bundled red checkered ball) it trains, 1-shot and
5-shot: Perfusion (local and global key-locking at inference), trained keys (no lock), textual
inversion only (embedding only), an ungated rank-1 edit, and Infusion. Each generates a fixed prompt
set over fixed seeds, swept over beta where the method has a gate; every image is read back by
transparent pixel analysis (perfusion.world.analyze):

- fidelity: the object carries the instance's pattern and colour (as read off its training images);
- alignment: the fraction of asked attributes met (background, position, size, and the second
  object's shape and colour where the prompt has one).

Also two-concept prompts (with the second bundled concept) and each method's overfitting report.
Writes results.json, a Markdown table, a Pareto plot and sample grids to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..adapter import concept_words
from ..concept import Concept
from ..dataset import load_dataset
from ..generate import generate
from ..hooks import Activation
from ..report import overfitting_report
from ..train import TrainConfig
from . import model as mini
from .analyze import Reading, read, read_pair
from .demo import TEMPLATES, train_folder, world_covariance
from .examples import CONCEPTS
from .scenes import from_tensor


@dataclass(frozen=True)
class Prompt:
    """A prompt with [name], what it asks of the concept's object, and an optional second object."""

    text: str
    asked: dict
    second: Optional[tuple[str, str]] = None  # (shape, colour)
    layout: str = ""  # "left-right" / "top-bottom"
    concept_first: bool = True


PROMPTS = (
    Prompt("a [name] at the left on a white background", dict(position="left", background="white")),
    Prompt("a small [name] at the top on a black background", dict(size="small", position="top", background="black")),
    Prompt("a big [name] in the centre on a brown background", dict(size="big", position="centre", background="brown")),
    Prompt("a [name] at the right on a gray background", dict(position="right", background="gray")),
    Prompt(
        "a small [name] at the bottom on a white background", dict(size="small", position="bottom", background="white")
    ),
    Prompt(
        "a small [name] at the left and a small green star at the right on a black background",
        dict(background="black"),
        ("star", "green"),
        "left-right",
    ),
    Prompt(
        "a small yellow cone at the top and a small [name] at the bottom on a gray background",
        dict(background="gray"),
        ("cone", "yellow"),
        "top-bottom",
        concept_first=False,
    ),
)
# two concepts in one prompt: (text, layout, is concept a the first object)
PAIR_PROMPTS = (
    ("a [a] at the left and a [b] at the right on a gray background", "left-right", True),
    ("a [b] at the left and a [a] at the right on a black background", "left-right", False),
    ("a [a] at the top and a [b] at the bottom on a white background", "top-bottom", True),
)


@dataclass(frozen=True)
class Method:
    """A way of learning and applying a concept, and the inference betas to sweep (None: no gate)."""

    name: str
    train: dict
    lock: str = "local"
    betas: tuple = (0.5, 0.6, 0.7, 0.8, 0.9)
    ungated: bool = False
    edit: bool = True


BASE = "base model (superclass word)"
METHODS = (
    Method("Perfusion (local lock)", {}),
    Method("Perfusion (global lock)", {}, lock="global", betas=(0.3, 0.4, 0.5, 0.6, 0.7)),
    Method("trained keys (no lock)", {"keys": "trained"}),
    Method("textual inversion only", {"edit": False}, betas=(None,), edit=False),
    Method("ungated rank-1 edit", {"gated": False}, betas=(None,), ungated=True),
    Method("Infusion", {"method": "infusion"}),
)


def identity_of(folder: Path) -> tuple[str, str]:
    """(pattern, colour) most often read off the instance's own images."""
    readings = [
        read(from_tensor(s.image[None])[0])
        for s in load_dataset(folder, resolution=32, min_size=16, mask_source="none").samples
    ]
    return (
        Counter(r.pattern for r in readings).most_common(1)[0][0],
        Counter(r.colour for r in readings).most_common(1)[0][0],
    )


def score(image: np.ndarray, prompt: Prompt, identity: tuple[str, str]) -> tuple[bool, float]:
    """(fidelity hit, alignment fraction) of one generated image."""
    other: Optional[Reading] = None
    if prompt.second is None:
        mine = read(image)
    else:
        first, last = read_pair(image, prompt.layout)
        mine, other = (first, last) if prompt.concept_first else (last, first)
    hits = [getattr(mine, k) == v for k, v in prompt.asked.items()]
    if other is not None:
        hits += [other.shape == prompt.second[0], other.colour == prompt.second[1]]
    return (mine.pattern, mine.colour) == identity, float(np.mean(hits))


def images_for(
    adapter, concept: Concept, method: Method, beta, prompts: list[str], seeds: int, steps: int
) -> np.ndarray:
    """uint8 [len(prompts) * seeds, 32, 32, 3]: every prompt repeated over `seeds` noise draws."""
    texts = [p for p in prompts for _ in range(seeds)]
    if method.edit:
        items = [
            Activation(
                concept,
                beta if beta is not None else concept.beta,
                concept.tau,
                lock=method.lock,
                ungated=method.ungated,
            )
        ]
        out = generate(adapter, texts, items, latent_shape=mini.LATENT_SHAPE, seed=7, steps=steps)
    else:  # textual inversion: the learned embedding in the prompt, no edit of the U-Net
        out = generate(
            adapter, texts, [], latent_shape=mini.LATENT_SHAPE, seed=7, steps=steps, words=concept_words([concept])
        )
    return from_tensor(out)


def evaluate(adapter, concept: Concept, method: Method, beta, identity, seeds: int, steps: int) -> dict:
    """Fidelity and alignment over PROMPTS x seeds at one beta, plus one sample per prompt."""
    word = concept.token
    images = images_for(adapter, concept, method, beta, [p.text.replace("[name]", word) for p in PROMPTS], seeds, steps)
    return {"beta": beta, **scores_of(images, identity, seeds)}


def scores_of(images: np.ndarray, identity, seeds: int) -> dict:
    """Mean fidelity and alignment of images made for PROMPTS x seeds (in that order), one sample per prompt."""
    scores = [score(img, p, identity) for img, p in zip(images, [p for p in PROMPTS for _ in range(seeds)])]
    return {
        "fidelity": float(np.mean([f for f, _ in scores])),
        "alignment": float(np.mean([a for _, a in scores])),
        "samples": images[::seeds],
    }


def evaluate_base(adapter, superclass: str, identity, seeds: int, steps: int) -> dict:
    """The base model with the superclass word in place of the concept: the alignment a concept should keep,
    and the fidelity the base model reaches by chance."""
    texts = [p.text.replace("[name]", superclass) for p in PROMPTS for _ in range(seeds)]
    images = from_tensor(generate(adapter, texts, [], latent_shape=mini.LATENT_SHAPE, seed=7, steps=steps))
    return {"method": BASE, "shots": 0, "beta": None, **scores_of(images, identity, seeds)}


def train_concept(
    adapter, cov, folder: Path, token: str, superclass: str, shots: int, method: Method, steps: int, out: Path
) -> Concept:
    infusion = method.train.get("method") == "infusion"
    cfg = TrainConfig(
        name=f"{token}-{shots}",
        token=superclass if infusion else token,
        superclass=superclass,
        steps=steps,
        batch_size=8,
        grad_accum=1,
        templates=TEMPLATES,
        seed=0,
        **method.train,
    )
    path = (
        out
        / "concepts"
        / f"{method.name.split()[0].lower()}-{'-'.join(f'{k}{v}' for k, v in method.train.items())}-{shots}shot.safetensors"
    )
    return train_folder(adapter, cov, folder, cfg, path, out / "work" / path.stem, shots=shots)


def evaluate_pair(
    adapter, a: Concept, b: Concept, ids: tuple, projection: str, beta: float, seeds: int, steps: int
) -> dict:
    """Both concepts in one prompt: how often each object carries its own identity and shape."""
    items = [Activation(a, beta, a.tau), Activation(b, beta, b.tau)]
    hits, both, samples = [], [], []
    for text, layout, a_first in PAIR_PROMPTS:
        prompt = text.replace("[a]", a.token).replace("[b]", b.token)
        images = from_tensor(
            generate(
                adapter,
                [prompt] * seeds,
                items,
                latent_shape=mini.LATENT_SHAPE,
                seed=11,
                steps=steps,
                projection=projection,
            )
        )
        samples.append(images[0])
        for img in images:
            first, last = read_pair(img, layout)
            ra, rb = (first, last) if a_first else (last, first)
            ok = [
                (r.pattern, r.colour, r.shape) == (*ident, c.superclass)
                for r, ident, c in ((ra, ids[0], a), (rb, ids[1], b))
            ]
            hits += ok
            both.append(all(ok))
    return {
        "projection": projection,
        "beta": beta,
        "object_fidelity": float(np.mean(hits)),
        "pair_fidelity": float(np.mean(both)),
        "samples": samples,
    }


def pareto_plot(rows: list[dict], path: Path, order: Optional[list[str]] = None) -> Path:
    """Fidelity (y) against alignment (x) per method and shots, lines through the beta sweep (methods in
    `order`, default this benchmark's, then any others)."""
    w, h, m = 640, 480, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.rectangle([m, 20, w - 20, h - m], outline="black")
    for k in range(6):
        v = k / 5
        d.text((m - 28, h - m - v * (h - m - 20) - 5), f"{v:.1f}", fill="black", font=font)
        d.text((m + v * (w - m - 20) - 8, h - m + 6), f"{v:.1f}", fill="black", font=font)
    d.text((w // 2 - 60, h - 25), "prompt alignment", fill="black", font=font)
    d.text((5, 5), "identity fidelity", fill="black", font=font)
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#000000"]
    xy = lambda a, f: (m + a * (w - m - 20), h - m - f * (h - m - 20))  # noqa: E731
    order = order or [BASE, *(mm.name for mm in METHODS)]
    names = sorted({r["method"] for r in rows}, key=lambda n: (order.index(n) if n in order else len(order), n))
    for k, name in enumerate(names):
        for shots, width in ((5, 3), (1, 1), (0, 1)):
            pts = [xy(r["alignment"], r["fidelity"]) for r in rows if r["method"] == name and r["shots"] == shots]
            if len(pts) > 1:
                d.line(pts, fill=colours[k], width=width)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[k])
        d.text((m + 10, 26 + 12 * k), name, fill=colours[k], font=font)
    d.text((m + 10, 26 + 12 * len(names)), "thick: 5-shot, thin: 1-shot", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def sample_grid(rows: list[tuple[str, np.ndarray]], path: Path, cell: int = 64) -> Path:
    """One labelled row of samples per entry."""
    font = ImageFont.load_default()
    width = 230 + max(len(s) for _, s in rows) * (cell + 2)
    img = Image.new("RGB", (width, len(rows) * (cell + 4) + 4), "white")
    d = ImageDraw.Draw(img)
    for k, (label, samples) in enumerate(rows):
        y = 2 + k * (cell + 4)
        d.text((4, y + cell // 2 - 5), label, fill="black", font=font)
        for j, s in enumerate(samples):
            img.paste(Image.fromarray(s).resize((cell, cell), Image.NEAREST), (230 + j * (cell + 2), y))
    img.save(path)
    return path


def markdown(results: list[dict], args) -> str:
    """The results as Markdown tables (the sweep, the overfitting reports, two concepts)."""
    images = args.images.resolve()
    shown = images.relative_to(Path.cwd()) if images.is_relative_to(Path.cwd()) else images
    lines = [
        f"Instance: `{shown}` (superclass '{args.superclass}'), {args.steps} training steps, "
        f"{len(PROMPTS)} prompts x {args.seeds} seeds, DDIM {args.sample_steps} steps, guidance 2.",
        "",
        "| method | shots | beta | identity fidelity | prompt alignment |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "fidelity" in r:
            beta = "-" if r["beta"] is None else r["beta"]
            lines.append(f"| {r['method']} | {r['shots']} | {beta} | {r['fidelity']:.2f} | {r['alignment']:.2f} |")
    lines += [
        "",
        "Overfitting report (5-shot, at beta 0.7 / tau 0.15; see overfitting-report.md):",
        "",
        "| method | drift MSE | drift relative | narrowness W2 | baseline W2 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "report" in r:
            rep = r["report"]
            lines.append(
                f"| {r['method']} | {rep['drift_mse']:.5f} | {rep['drift_relative']:.4f} | "
                f"{rep['narrowness_w2']:.2f} | {rep['baseline_w2']:.2f} |"
            )
    pairs = [r for r in results if r.get("method") == "two concepts"]
    if pairs:
        lines += [
            "",
            "Two concepts in one prompt (Perfusion local, 5-shot, beta 0.7):",
            "",
            "| projection | each object right | both objects right |",
            "|---|---|---|",
        ]
        lines += [f"| {r['projection']} | {r['object_fidelity']:.2f} | {r['pair_fidelity']:.2f} |" for r in pairs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Fidelity/alignment benchmark of personalization methods on the mini model."
    )
    p.add_argument("--images", type=Path, default=CONCEPTS[0].folder)
    p.add_argument("--superclass", default=CONCEPTS[0].superclass)
    p.add_argument("--token", default="chekka")
    p.add_argument("--steps", type=int, default=150, help="training steps per concept")
    p.add_argument("--seeds", type=int, default=4, help="noise draws per prompt")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("docs/quality"))
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, one beta per method")
    p.add_argument("--base-only", action="store_true", help="only the base model's reference row (no training)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.seeds, a.sample_steps = 3, 1, 3
    started = time.monotonic()
    adapter = mini.load()
    cov = world_covariance(adapter, Path("out/demo/cache"))
    identity = identity_of(a.images)
    print(f"instance: {a.images} reads as {identity[1]} {identity[0]}; superclass '{a.superclass}'")
    base = evaluate_base(adapter, a.superclass, identity, a.seeds, a.sample_steps)
    print(f"  {BASE}: fidelity {base['fidelity']:.2f} alignment {base['alignment']:.2f}", flush=True)
    if a.base_only:
        return 0
    results, grids = [{k: v for k, v in base.items() if k != "samples"}], [(BASE, base["samples"])]
    second = None
    for method in METHODS:
        for shots in (1, 5):
            concept = train_concept(adapter, cov, a.images, a.token, a.superclass, shots, method, a.steps, a.out)
            middle = method.betas[len(method.betas) // 2]
            betas = (middle,) if a.quick else method.betas
            for beta in betas:
                r = evaluate(adapter, concept, method, beta, identity, a.seeds, a.sample_steps)
                results.append(
                    {
                        "method": method.name,
                        "shots": shots,
                        "beta": beta,
                        "fidelity": r["fidelity"],
                        "alignment": r["alignment"],
                    }
                )
                print(
                    f"  {method.name:26s} {shots}-shot beta {beta}: fidelity {r['fidelity']:.2f} "
                    f"alignment {r['alignment']:.2f}  ({time.monotonic() - started:.0f}s)",
                    flush=True,
                )
                if shots == 5 and beta == middle:
                    grids.append((f"{method.name} b={beta}", r["samples"]))
            if shots == 5:
                rep = overfitting_report(
                    adapter,
                    concept,
                    mini.LATENT_SHAPE,
                    samples=4 if a.quick else 16,
                    steps=a.sample_steps,
                    lock=method.lock,
                )
                results.append({"method": method.name, "shots": 5, "report": rep.as_dict()})
                if method.name.startswith("Perfusion (local"):
                    second = concept
    if second is not None and a.images == CONCEPTS[0].folder:
        other = CONCEPTS[1]
        b = train_concept(adapter, cov, other.folder, other.token, other.superclass, 5, METHODS[0], a.steps, a.out)
        ids = (identity, identity_of(other.folder))
        for projection in ("approximate", "exact"):
            r = evaluate_pair(adapter, second, b, ids, projection, 0.7, a.seeds, a.sample_steps)
            results.append({k: v for k, v in r.items() if k != "samples"} | {"method": "two concepts"})
            grids.append((f"{a.token} + {other.token}, {projection}", r["samples"]))
            print(
                f"  two concepts ({projection}): each object right {r['object_fidelity']:.2f}, "
                f"both right {r['pair_fidelity']:.2f}",
                flush=True,
            )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    (a.out / "results.md").write_text(markdown(results, a))
    pareto_plot([r for r in results if "fidelity" in r], a.out / "pareto.png")
    sample_grid(grids, a.out / "samples.png")
    print(f"wrote {a.out}/results.json, results.md, pareto.png, samples.png in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
