"""48x48 scenes of one, two or three shapes with two-colour patterns, and their captions.

Every patterned object has a body colour (named in its caption) and an accent colour (never named):
"a red checkered ball" may carry yellow, blue, ... checks. So words can ask for a pattern but not for
one object's exact look, which is what a personal instance is (a red ball with yellow checks).
Deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

SIZE = 48
SUPERSAMPLE = 4
PERIOD = 6  # output pixels per pattern repeat (stripes: 4 body + 2 accent rows; checks: 3 px cells)
SHAPES = ("ball", "box", "cone", "star", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
BACKGROUNDS = {"gray": (128, 128, 128), "black": (15, 15, 15), "white": (240, 240, 240), "brown": (110, 70, 40)}
POSITIONS = {"left": (14, 24), "right": (34, 24), "top": (24, 14), "bottom": (24, 34), "centre": (24, 24)}
SIZES = {"small": 7.5, "big": 12.0}
# Three objects take three of the four quadrants (three in a row would be too small to show a pattern).
CORNERS = {"top left": (14, 14), "top right": (34, 14), "bottom left": (14, 34), "bottom right": (34, 34)}
ANCHORS = {**POSITIONS, **CORNERS}
PAIRS = (("left", "right"), ("top", "bottom"))
TRIPLES = tuple(tuple(c for c in CORNERS if c != left_out) for left_out in CORNERS)
PATTERNS = ("plain", "striped", "checkered", "two-tone")  # what the base model is trained on
CONTROL_PATTERNS = ("dotted",)  # drawn only as negative controls for the reader
JITTER = 1.5  # output pixels of random shift of each object


@dataclass(frozen=True)
class Thing:
    """One object: `accent` is the pattern's second colour (None for plain)."""

    shape: str
    colour: str
    pattern: str = "plain"
    size: str = "big"
    position: str = "centre"
    accent: Optional[str] = None


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str = "gray"
    seed: int = 0  # jitter of positions and pattern phase


def shape_mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """Boolean [n, n] mask of a shape centred at (cx, cy) with radius r, in the same pixel units."""
    y, x = np.mgrid[0:n, 0:n] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "ball":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d = np.sqrt(dx**2 + dy**2)
        return (d <= r) & (d >= 0.5 * r)
    if shape == "box":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "cone":  # upright triangle
        top, bottom = cy - r, cy + 0.8 * r
        half = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half)
    if shape == "star":
        angle = np.arctan2(dy, dx) + np.pi / 2
        lobe = 0.4 + 0.6 * np.abs(np.cos(2.5 * angle)) ** 1.5
        return np.sqrt(dx**2 + dy**2) <= r * lobe
    raise ValueError(f"unknown shape {shape!r}")


def accent_field(pattern: str, mask: np.ndarray, phase: tuple[int, int]) -> np.ndarray:
    """Boolean [n, n]: where the accent colour shows, for a pattern on `mask` (supersampled pixels).

    phase: (x, y) offset of the pattern grid in supersampled pixels; two-tone splits at the mask's middle row."""
    n = mask.shape[0]
    y, x = np.mgrid[0:n, 0:n]
    p = PERIOD * SUPERSAMPLE
    if pattern == "plain":
        return np.zeros((n, n), bool)
    if pattern == "striped":
        return (y + phase[1]) % p < p // 3
    if pattern == "checkered":
        return ((x + phase[0]) // (p // 2) + (y + phase[1]) // (p // 2)) % 2 == 1
    if pattern == "two-tone":
        rows = np.nonzero(mask.any(1))[0]
        return y >= (rows.min() + rows.max() + 1) / 2 if len(rows) else np.zeros((n, n), bool)
    if pattern == "dotted":
        cx, cy = (x + phase[0]) % p - p / 2, (y + phase[1]) % p - p / 2
        return cx**2 + cy**2 <= (p / 5) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def _draw(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled (image float [n, n, 3], owner int8 [n, n]: -1 background, k = things[k])."""
    n = SIZE * SUPERSAMPLE
    rng = np.random.default_rng(scene.seed)
    img = np.zeros((n, n, 3)) + np.array(BACKGROUNDS[scene.background], float)
    owner = np.full((n, n), -1, np.int8)
    for k, thing in enumerate(scene.things):
        cx, cy = (np.array(ANCHORS[thing.position], float) + rng.uniform(-JITTER, JITTER, 2)) * SUPERSAMPLE
        mask = shape_mask(thing.shape, cx, cy, SIZES[thing.size] * SUPERSAMPLE, n)
        phase = tuple(int(v) for v in rng.integers(0, PERIOD * SUPERSAMPLE, 2))
        accent = accent_field(thing.pattern, mask, phase) if thing.accent else np.zeros((n, n), bool)
        img[mask] = COLOURS[thing.colour]
        if thing.accent:
            img[mask & accent] = COLOURS[thing.accent]
        owner[mask] = k
    return img, owner


def _downsample(x: np.ndarray) -> np.ndarray:
    return x.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, *x.shape[2:]).mean((1, 3))


def _pixels(img: np.ndarray) -> np.ndarray:
    """A supersampled drawing as uint8 [48, 48, 3] (box-filtered)."""
    return np.clip(_downsample(img).round(), 0, 255).astype(np.uint8)


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 [48, 48, 3] (4x supersampled, box-filtered)."""
    return _pixels(_draw(scene)[0])


def render_with_cover(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The scene as uint8 [48, 48, 3] and how much of each pixel its objects cover, float32 [48, 48] in 0..1, from
    one drawing."""
    img, owner = _draw(scene)
    return _pixels(img), _downsample((owner >= 0).astype(np.float32))


def owner_map(scene: Scene) -> np.ndarray:
    """int8 [48, 48]: which object covers most of each pixel (-1: background covers half or more)."""
    _, owner = _draw(scene)
    cover = (
        np.stack([_downsample((owner == k).astype(float)) for k in range(len(scene.things))])
        if scene.things
        else np.zeros((1, SIZE, SIZE))
    )
    return np.where(cover.sum(0) > 0.5, cover.argmax(0), -1).astype(np.int8)


def describe(thing: Thing, rng: random.Random, with_position: bool = True, colourless: float = 0.0) -> str:
    """Words for one object, e.g. 'small red striped star at the left' (the accent is never named); with
    probability `colourless` the colour is left out ('small striped star': a star of any colour), as people write
    a superclass word alone ('a teddy bear')."""
    words = []
    if thing.size == "small" or rng.random() < 0.5:
        words.append(thing.size)
    if not (colourless and rng.random() < colourless):  # no draw at 0: the captions of before stay the same
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


def caption(scene: Scene, rng: random.Random, colourless: float = 0.0) -> str:
    """A natural caption; every attribute that defines the scene is named, except accent colours (and a colour
    left out with probability `colourless`, see describe)."""
    parts = [article(describe(t, rng, colourless=colourless)) for t in scene.things]
    body = " and ".join(parts) if len(parts) < 3 else f"{parts[0]}, {parts[1]} and {parts[2]}"
    opener = rng.choice(("", "", "a photo of ", "an image of "))
    return f"{opener}{body} on a {scene.background} background"


def random_thing(rng: random.Random, position: str, size: str, patterns=PATTERNS) -> Thing:
    colour, pattern = rng.choice(list(COLOURS)), rng.choice(patterns)
    accent = None if pattern == "plain" else rng.choice([c for c in COLOURS if c != colour])
    return Thing(rng.choice(SHAPES), colour, pattern, size, position, accent)


def random_scene(rng: random.Random, patterns=PATTERNS, two_objects: float = 0.3, three_objects: float = 0.2) -> Scene:
    """A random scene: two small objects (left and right, or top and bottom) with probability `two_objects`,
    three in three of the four corners with probability `three_objects`, else one."""
    draw = rng.random()
    if draw < two_objects + three_objects:
        places = rng.choice(PAIRS if draw < two_objects else TRIPLES)
        things = tuple(random_thing(rng, p, "small", patterns) for p in places)
    else:
        things = (random_thing(rng, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)), patterns),)
    return Scene(things, rng.choice(list(BACKGROUNDS)), rng.randrange(2**31))


def scenes_and_captions(
    seed: int,
    n: int,
    patterns=PATTERNS,
    two_objects: float = 0.3,
    three_objects: float = 0.2,
    drop_caption: float = 0.0,
    colourless: float = 0.0,
) -> tuple[list[Scene], list[str]]:
    """n random scenes for one seed and their captions ('' with probability drop_caption; each object's colour
    left out with probability colourless)."""
    rng = random.Random(seed)
    scenes = [random_scene(rng, patterns, two_objects, three_objects) for _ in range(n)]
    return scenes, ["" if rng.random() < drop_caption else caption(s, rng, colourless) for s in scenes]
