"""Read a 48x48 world-2 image back into attributes, and decide whether an object is a given instance.

Transparent pixel analysis, no learned classifier:
- background: the commonest border colour; object pixels: far from it (every palette colour is at least
  100 away from every background), 1-2 px gaps closed; position: their centroid; shape and size: best IoU against
  reference masks drawn around it.
- tones: the palette colours of the object's interior pixels (those within 45 of one) that cover >= 12 % of
  them; of two or three such, the pair whose colour segment the pixels lie closest to (blends included).
- pattern: every interior pixel is placed on the body -> accent colour axis (t = 0 body, 1 accent), and t
  is correlated with each pattern's accent template at every phase (Pearson r). A pattern is read when
  r >= 0.5 over the object and, in each half of it, t rises with the template's accent coverage by a slope
  of >= 0.5 (1 for the pattern drawn in full; a half-covered pattern is no pattern). A
  uniform object, however tinted, has no spread in t and correlates with nothing: mean colour never
  decides a pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Optional

import numpy as np

from .scenes import (
    ANCHORS,
    BACKGROUNDS,
    COLOURS,
    PERIOD,
    SHAPES,
    SIZE,
    SIZES,
    SUPERSAMPLE,
    Thing,
    accent_field,
    shape_mask,
)

_BG = {k: np.array(v, float) for k, v in BACKGROUNDS.items()}
_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[k] for k in _NAMES], float)  # [6, 3]
MIN_ACCENT = 0.12  # fraction of the object's pure-toned pixels an accent colour must cover
PURE = 45.0  # RGB distance within which a pixel counts as one palette colour
MIN_FIT = 0.5  # pattern correlation over the object
MIN_CONTRAST, MIN_HALF_CONTRAST = 0.55, 0.35  # slope of t on the template over the object, in its weakest half
MIN_HALF_AREA = 24  # pixels: smaller halves (the tip of a small cone) hold too little of the pattern to judge
PHASE_STEP = 2  # supersampled pixels between the template phases tried (half an output pixel)


@dataclass
class Reading:
    """What an image shows (None where nothing was found). pattern None with tones: an unclear pattern."""

    background: str
    shape: Optional[str] = None
    colour: Optional[str] = None  # body colour
    accent: Optional[str] = None
    pattern: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    area: int = 0
    fit: float = 0.0  # correlation of the read pattern (0 for plain)

    def shows_colour(self, name: str) -> bool:
        """The caption's colour is the body (either tone of a checkered object, whose tones cover equal parts)."""
        return self.colour == name or (self.pattern == "checkered" and self.accent == name)


def is_instance(reading: Reading, thing: Thing) -> bool:
    """The object shows this instance: its shape, its pattern over the whole object, its body and accent."""
    if reading.shape != thing.shape or reading.pattern != thing.pattern:
        return False
    if thing.pattern == "checkered":
        return {reading.colour, reading.accent} == {thing.colour, thing.accent}
    return (reading.colour, reading.accent) == (thing.colour, thing.accent)


@cache
def _reference(shape: str, size: str, cx: int, cy: int) -> np.ndarray:
    """Boolean [48, 48] reference mask of a shape centred on pixel (cx, cy)."""
    n = SIZE * SUPERSAMPLE
    m = shape_mask(shape, (cx + 0.5) * SUPERSAMPLE, (cy + 0.5) * SUPERSAMPLE, SIZES[size] * SUPERSAMPLE, n)
    return m.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3)) >= 0.5


def _shape_and_size(mask: np.ndarray) -> tuple[str, str]:
    ys, xs = np.nonzero(mask)
    cx0, cy0 = int(round(xs.mean() - 0.5)), int(round(ys.mean() - 0.5))
    best, best_iou = ("ball", "big"), -1.0
    for shape in SHAPES:
        for size in SIZES:
            for dy in range(-4, 3):  # a cone's centroid sits below its centre
                for dx in range(-2, 3):
                    ref = _reference(shape, size, cx0 + dx, cy0 + dy)
                    iou = (ref & mask).sum() / max((ref | mask).sum(), 1)
                    if iou > best_iou:
                        best, best_iou = (shape, size), iou
    return best


@cache
def _templates(pattern: str) -> np.ndarray:
    """float [phases, 48, 48]: accent coverage of a repeating pattern at every phase tried."""
    n, p = SIZE * SUPERSAMPLE, PERIOD * SUPERSAMPLE
    full = np.ones((n, n), bool)
    ys = range(0, p, PHASE_STEP)
    xs = range(0, p, PHASE_STEP) if pattern in ("checkered", "dotted") else (0,)
    return np.stack(
        [
            accent_field(pattern, full, (x, y)).reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3))
            for y in ys
            for x in xs
        ]
    )


def _split_templates(mask: np.ndarray) -> np.ndarray:
    """float [k, 48, 48]: two-tone splits (accent below a row) around the object's middle row."""
    rows = np.nonzero(mask.any(1))[0]
    middle = (rows.min() + rows.max() + 1) / 2
    y = np.arange(SIZE)[:, None] + 0.5
    return np.stack(
        [np.broadcast_to(np.clip(y - s + 0.5, 0, 1), (SIZE, SIZE)) for s in middle + np.arange(-3, 3.25, 0.25)]
    )


def _corr(t: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Pearson r of t [N] with each row of templates [k, N] (0 where either has no spread)."""
    tc = t - t.mean()
    tt = templates - templates.mean(1, keepdims=True)
    denom = np.sqrt((tc**2).sum() * (tt**2).sum(1))
    return np.where(denom > 1e-9, tt @ tc / np.maximum(denom, 1e-9), 0.0)


def _halves(mask: np.ndarray, pattern: str) -> list[np.ndarray]:
    """The object's halves whose pattern fit must hold too (two-tone: only left and right show both tones)."""
    ys, xs = np.nonzero(mask)
    mx, my = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    halves = [mask & (xx < mx), mask & (xx >= mx)]
    return halves if pattern == "two-tone" else halves + [mask & (yy < my), mask & (yy >= my)]


def _contrast(t: np.ndarray, template: np.ndarray) -> float:
    """Slope of t regressed on the template's accent coverage (1: the pattern drawn in full, 0: none)."""
    dev = template - template.mean()
    var = float((dev**2).sum())
    return float(dev @ t) / var if var > 1e-9 else 0.0


def pattern_fit(img: np.ndarray, mask: np.ndarray, pattern: str, body: str, accent: str) -> tuple[float, float, float]:
    """(r, contrast over the object, contrast in its weakest half) of a pattern in body/accent colours, at its
    best phase.

    The halves are judged by contrast (the slope of t on the template), not r: a sliver of pattern in an
    otherwise plain half correlates well with the template, but its slope is small."""
    b, a = np.array(COLOURS[body], float), np.array(COLOURS[accent], float)
    t = np.clip(((img - b) @ (a - b)) / float((a - b) @ (a - b)), -0.5, 1.5)  # [48, 48]
    templates = _split_templates(mask) if pattern == "two-tone" else _templates(pattern)
    r = _corr(t[mask], templates[:, mask])
    k = int(r.argmax())
    halves = [h for h in _halves(mask, pattern) if h.sum() >= MIN_HALF_AREA]
    weakest = min((_contrast(t[h], templates[k][h]) for h in halves), default=0.0)
    return float(r[k]), _contrast(t[mask], templates[k][mask]), weakest


def _shifted(mask: np.ndarray, op) -> np.ndarray:
    """mask combined by op (| or &) with its four 1-pixel shifts."""
    out = mask.copy()
    out[1:], out[:-1] = op(out[1:], mask[:-1]), op(out[:-1], mask[1:])
    out[:, 1:], out[:, :-1] = op(out[:, 1:], mask[:, :-1]), op(out[:, :-1], mask[:, 1:])
    return out


def _close(mask: np.ndarray) -> np.ndarray:
    """Fill 1-2 px gaps (a blend of two tones can match the background, e.g. green + purple on gray);
    a ring's hole (>= 7 px) stays open."""
    return _shifted(_shifted(mask, np.logical_or), np.logical_and)


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask without its edge pixels (blended with the background); the whole mask if too little remains."""
    inner = _shifted(mask, np.logical_and)
    return inner if inner.sum() >= 12 else mask


def _segment_distance(pixels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RGB distance of each pixel [N, 3] to the colour segment from a to b (where their blends lie)."""
    t = np.clip(((pixels - a) @ (b - a)) / float((b - a) @ (b - a)), 0, 1)
    return np.linalg.norm(pixels - (a + t[:, None] * (b - a)), axis=-1)


def _tones_and_pattern(img: np.ndarray, mask: np.ndarray) -> tuple[str, Optional[str], Optional[str], float]:
    """(body, accent or None, pattern or None if unclear, fit) of the object covering mask."""
    inner = _interior(mask)
    pixels = img[inner]
    dist = np.linalg.norm(pixels[:, None] - _PALETTE[None], axis=-1)  # [N, 6]
    pure = dist.min(1) < PURE
    nearest = dist[pure if pure.sum() >= 8 else slice(None)].argmin(1)
    share = np.bincount(nearest, minlength=len(_NAMES)) / len(nearest)
    candidates = [int(k) for k in np.argsort(-share)[:3] if share[k] >= MIN_ACCENT]
    if len(candidates) < 2:
        return _NAMES[int(share.argmax())], None, "plain", 0.0
    # Blends of two tones can pass for a third palette colour (red + yellow edges look orange): the pair is
    # the one whose colour segment the object's pixels, blends included, lie closest to.
    pairs = [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1 :]]
    first, second = min(pairs, key=lambda ab: float(_segment_distance(pixels, _PALETTE[ab[0]], _PALETTE[ab[1]]).mean()))
    best: tuple[float, str, str, str] = (-1.0, "", "", "")
    for pattern in ("striped", "checkered", "two-tone"):
        for body, accent in ((first, second), (second, first)):
            fit, contrast, weakest = pattern_fit(img, inner, pattern, _NAMES[body], _NAMES[accent])
            if contrast >= MIN_CONTRAST and weakest >= MIN_HALF_CONTRAST and fit > best[0]:
                best = (fit, pattern, _NAMES[body], _NAMES[accent])
    fit, pattern, body, accent = best
    if fit < MIN_FIT:
        major, minor = (first, second) if share[first] >= share[second] else (second, first)
        return _NAMES[major], _NAMES[minor], None, max(fit, 0.0)
    return body, accent, pattern, fit


def read(image: np.ndarray, region: Optional[np.ndarray] = None, min_area: int = 20) -> Reading:
    """Attributes of the object in `image` (uint8 [48, 48, 3]), optionally only inside boolean `region`."""
    img = image.astype(float)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_name = min(_BG, key=lambda k: float(np.linalg.norm(np.median(border, 0) - _BG[k])))
    fg = _close(np.linalg.norm(img - _BG[bg_name], axis=-1) > 60)
    if region is not None:
        fg &= region
    if fg.sum() < min_area:
        return Reading(bg_name, area=int(fg.sum()))
    ys, xs = np.nonzero(fg)
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    position = min(ANCHORS, key=lambda k: float(np.linalg.norm(centre - np.array(ANCHORS[k]))))
    shape, size = _shape_and_size(fg)
    colour, accent, pattern, fit = _tones_and_pattern(img, fg)
    return Reading(bg_name, shape, colour, accent, pattern, size, position, int(fg.sum()), fit)


def read_places(image: np.ndarray, places: tuple[str, ...]) -> tuple[Reading, ...]:
    """Several objects at the given places (scenes.PAIRS / TRIPLES, e.g. ('left', 'right')): one Reading per
    place, of the pixels nearer its anchor than any other place's (halves for pairs, quadrants for triples)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dist = np.stack([(x - ANCHORS[p][0]) ** 2 + (y - ANCHORS[p][1]) ** 2 for p in places])
    nearest = dist.argmin(0)
    return tuple(read(image, nearest == k) for k in range(len(places)))


def read_pair(image: np.ndarray, layout: str) -> tuple[Reading, Reading]:
    """Two objects side by side (layout 'left-right') or stacked ('top-bottom'): one Reading per half."""
    return read_places(image, ("left", "right") if layout == "left-right" else ("top", "bottom"))
