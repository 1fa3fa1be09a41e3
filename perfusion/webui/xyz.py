"""Axes for the WebUI's X/Y/Z plot script: sweep the gate (beta, tau), the key locking and the projection.

An axis value applies to every concept of the prompt and wins over the tags' own values (a sweep must
show what it sweeps); it reaches the generation on the processing object, read by network._apply.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..options import LOCK_CHOICES, PROJECTIONS
from . import network

LABEL = "[Perfusion]"
XYZ_MODULES = ("xyz_grid.py",)  # the built-in script's module name as the WebUI loads it (A1111, reForge, Forge)


def _set(p: Any, x: Any, xs: Any, *, field: str) -> None:
    network.override(p, field, x)


def add_axes() -> None:
    """on_before_ui: add the axes once (also after "Reload UI"); nothing when the X/Y/Z script is absent."""
    from modules import scripts

    xyz = next((s.module for s in scripts.scripts_data if s.script_class.__module__ in XYZ_MODULES), None)
    if xyz is None or any(o.label.startswith(LABEL) for o in xyz.axis_options):
        return
    xyz.axis_options.extend(
        [
            xyz.AxisOption(f"{LABEL} beta", float, partial(_set, field="beta")),
            xyz.AxisOption(f"{LABEL} tau", float, partial(_set, field="tau")),
            xyz.AxisOption(f"{LABEL} lock", str, partial(_set, field="lock"), choices=lambda: list(LOCK_CHOICES)),
            xyz.AxisOption(
                f"{LABEL} projection", str, partial(_set, field="projection"), choices=lambda: list(PROJECTIONS)
            ),
        ]
    )
