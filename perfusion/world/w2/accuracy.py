"""How well a world-2 mini model follows captions: held-out captions generated, read back, compared.

    ./dev.sh python -m perfusion.world.w2.accuracy [--weights FILE] [--scenes 160] [--steps 25] [--misses]

One-object scenes: shape, colour (the caption's), pattern, size, position, background, and every one at once.
Two- and three-object scenes: each object fully right (shape, colour, pattern), all at once. The accent
colour is never asked for, so it is not scored.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from ...generate import generate
from .. import model as mini
from ..scenes import from_tensor
from .analyze import Reading, read, read_places
from .scenes import SIZE, Thing, caption, random_scene

HELD_OUT_SEED = 10**12  # the model trainer draws batch seeds below 10**10
LATENT_SHAPE = (3, SIZE, SIZE)
WEIGHTS = mini.WEIGHTS.with_name("mini2.safetensors")


def asked(reading: Reading, thing: Thing) -> dict[str, bool]:
    """Per attribute the caption asks for: is it there."""
    return {
        "shape": reading.shape == thing.shape,
        "colour": reading.shows_colour(thing.colour),
        "pattern": reading.pattern == thing.pattern,
    }


def accuracy(adapter, n: int = 160, steps: int = 25, guidance: float = 2.0, batch: int = 40, seed: int = 3) -> dict:
    """{'accuracy': {attribute: fraction}, 'counts', 'images', 'captions', 'misses'} over n held-out scenes; misses:
    (scene index, the scene its caption asked for, what was read, the attributes read wrong) per one-object scene
    with an attribute wrong."""
    rng = random.Random(HELD_OUT_SEED)
    scenes = [random_scene(rng) for _ in range(n)]
    text_rng = random.Random(HELD_OUT_SEED + 1)
    captions = [caption(s, text_rng) for s in scenes]
    images = np.concatenate(
        [
            from_tensor(
                generate(
                    adapter,
                    captions[k : k + batch],
                    latent_shape=LATENT_SHAPE,
                    seed=seed + k,
                    steps=steps,
                    guidance=guidance,
                )
            )
            for k in range(0, n, batch)
        ]
    )
    right, misses = defaultdict(list), []
    for index, (scene, img) in enumerate(zip(scenes, images)):
        if len(scene.things) == 1:
            r, t = read(img), scene.things[0]
            checks = {**asked(r, t), "size": r.size == t.size, "position": r.position == t.position}
            checks["background"] = r.background == scene.background
            wrong = [k for k, v in checks.items() if not v]
            checks["every attribute (one object)"] = not wrong
            if wrong:
                misses.append((index, scene, r, wrong))
        else:
            readings = read_places(img, tuple(t.position for t in scene.things))
            per = [all(asked(r, t).values()) for r, t in zip(readings, scene.things)]
            n = "two" if len(per) == 2 else "three"
            right[f"{n} objects: each fully right"] += per
            checks = {
                f"{n} objects: all fully right": all(per),
                "background": readings[0].background == scene.background,
            }
        for k, v in checks.items():
            right[k].append(v)
    return {
        "accuracy": {k: float(np.mean(v)) for k, v in right.items()},
        "counts": {k: len(v) for k, v in right.items()},
        "images": images,
        "captions": captions,
        "misses": misses,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Caption-following accuracy of a world-2 mini model.")
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--scenes", type=int, default=160)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--grid", type=Path, help="also write the first 40 samples as a PNG grid")
    p.add_argument("--misses", action="store_true", help="also list each one-object scene read wrong")
    a = p.parse_args(argv)
    result = accuracy(mini.load(a.weights), a.scenes, a.steps, a.guidance)
    for k, v in result["accuracy"].items():
        print(f"{k:32s} {v:6.1%}  (n={result['counts'][k]})")
    if a.misses:
        for index, scene, reading, wrong in result["misses"]:
            asked_for = {**vars(scene.things[0]), "background": scene.background}
            said = [f"{f} {asked_for[f]} -> {getattr(reading, f)}" for f in wrong]
            print(f"miss {index:4d}: {result['captions'][index]!r}: " + ", ".join(said))
    if a.grid:
        from PIL import Image

        tiles = result["images"][:40]
        rows = [np.concatenate(list(tiles[r * 8 : (r + 1) * 8]), 1) for r in range(len(tiles) // 8)]
        Image.fromarray(np.concatenate(rows, 0)).resize((8 * SIZE * 3, len(rows) * SIZE * 3), Image.NEAREST).save(
            a.grid
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
