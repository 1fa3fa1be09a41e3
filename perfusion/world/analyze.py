"""Read a 32x32 world image back into attributes by transparent pixel analysis (no learned classifier).

background: the commonest border colour, nearest palette background.
object pixels: far from the background colour.  position: their centroid, nearest anchor.
colour: the palette colour with most object pixels near it (or near its pattern shades).
pattern: per object pixel, nearest of {colour, its dark shade, its light shade}; light cells mean
checkered, dark rows striped, dark spots dotted, neither plain.
shape and size: best IoU against reference masks of every shape and size drawn at the centroid.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Optional

import numpy as np

from .scenes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE, SIZES, SUPERSAMPLE, _shape_mask

_BG = {k: np.array(v, float) for k, v in BACKGROUNDS.items()}
_COL = {k: np.array(v, float) for k, v in COLOURS.items()}


@dataclass
class Reading:
    """What an image shows (None where nothing was found)."""

    background: str
    shape: Optional[str] = None
    colour: Optional[str] = None
    pattern: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    area: int = 0


def _nearest(value: np.ndarray, table: dict) -> str:
    return min(table, key=lambda k: float(np.linalg.norm(value - table[k])))


def _shades(c: np.ndarray) -> np.ndarray:
    """[3 shades, 3]: the colour, its dark shade, its light shade (as the renderer draws patterns)."""
    return np.stack([c, c * 0.35, np.minimum(c * 0.6 + 110, 255)])


@cache
def _reference(shape: str, size: str, cx: int, cy: int) -> np.ndarray:
    """Boolean [32, 32] reference mask of a shape centred on pixel (cx, cy)."""
    n = SIZE * SUPERSAMPLE
    m = _shape_mask(shape, (cx + 0.5) * SUPERSAMPLE, (cy + 0.5) * SUPERSAMPLE, SIZES[size] * SUPERSAMPLE, n)
    return m.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3)) >= 0.5


def _shape_and_size(mask: np.ndarray) -> tuple[str, str]:
    ys, xs = np.nonzero(mask)
    # the cone's centre sits below its centroid; search a small window of centres for every shape
    cx0, cy0 = int(round(xs.mean() - 0.5)), int(round(ys.mean() - 0.5))
    best, best_iou = ("ball", "big"), -1.0
    for shape in SHAPES:
        for size in SIZES:
            for dy in range(-2, 3):
                for dx in range(-1, 2):
                    ref = _reference(shape, size, cx0 + dx, cy0 + dy)
                    iou = (ref & mask).sum() / max((ref | mask).sum(), 1)
                    if iou > best_iou:
                        best, best_iou = (shape, size), iou
    return best


def _lum(x: np.ndarray) -> np.ndarray:
    return x.mean(-1)


def _colour_and_pattern(img: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    """Palette colour and pattern of the object covering boolean `mask` of img [32, 32, 3] (float)."""
    pixels = img[mask]
    colour = min(
        _COL, key=lambda k: float(np.linalg.norm(pixels[:, None] - _shades(_COL[k])[None], axis=-1).min(1).mean())
    )
    inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    inner = inner if inner.sum() >= 6 else mask
    lum = _lum(img) * inner
    l_col, l_dark, l_light = _lum(_shades(_COL[colour]))
    mean, spread = lum[inner].mean(), lum[inner].std() / (l_col - l_dark)
    toward_light, toward_dark = (mean - l_col) / (l_light - l_col), (l_col - mean) / (l_col - l_dark)
    if toward_light > 0.2:
        return colour, "checkered"
    if toward_dark > 0.04 or spread > 0.12:
        rows = [lum[r][inner[r]].mean() for r in range(SIZE) if inner[r].sum() >= 2]
        cols = [lum[:, c][inner[:, c]].mean() for c in range(SIZE) if inner[:, c].sum() >= 2]
        return colour, "striped" if len(rows) > 1 and np.std(rows) > 1.5 * np.std(cols) else "dotted"
    return colour, "plain"


def read(image: np.ndarray, region: Optional[np.ndarray] = None, min_area: int = 12) -> Reading:
    """Attributes of the object in `image` (uint8 [32, 32, 3]), optionally only inside boolean `region`."""
    img = image.astype(float)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_name = _nearest(np.median(border, 0), _BG)
    fg = np.linalg.norm(img - _BG[bg_name], axis=-1) > 60
    if region is not None:
        fg &= region
    if fg.sum() < min_area:
        return Reading(bg_name, area=int(fg.sum()))
    ys, xs = np.nonzero(fg)
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    position = min(POSITIONS, key=lambda k: float(np.linalg.norm(centre - np.array(POSITIONS[k]))))
    shape, size = _shape_and_size(fg)
    colour, pattern = _colour_and_pattern(img, fg)
    return Reading(bg_name, shape, colour, pattern, size, position, int(fg.sum()))


def read_pair(image: np.ndarray, layout: str) -> tuple[Reading, Reading]:
    """Two objects side by side (layout 'left-right') or stacked ('top-bottom'): one Reading per half."""
    half = np.zeros((SIZE, SIZE), bool)
    if layout == "left-right":
        half[:, : SIZE // 2] = True
    else:
        half[: SIZE // 2] = True
    return read(image, half), read(image, ~half)
