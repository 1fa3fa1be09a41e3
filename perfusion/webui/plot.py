"""The loss curve of a training run as a small PNG (PIL only), for the training tab."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (480, 160)
MARGIN = 24


def read_losses(path: Path) -> list[tuple[int, float, float]]:
    """(step, loss, smoothed) rows of a trainer's `NAME.loss.csv`; [] when it is missing or empty."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [(int(r["step"]), float(r["loss"]), float(r["smoothed_loss"])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []


def loss_png(rows: list[tuple[int, float, float]]) -> bytes:
    """PNG bytes: raw loss in light grey, smoothed loss in blue, step on x, min..max loss on y."""
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    if len(rows) >= 2:
        steps = [r[0] for r in rows]
        values = [v for r in rows for v in r[1:]]
        lo, hi = min(values), max(values)
        span_x, span_y = max(1, steps[-1] - steps[0]), (hi - lo) or 1.0

        def xy(step: int, value: float) -> tuple[float, float]:
            return (
                MARGIN + (step - steps[0]) / span_x * (SIZE[0] - 2 * MARGIN),
                SIZE[1] - MARGIN - (value - lo) / span_y * (SIZE[1] - 2 * MARGIN),
            )

        draw.line([xy(r[0], r[1]) for r in rows], fill=(190, 190, 190), width=1)
        draw.line([xy(r[0], r[2]) for r in rows], fill=(30, 90, 200), width=2)
        draw.text((MARGIN, 4), f"loss {hi:.4f} .. {lo:.4f}, steps {steps[0]}-{steps[-1]}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def loss_html(path: Path) -> str:
    """An <img> with the curve inlined (empty when there is nothing to plot)."""
    rows = read_losses(path)
    if len(rows) < 2:
        return ""
    return f'<img alt="loss" src="data:image/png;base64,{base64.b64encode(loss_png(rows)).decode()}">'
