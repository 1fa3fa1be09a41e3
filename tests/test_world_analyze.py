"""Pixel analysis reads rendered ground truth back (the measuring stick of the quality benchmark)."""

from __future__ import annotations

import random
from collections import Counter

from perfusion.world.analyze import read, read_pair
from perfusion.world.scenes import NOVEL_PATTERNS, PATTERNS, random_scene, render


def test_reads_single_objects():
    rng = random.Random(11)
    wrong, n = Counter(), 300
    checkered_hits = checkered_total = false_checkered = 0
    for _ in range(n):
        scene = random_scene(rng, PATTERNS + NOVEL_PATTERNS, two_objects=0.0)
        thing, r = scene.things[0], read(render(scene))
        for attr in ("shape", "colour", "size", "position"):
            wrong[attr] += getattr(r, attr) != getattr(thing, attr)
        wrong["background"] += r.background != scene.background
        wrong["pattern"] += r.pattern != thing.pattern
        if thing.pattern == "checkered":
            checkered_total += 1
            checkered_hits += r.pattern == "checkered"
        else:
            false_checkered += r.pattern == "checkered"
    for attr in ("shape", "colour", "size", "position", "background"):
        assert wrong[attr] <= 0.02 * n, (attr, wrong)
    assert checkered_total > 40 and checkered_hits == checkered_total and false_checkered <= 0.01 * n
    assert wrong["pattern"] <= 0.12 * n  # small dotted/striped objects blur at 32 px


def test_reads_pairs():
    rng = random.Random(12)
    wrong = 0
    for _ in range(60):
        scene = random_scene(rng, PATTERNS, two_objects=1.0)
        layout = "left-right" if scene.things[0].position == "left" else "top-bottom"
        for thing, r in zip(scene.things, read_pair(render(scene), layout)):
            wrong += (r.shape != thing.shape) + (r.colour != thing.colour)
    assert wrong <= 0.05 * 240


def test_empty_image_reads_background_only():
    from perfusion.world.scenes import Scene

    r = read(render(Scene((), "brown")))
    assert r.background == "brown" and r.shape is None and r.area == 0
