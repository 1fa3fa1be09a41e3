"""What the demo (w2/demo.py) and the quality benchmarks share: the training templates, the world's
covariance, training a concept from a world-sized folder, and a labelled contact sheet."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..concept import Concept
from ..covariance import Covariance, adapter_encoder, cached_covariance
from ..dataset import load_dataset
from ..train import TrainConfig, Trainer
from .scenes import scenes_and_captions

CELL = 96  # pixels per image on the sheet (48 px scaled 2x)
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
