"""The bundled example concepts: novel instances (a checkered pattern the mini model never saw).

Each is a folder of 32x32 PNGs with companion object masks (`<stem>.mask.png`) and captions of
what is not the concept (`<stem>.txt`: where it is and on what background, for [filewords]), made by
`write_examples()` and committed, so the demo reads them exactly as a user's photo folder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import BACKGROUNDS, POSITIONS, Scene, Thing, owner_map, render

EXAMPLES = Path(__file__).with_name("examples")


@dataclass(frozen=True)
class Example:
    """A concept to learn: its word, superclass, and what the instance looks like."""

    token: str
    superclass: str
    colour: str
    pattern: str = "checkered"

    @property
    def folder(self) -> Path:
        return EXAMPLES / self.token


CONCEPTS = (Example("chekka", "ball", "red"), Example("boxy", "box", "blue"))


def example_scenes(example: Example, n: int = 5, seed: int = 0) -> list[Scene]:
    """n photos of the instance in varied places, sizes and backgrounds."""
    rng = random.Random(seed)
    return [
        Scene(
            (
                Thing(
                    example.superclass,
                    example.colour,
                    example.pattern,
                    rng.choice(("small", "big")),
                    rng.choice(list(POSITIONS)),
                ),
            ),
            rng.choice(list(BACKGROUNDS)),
            rng.randrange(2**31),
        )
        for _ in range(n)
    ]


def write_examples(n: int = 5) -> list[Path]:
    """(Re)write every example folder; returns the image paths."""
    paths = []
    for k, example in enumerate(CONCEPTS):
        example.folder.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(example_scenes(example, n, seed=k)):
            path = example.folder / f"{example.token}-{i}.png"
            Image.fromarray(render(scene)).save(path)
            Image.fromarray(np.where(owner_map(scene) >= 0, 255, 0).astype(np.uint8)).save(
                path.with_suffix(".mask.png")
            )
            thing = scene.things[0]
            where = "in the centre" if thing.position == "centre" else f"at the {thing.position}"
            path.with_suffix(".txt").write_text(f"{where} on a {scene.background} background\n")
            paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_examples():
        print(p)
