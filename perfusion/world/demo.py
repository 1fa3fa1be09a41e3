"""The main job: learn the bundled novel instances with Perfusion on the mini model, then render a
labelled contact sheet (recontextualisation, beta sweep, local vs global locking, two concepts, and
the base model).

    ./dev.sh demo [--steps N] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..concept import Concept
from ..covariance import Covariance, adapter_encoder, cached_covariance
from ..dataset import load_dataset
from ..generate import generate
from ..hooks import Activation
from ..train import Progress, TrainConfig, Trainer
from . import model as mini
from .examples import CONCEPTS, Example
from .scenes import from_tensor, scenes_and_captions

CELL = 96  # pixels per image on the sheet (32 px upscaled 3x)
# [filewords]: each image's caption of what is not the concept ("at the left on a gray background")
TEMPLATES = ("a [name] [filewords]", "a photo of a [name] [filewords]", "an image of a [name] [filewords]")


def world_covariance(adapter, cache: Path, prompts: int = 4096, captions=scenes_and_captions) -> Covariance:
    """C of the mini text encoder over a world's captions (`captions(seed, n)` -> (scenes, texts); cached by
    model hash)."""
    texts = captions(12345, prompts)[1]
    return cached_covariance(cache, adapter_encoder(adapter), texts, encoder_hash=adapter.model_hash, batch_size=256)


def train_folder(
    adapter,
    cov: Covariance,
    folder: Path,
    cfg: TrainConfig,
    concept_path: Path,
    work_dir: Path,
    shots: Optional[int] = None,
    progress=None,
    resolution: int = 32,
) -> Concept:
    """Train `cfg` on the first `shots` images of a world-sized folder (masks and captions beside them)."""
    samples = load_dataset(folder, resolution=resolution, min_size=16, mask_source="auto").samples[:shots]
    trainer = Trainer(
        adapter,
        cov,
        cfg,
        torch.stack([s.image for s in samples]),
        [s.mask for s in samples],
        work_dir,
        concept_path,
        captions=[s.caption for s in samples],
    )
    return trainer.run(progress=progress).concept


def train_example(adapter, cov: Covariance, example: Example, steps: int, out: Path) -> Concept:
    cfg = TrainConfig(
        name=example.token,
        token=example.token,
        superclass=example.superclass,
        steps=steps,
        batch_size=8,
        grad_accum=1,
        templates=TEMPLATES,
        beta=0.7,
        tau=0.15,
        seed=0,
    )
    started = time.monotonic()

    def show(p: Progress):
        print(
            f"\r  {example.token}: step {p.step}/{p.total}  loss {p.smoothed:.4f}  {p.it_per_s:.1f} it/s  "
            f"eta {p.eta_s:4.0f}s",
            end="",
            flush=True,
        )

    path = out / f"{example.token}.safetensors"
    concept = train_folder(adapter, cov, example.folder, cfg, path, out / "work", progress=show)
    print(f"\r  {example.token}: {concept.steps} steps in {time.monotonic() - started:.0f}s -> {path}" + " " * 20)
    return concept


def _label(img: np.ndarray, text: str, font) -> Image.Image:
    tile = Image.new("RGB", (CELL, CELL + 24), (255, 255, 255))
    tile.paste(Image.fromarray(img).resize((CELL, CELL), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(tile)
    lines = textwrap.wrap(text, 18)[:2]
    for k, line in enumerate(lines):
        draw.text((2, CELL + 1 + 11 * k), line, fill=(0, 0, 0), font=font)
    return tile


def contact_sheet(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], path: Path) -> Path:
    """Write a sheet: one titled row per entry, each a list of (image uint8 [32,32,3], label)."""
    font = ImageFont.load_default()
    width = max(len(cells) for _, cells in rows) * (CELL + 4) + 8
    height = len(rows) * (CELL + 24 + 22) + 8
    sheet = Image.new("RGB", (width, height), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    y = 4
    for title, cells in rows:
        draw.text((6, y + 4), title, fill=(20, 20, 120), font=font)
        y += 20
        for k, (img, label) in enumerate(cells):
            sheet.paste(_label(img, label, font), (4 + k * (CELL + 4), y))
        y += CELL + 26
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def render_rows(adapter, concepts: dict, steps: int, seed: int = 1) -> list:
    """The sheet's rows: (title, [(image, label), ...])."""
    a, b = concepts["chekka"], concepts["boxy"]
    kw = dict(latent_shape=mini.LATENT_SHAPE, steps=steps, guidance=2.0)

    def images(prompts, items, **extra):
        return list(from_tensor(generate(adapter, prompts, items, seed=seed, **kw, **extra)))

    recontext = [
        "a chekka at the left on a white background",
        "a small chekka at the top on a black background",
        "a big chekka in the centre on a brown background",
        "a chekka at the right on a gray background",
        "a small chekka at the bottom on a white background",
        "a chekka and a small green star on a black background",
    ]
    rows = []
    rows.append(
        (
            "Training images (chekka: a red checkered ball, a pattern the model never saw)",
            [(np.asarray(Image.open(p).convert("RGB")), p.stem) for p in sorted(CONCEPTS[0].folder.glob("*-?.png"))],
        )
    )
    rows.append(
        (
            "Base model, superclass word (no concept)",
            list(
                zip(
                    images([p.replace("chekka", "ball") for p in recontext], []),
                    [p.replace("chekka", "ball") for p in recontext],
                )
            ),
        )
    )
    on = [Activation(a, 0.7, 0.15)]
    rows.append(("Perfusion, local key-locking, beta 0.7 tau 0.15", list(zip(images(recontext, on), recontext))))
    betas = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    sweep = "a chekka at the left on a white background"
    rows.append(
        (
            f"Beta sweep: '{sweep}' (low beta = stronger concept)",
            [(images([sweep], [Activation(a, beta, 0.15)])[0], f"beta {beta}") for beta in betas],
        )
    )
    three = recontext[:3]
    local = images(three, [Activation(a, 0.7, 0.15)])
    glob = images(three, [Activation(a, 0.5, 0.15, lock="global")])
    rows.append(
        (
            "Local (beta 0.7) vs global key-locking (beta 0.5)",
            [x for pair in zip(zip(local, ["local"] * 3), zip(glob, ["global"] * 3)) for x in pair],
        )
    )
    pair_prompts = [
        "a chekka at the left and a boxy at the right on a gray background",
        "a chekka at the top and a boxy at the bottom on a black background",
        "a boxy at the left and a chekka at the right on a white background",
    ]
    both = [Activation(a, 0.7, 0.15), Activation(b, 0.7, 0.15)]
    approx, exact = images(pair_prompts, both), images(pair_prompts, both, projection="exact")
    rows.append(
        (
            "Two concepts (chekka + boxy): approximate vs exact projection",
            [x for pair in zip(zip(approx, ["approx"] * 3), zip(exact, ["exact"] * 3)) for x in pair],
        )
    )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Perfusion on the embedded mini model: train and render a contact sheet.")
    p.add_argument("--steps", type=int, default=150, help="training steps per concept")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per image")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--quick", action="store_true", help="smoke run: 3 training steps, 3 sampling steps")
    a = p.parse_args(argv)
    steps, sample_steps = (3, 3) if a.quick else (a.steps, a.sample_steps)
    torch.manual_seed(0)
    random.seed(0)
    print(f"loading the mini model ({mini.WEIGHTS})")
    try:
        adapter = mini.load()
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    print("covariance of the mini text encoder (cached after the first run)")
    cov = world_covariance(adapter, a.out / "cache")
    concepts = {}
    for example in CONCEPTS:
        print(f"training '{example.token}' (superclass '{example.superclass}') from {example.folder}")
        concepts[example.token] = train_example(adapter, cov, example, steps, a.out)
    print("rendering the contact sheet")
    path = contact_sheet(render_rows(adapter, concepts, sample_steps), a.out / "contact-sheet.png")
    print(f"contact sheet: {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
