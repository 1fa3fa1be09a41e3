"""How well the mini model follows captions: generate held-out scenes' captions, read the images back.

    ./dev.sh python -m perfusion.world.accuracy [--scenes 120] [--steps 25] [--guidance 2]

Captions come from scenes drawn with seeds the model trainer never uses; each image is read by
perfusion.world.analyze and compared attribute by attribute with the scene it was asked for.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict

import numpy as np

from ..generate import generate
from . import model as mini
from .analyze import read, read_pair
from .scenes import PATTERNS, caption, from_tensor, random_scene

HELD_OUT_SEED = 10**12  # the model trainer draws batch seeds below 10**10


def held_out(n: int, two_objects: float = 0.25) -> list:
    rng = random.Random(HELD_OUT_SEED)
    return [random_scene(rng, PATTERNS, two_objects) for _ in range(n)]


def accuracy(adapter, n: int = 120, steps: int = 25, guidance: float = 2.0, batch: int = 40, seed: int = 3) -> dict:
    """Per-attribute accuracy {attribute: fraction} over n held-out scenes, plus 'all' (every attribute of
    a single-object scene right) and the sample images."""
    scenes = held_out(n)
    rng = random.Random(HELD_OUT_SEED + 1)
    captions = [caption(s, rng) for s in scenes]
    images = np.concatenate(
        [
            from_tensor(
                generate(
                    adapter,
                    captions[k : k + batch],
                    latent_shape=mini.LATENT_SHAPE,
                    seed=seed + k,
                    steps=steps,
                    guidance=guidance,
                )
            )
            for k in range(0, n, batch)
        ]
    )
    right = defaultdict(list)
    for scene, img in zip(scenes, images):
        if len(scene.things) == 1:
            r, t = read(img), scene.things[0]
            checks = {a: getattr(r, a) == getattr(t, a) for a in ("shape", "colour", "pattern", "size", "position")}
            checks["background"] = r.background == scene.background
            right["all (single object)"].append(all(checks.values()))
        else:
            layout = "left-right" if scene.things[0].position == "left" else "top-bottom"
            readings = read_pair(img, layout)
            checks = {
                "two objects: shapes": all(r.shape == t.shape for r, t in zip(readings, scene.things)),
                "two objects: colours": all(r.colour == t.colour for r, t in zip(readings, scene.things)),
                "background": readings[0].background == scene.background,
            }
        for k, v in checks.items():
            right[k].append(v)
    return {
        "accuracy": {k: float(np.mean(v)) for k, v in right.items()},
        "counts": {k: len(v) for k, v in right.items()},
        "images": images,
        "captions": captions,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Caption-following accuracy of the mini model.")
    p.add_argument("--scenes", type=int, default=120)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    a = p.parse_args(argv)
    result = accuracy(mini.load(), a.scenes, a.steps, a.guidance)
    for k, v in result["accuracy"].items():
        print(f"{k:24s} {v:6.1%}  (n={result['counts'][k]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
