"""The loss curve of a training run as a small SVG (text in the browser's own font), for the training tab."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

SIZE = (560, 220)  # px
PLOT = (64, 16, 544, 180)  # the axes' box in px: left, top, right, bottom (room for tick labels and a legend)
RAW, SMOOTHED = "#b4b4b4", "#1e5ac8"


def read_losses(path: Path) -> list[tuple[int, float, float]]:
    """(step, loss, smoothed) rows of a trainer's `NAME.loss.csv`; [] when it is missing or empty."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [(int(r["step"]), float(r["loss"]), float(r["smoothed_loss"])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """n + 1 evenly spaced values from lo to hi."""
    return [lo + (hi - lo) * k / n for k in range(n + 1)]


def loss_svg(rows: list[tuple[int, float, float]]) -> str:
    """SVG text: raw loss in light grey, smoothed loss in blue, step on x, loss on y, labelled ticks and a legend."""
    left, top, right, bottom = PLOT
    steps = [r[0] for r in rows]
    values = [v for r in rows for v in r[1:]]
    lo, hi = min(values), max(values)
    span_x, span_y = max(1, steps[-1] - steps[0]), (hi - lo) or 1.0

    def x(step: float) -> float:
        return left + (step - steps[0]) / span_x * (right - left)

    def y(value: float) -> float:
        return bottom - (value - lo) / span_y * (bottom - top)

    def line(column: int, colour: str, width: float) -> str:
        points = " ".join(f"{x(r[0]):.1f},{y(r[column]):.1f}" for r in rows)
        return f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="{width}"/>'

    parts = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#888"/>']
    for value in _ticks(lo, hi):
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
    for step in sorted({round(s) for s in _ticks(steps[0], steps[-1])}):
        parts.append(f'<text x="{x(step):.1f}" y="{bottom + 16}" text-anchor="middle">{step}</text>')
    parts += [
        line(1, RAW, 1),
        line(2, SMOOTHED, 2),
        f'<text x="{(left + right) / 2}" y="{SIZE[1] - 4}" text-anchor="middle">step</text>',
        f'<text x="{right}" y="{top - 4}" text-anchor="end"><tspan fill="{SMOOTHED}">smoothed loss</tspan>'
        f' <tspan fill="#777">loss</tspan></text>',
    ]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE[0]}" height="{SIZE[1]}" '
        f'viewBox="0 0 {SIZE[0]} {SIZE[1]}" font-family="sans-serif" font-size="13" fill="#222">'
        f'<rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>'
    )


def loss_html(path: Path) -> str:
    """An <img> with the curve inlined (empty when there is nothing to plot)."""
    rows = read_losses(path)
    if len(rows) < 2:
        return ""
    data = base64.b64encode(loss_svg(rows).encode()).decode()
    return f'<img alt="loss curve" src="data:image/svg+xml;base64,{data}">'
