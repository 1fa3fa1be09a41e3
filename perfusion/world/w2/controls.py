"""Negative controls for the identity reader: look-alikes of an instance that must NOT read as it.

    ./dev.sh python -m perfusion.world.w2.controls   # prints the reader's confusion table (docs/world.md)

Each control is the instance's scene with the object repainted inside its own silhouette: plain, tinted
toward light, dark or its own mean colour (a uniform object of exactly the instance's average colour),
other patterns in the same two colours, wrong body or accent colour, the tones swapped, half of it covered
by its body colour, or another shape.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np

from .analyze import is_instance, read
from .scenes import BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, SIZE, SIZES, SUPERSAMPLE, Scene, Thing, _draw

INSTANCES = (
    Thing("ball", "red", "checkered", accent="yellow"),
    Thing("box", "blue", "two-tone", accent="cyan"),
    Thing("cone", "green", "striped", accent="purple"),
    Thing("star", "purple", "checkered", accent="green"),
    Thing("ring", "yellow", "striped", accent="blue"),
)
CONTROLS = (
    "plain",
    "tinted light",
    "tinted dark",
    "mean colour",
    "other pattern",
    "dotted",
    "wrong body colour",
    "wrong accent colour",
    "tones swapped",
    "half covered",
    "other shape",
)


def _other(colour: str, *avoid: str) -> str:
    return next(c for c in COLOURS if c not in (colour, *avoid))


def _repaint(scene: Scene, paint) -> np.ndarray:
    """uint8 [48, 48, 3]: the scene with object 0's supersampled pixels replaced by paint(img, mask)."""
    img, owner = _draw(scene)
    paint(img, owner == 0)
    small = img.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean((1, 3))
    return np.clip(small.round(), 0, 255).astype(np.uint8)


def _fill(colour) -> callable:
    def paint(img, mask):
        img[mask] = colour

    return paint


def control_image(scene: Scene, control: str) -> np.ndarray:
    """The control `control` of the instance that is scene.things[0]."""
    t = scene.things[0]
    body, accent = np.array(COLOURS[t.colour], float), np.array(COLOURS[t.accent], float)
    share = {"striped": 1 / 3, "checkered": 0.5, "two-tone": 0.5}[t.pattern]
    thing = {
        "other pattern": replace(t, pattern=next(p for p in PATTERNS[1:] if p != t.pattern)),
        "dotted": replace(t, pattern="dotted"),
        "wrong body colour": replace(t, colour=_other(t.colour, t.accent)),
        "wrong accent colour": replace(t, accent=_other(t.accent, t.colour)),
        "tones swapped": replace(t, colour=t.accent, accent=t.colour),
        "other shape": replace(t, shape="box" if t.shape != "box" else "ball"),
    }.get(control)
    if thing is not None:
        return _repaint(replace(scene, things=(thing,) + scene.things[1:]), lambda img, mask: None)
    if control == "plain":
        return _repaint(scene, _fill(body))
    if control == "tinted light":
        return _repaint(scene, _fill(body + 0.4 * (255 - body)))
    if control == "tinted dark":
        return _repaint(scene, _fill(body * 0.6))
    if control == "mean colour":
        return _repaint(scene, _fill((1 - share) * body + share * accent))
    if control == "half covered":

        def cover(img, mask):
            xs = np.nonzero(mask.any(0))[0]
            left = np.zeros_like(mask)
            left[:, : (xs.min() + xs.max()) // 2] = True
            img[mask & left] = body

        return _repaint(scene, cover)
    raise ValueError(f"unknown control {control!r}")


def placements(instance: Thing, seed: int = 0) -> list[Scene]:
    """The instance at every position and size, backgrounds rotated, phases and jitter varied by seed."""
    backgrounds = list(BACKGROUNDS)
    return [
        Scene((replace(instance, position=p, size=s),), backgrounds[(i + seed) % len(backgrounds)], seed * 100 + i)
        for i, (p, s) in enumerate((p, s) for p in POSITIONS for s in SIZES)
    ]


def confusion(instances=INSTANCES, seeds=(0,)) -> dict[str, float]:
    """{'instance' or control: fraction read as the instance} over every instance, placement and seed."""
    hits = {name: [] for name in ("instance", *CONTROLS)}
    for instance in instances:
        for seed in seeds:
            for scene in placements(instance, seed):
                thing = scene.things[0]
                hits["instance"].append(is_instance(read(_repaint(scene, lambda img, mask: None)), thing))
                for control in CONTROLS:
                    if control == "tones swapped" and thing.pattern == "checkered":
                        continue  # checks in swapped tones are the same checks: not a look-alike
                    hits[control].append(is_instance(read(control_image(scene, control)), thing))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def main() -> int:
    table = confusion(seeds=(0, 1, 2))
    n = len(INSTANCES) * 3 * len(POSITIONS) * len(SIZES)
    print(f"| image | read as the instance (n={n} each, tones swapped: non-checkered only) |\n|---|---|")
    for name, rate in table.items():
        print(f"| {name} | {rate:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
