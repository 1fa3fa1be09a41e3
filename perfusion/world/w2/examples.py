"""World-2 instance folders: photos of one instance as a user's folder would hold them.

Each folder has 48x48 PNGs, their object masks (`<stem>.mask.png`) and captions (`<stem>.txt`) that say
what is not the concept and place its word as the world's captions do: "a small [name] at the left on a white
background" (the size before the word, and small always named: a caption without it means big to the model).
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from .controls import INSTANCES
from .scenes import BACKGROUNDS, POSITIONS, Scene, Thing, owner_map, render

# the training prompts for these captions (the openers of the world's captions)
TEMPLATES = ("[filewords]", "a photo of [filewords]", "an image of [filewords]")

# token -> look: five instances of different shapes, patterns and colours, and duo (the demo's second: a
# two-tone like boxy, the pattern the mini model draws most reliably, in other colours and another shape)
EXAMPLES = dict(zip(("chekka", "boxy", "stripo", "starla", "ringo"), INSTANCES))
EXAMPLES["duo"] = Thing("ball", "red", "two-tone", accent="yellow")


def instance_scenes(look: Thing, n: int = 5, seed: int = 0) -> list[Scene]:
    """n photos of the instance: half of them small (the size pairs and triples use; the odd one out is small),
    every place and every background once before any repeats, in a shuffled order.

    Drawn by chance instead, a folder could hold one small photo in five, and a concept trained on it drew its
    small instance far less often (docs/world.md, eighth session)."""
    rng = random.Random(seed)
    sizes = (["small", "big"] * n)[:n]
    places, backgrounds = list(POSITIONS), list(BACKGROUNDS)
    for choices in (sizes, places, backgrounds):
        rng.shuffle(choices)
    return [
        Scene(
            (replace(look, size=size, position=places[i % len(places)]),),
            backgrounds[i % len(backgrounds)],
            rng.randrange(2**31),
        )
        for i, size in enumerate(sizes)
    ]


def write_folder(folder: Path, look: Thing, n: int = 5, seed: int = 0) -> list[Path]:
    """Write n photos of `look` (with masks and captions) into `folder`; returns the image paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(instance_scenes(look, n, seed)):
        path = folder / f"{folder.name}-{i}.png"
        Image.fromarray(render(scene)).save(path)
        Image.fromarray(np.where(owner_map(scene) >= 0, 255, 0).astype(np.uint8)).save(path.with_suffix(".mask.png"))
        thing = scene.things[0]
        where = "in the centre" if thing.position == "centre" else f"at the {thing.position}"
        path.with_suffix(".txt").write_text(f"a {thing.size} [name] {where} on a {scene.background} background\n")
        paths.append(path)
    return paths


def write_examples(root: Path, n: int = 5) -> dict[str, Path]:
    """Every example instance's folder under root: {token: folder}."""
    return {
        token: (write_folder(root / token, look, n, seed=k), root / token)[1]
        for k, (token, look) in enumerate(EXAMPLES.items())
    }
