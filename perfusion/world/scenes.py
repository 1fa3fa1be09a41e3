"""The miniature world: 32x32 scenes of one or two patterned shapes, with natural captions.

Deterministic for a seed. The "checkered" pattern never appears in the base model's training data:
it is the novel instance a concept is learned from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32
SUPERSAMPLE = 4
SHAPES = ("ball", "box", "cone", "star", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"gray": (128, 128, 128), "black": (15, 15, 15), "white": (240, 240, 240), "brown": (110, 70, 40)}
POSITIONS = {"left": (9, 16), "right": (23, 16), "top": (16, 9), "bottom": (16, 23), "centre": (16, 16)}
SIZES = {"small": 5.0, "big": 8.5}
PATTERNS = ("plain", "striped", "dotted")
NOVEL_PATTERNS = ("checkered",)


@dataclass(frozen=True)
class Thing:
    """One object in a scene."""

    shape: str
    colour: str
    pattern: str = "plain"
    size: str = "big"
    position: str = "centre"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str = "gray"
    seed: int = 0  # jitter of positions and pattern phase


def _shape_mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """Boolean [n, n] mask of a shape centred at (cx, cy) with radius r, in supersampled pixels."""
    y, x = np.mgrid[0:n, 0:n] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "ball":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d = np.sqrt(dx**2 + dy**2)
        return (d <= r) & (d >= 0.55 * r)
    if shape == "box":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "cone":  # upright triangle
        top, bottom = cy - r, cy + 0.8 * r
        half = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half)
    if shape == "star":
        angle = np.arctan2(dy, dx) + np.pi / 2
        radius = np.sqrt(dx**2 + dy**2)
        lobe = 0.45 + 0.55 * np.abs(np.cos(2.5 * angle)) ** 1.5
        return radius <= r * lobe
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(pattern: str, colour: np.ndarray, n: int, phase: int) -> np.ndarray:
    """[n, n, 3] float colour field of a pattern, in supersampled pixels (cells of 4 output pixels)."""
    y, x = np.mgrid[0:n, 0:n]
    dark = colour * 0.35
    light = np.minimum(colour * 0.6 + 110, 255)
    cell = 4 * SUPERSAMPLE  # 4 output pixels
    if pattern == "plain":
        on = np.ones((n, n), bool)
    elif pattern == "striped":
        on = ((y + phase) // (cell // 2)) % 2 == 0
    elif pattern == "dotted":
        on = (((x + phase) % cell) - cell / 2) ** 2 + (((y + phase) % cell) - cell / 2) ** 2 > (cell / 4) ** 2
    elif pattern == "checkered":
        on = (((x + phase) // (cell // 2)) + ((y + phase) // (cell // 2))) % 2 == 0
        return np.where(on[..., None], colour, light)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.where(on[..., None], colour, dark)


def _draw(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled (image float [n, n, 3], owner int8 [n, n]: -1 background, k = things[k])."""
    n = SIZE * SUPERSAMPLE
    rng = np.random.default_rng(scene.seed)
    img = np.zeros((n, n, 3)) + np.array(BACKGROUNDS[scene.background], float)
    owner = np.full((n, n), -1, np.int8)
    for k, thing in enumerate(scene.things):
        cx, cy = (np.array(POSITIONS[thing.position], float) + rng.uniform(-1.0, 1.0, 2)) * SUPERSAMPLE
        mask = _shape_mask(thing.shape, cx, cy, SIZES[thing.size] * SUPERSAMPLE, n)
        field_ = _pattern(thing.pattern, np.array(COLOURS[thing.colour], float), n, int(rng.integers(0, 16)))
        img[mask] = field_[mask]
        owner[mask] = k
    return img, owner


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 [32, 32, 3] (4x supersampled, box-filtered)."""
    img, _ = _draw(scene)
    small = img.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean((1, 3))
    return np.clip(small.round(), 0, 255).astype(np.uint8)


def owner_map(scene: Scene) -> np.ndarray:
    """int8 [32, 32]: which object covers most of each pixel (-1: background covers half or more)."""
    _, owner = _draw(scene)
    cover = np.stack(
        [(owner == k).reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3)) for k in range(len(scene.things))]
    )
    return np.where(cover.sum(0) > 0.5, cover.argmax(0), -1).astype(np.int8)


def describe(thing: Thing, rng: random.Random, with_position: bool = True) -> str:
    """Words for one object, e.g. 'small red striped star at the left'."""
    words = []
    if thing.size == "small" or rng.random() < 0.5:
        words.append(thing.size)
    words.append(thing.colour)
    if thing.pattern != "plain" or rng.random() < 0.3:
        words.append(thing.pattern)
    words.append(thing.shape)
    text = " ".join(words)
    if with_position:
        text += " in the centre" if thing.position == "centre" else f" at the {thing.position}"
    return text


def article(words: str) -> str:
    """'a' or 'an' + words."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, rng: random.Random) -> str:
    """A natural caption; every attribute that defines the scene is named."""
    body = " and ".join(article(describe(t, rng)) for t in scene.things)
    opener = rng.choice(("", "", "a photo of ", "an image of "))
    if opener:
        body = opener + body
    return f"{body} on a {scene.background} background"


def random_scene(rng: random.Random, patterns=PATTERNS, two_objects: float = 0.25) -> Scene:
    """A random scene; two objects (left and right, or top and bottom) with probability `two_objects`."""

    def thing(position: str) -> Thing:
        return Thing(
            rng.choice(SHAPES),
            rng.choice(list(COLOURS)),
            rng.choice(patterns),
            rng.choice(list(SIZES)) if position == "any" else "small",
            position,
        )

    if rng.random() < two_objects:
        pair = rng.choice((("left", "right"), ("top", "bottom")))
        things = tuple(
            Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(patterns), "small", p) for p in pair
        )
    else:
        base = thing("any")
        things = (Thing(base.shape, base.colour, base.pattern, base.size, rng.choice(list(POSITIONS))),)
    return Scene(things, rng.choice(list(BACKGROUNDS)), rng.randrange(2**31))


def scenes_and_captions(
    seed: int, n: int, patterns=PATTERNS, two_objects: float = 0.25, drop_caption: float = 0.0
) -> tuple[list[Scene], list[str]]:
    """n random scenes for one seed and their captions ('' with probability drop_caption)."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, patterns, two_objects) for _ in range(n)]
    return scenes, ["" if rng.random() < drop_caption else caption(s, rng) for s in scenes]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def from_tensor(x: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [-1, 1] -> uint8 [n, H, W, 3]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
