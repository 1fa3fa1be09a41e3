"""Axes for the WebUI's X/Y/Z plot script: sweep the gate (beta, tau), the key locking, the projection, the
composition of several concepts, where its regions come from and how they are blended, and the concept itself.

A gate axis value applies to every concept of the prompt and wins over the tags' own values (a sweep must
show what it sweeps); it reaches the generation on the processing object, read by network._apply. The
concept axis rewrites the prompt, as the script's own Prompt S/R does.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..concept import ConceptError
from ..options import COMPOSITIONS, LOCK_CHOICES, PROJECTIONS, REGION_BLENDS, REGION_SOURCES
from . import network, state
from .tags import NO_CONCEPT, swap_concept

LABEL = "[Perfusion]"
XYZ_MODULES = ("xyz_grid.py",)  # the built-in script's module name as the WebUI loads it (A1111, reForge, Forge)


def _library_word_of(name: str) -> tuple[str, str]:
    library = state.library()
    entry = library.find(name)
    if entry is None:
        raise ValueError(f"{LABEL} concept: no concept named '{name}' in the concepts folder")
    try:
        concept = library.load(entry)
    except ConceptError as e:
        raise ValueError(f"{LABEL} concept '{name}': {e}") from None
    return concept.token, concept.superclass


def _set(p: Any, x: Any, xs: Any, *, field: str) -> None:
    network.override(p, field, x)


def _set_concept(p: Any, x: str, xs: Any) -> None:
    p.prompt = swap_concept(p.prompt, x, _library_word_of)
    if getattr(p, "hr_prompt", ""):  # a separate hires-fix prompt names the concept too
        p.hr_prompt = swap_concept(p.hr_prompt, x, _library_word_of)


def _confirm_concepts(p: Any, xs: list[str]) -> None:
    """Before the grid starts: every value names a usable concept and the prompt has a tag to swap."""
    for x in xs:
        swap_concept(p.prompt, x, _library_word_of)


def _concept_choices() -> list[str]:
    """The axis's dropdown (the script asks again on its refresh button): the folder as it is now."""
    library = state.library()
    library.refresh()
    return [NO_CONCEPT, *sorted(library.entries, key=str.lower)]


def add_axes() -> None:
    """on_before_ui: add the axes once (also after "Reload UI"); nothing when the X/Y/Z script is absent."""
    from modules import scripts

    xyz = next((s.module for s in scripts.scripts_data if s.script_class.__module__ in XYZ_MODULES), None)
    if xyz is None or any(o.label.startswith(LABEL) for o in xyz.axis_options):
        return
    xyz.axis_options.extend(
        [
            xyz.AxisOption(f"{LABEL} concept", str, _set_concept, confirm=_confirm_concepts, choices=_concept_choices),
            xyz.AxisOption(f"{LABEL} beta", float, partial(_set, field="beta")),
            xyz.AxisOption(f"{LABEL} tau", float, partial(_set, field="tau")),
            xyz.AxisOption(f"{LABEL} lock", str, partial(_set, field="lock"), choices=lambda: list(LOCK_CHOICES)),
            xyz.AxisOption(
                f"{LABEL} projection", str, partial(_set, field="projection"), choices=lambda: list(PROJECTIONS)
            ),
            xyz.AxisOption(
                f"{LABEL} composition", str, partial(_set, field="composition"), choices=lambda: list(COMPOSITIONS)
            ),
            xyz.AxisOption(
                f"{LABEL} regions", str, partial(_set, field="regions"), choices=lambda: list(REGION_SOURCES)
            ),
            xyz.AxisOption(f"{LABEL} blend", str, partial(_set, field="blend"), choices=lambda: list(REGION_BLENDS)),
        ]
    )
