"""The "Perfusion" section of the WebUI's settings, added at import so it exists in API-only mode too."""

from __future__ import annotations

from modules import shared

from ..options import (
    BETA,
    BETA_RANGE,
    COMPOSITION,
    COMPOSITIONS,
    LOCK_CHOICES,
    PROJECTIONS,
    REGION_BLEND,
    REGION_BLENDS,
    REGION_SOURCE,
    REGION_SOURCES,
    TAU,
    TAU_RANGE,
)
from .host import OPTION_PREFIX
from .infotext import BLEND, REGIONS

WARNING_MODES = ("UI and console", "console only")


def _gradio(name: str):
    """A gradio component class for the settings page (None where gradio is absent: tests, API tools)."""
    try:
        import gradio
    except ImportError:
        return None
    return getattr(gradio, name)


def register() -> None:
    """Add the options (idempotent: a reloaded UI re-adds the same keys)."""
    radio, slider = _gradio("Radio"), _gradio("Slider")
    options = {
        "dir": shared.OptionInfo("", "Concepts folder (empty: --perfusion-dir, else models/perfusion)"),
        "beta": shared.OptionInfo(
            BETA,
            "Default gate bias beta (higher: weaker concept, closer to the prompt)",
            slider,
            {"minimum": BETA_RANGE[0], "maximum": BETA_RANGE[1], "step": 0.01},
        ),
        "tau": shared.OptionInfo(
            TAU,
            "Default gate temperature tau",
            slider,
            {"minimum": TAU_RANGE[0], "maximum": TAU_RANGE[1], "step": 0.01},
        ),
        "lock": shared.OptionInfo(
            "auto", "Default key locking (auto: as each concept was trained)", radio, {"choices": list(LOCK_CHOICES)}
        ),
        "composition": shared.OptionInfo(
            COMPOSITION,
            "Several concepts in one prompt: regional (each from its own clause, in its own region) or together "
            "(the paper's: every concept edits the one prompt)",
            radio,
            {"choices": list(COMPOSITIONS)},
        ),
        "projection": shared.OptionInfo(
            "approximate", "Several concepts together: projection", radio, {"choices": list(PROJECTIONS)}
        ),
        "regions": shared.OptionInfo(
            REGION_SOURCE,
            "Several concepts regional: where the regions come from (places: where every concept's clause names its "
            "own, such as 'at the left' or 'in the top right corner', else the model's attention; attention: always "
            "the model's attention)",
            radio,
            {"choices": list(REGION_SOURCES)},
            infotext=REGIONS,
        ),
        "blend": shared.OptionInfo(
            REGION_BLEND,
            "Several concepts regional: how a concept's region is drawn (prediction: a pass per concept from its "
            "clause, the predictions blended, keeps each look best; attention: one pass, in which every "
            "cross-attention reads the concept's own clause inside its region, faster; auto: attention where the "
            "regions come from named places, else prediction)",
            radio,
            {"choices": list(REGION_BLENDS)},
            infotext=BLEND,
        ),
        "covariance_prompts": shared.OptionInfo(
            25000,
            "Training: prompts behind the text-encoding covariance "
            "(built once per model and CLIP skip; fewer is faster, less exact)",
            slider,
            {"minimum": 256, "maximum": 25000, "step": 256},
        ),
        "warnings": shared.OptionInfo(
            "UI and console",
            "Where warnings (unknown concept, bad file, ...) appear",
            radio,
            {"choices": list(WARNING_MODES)},
        ),
    }
    sectioned = shared.options_section(("perfusion", "Perfusion"), {OPTION_PREFIX + k: v for k, v in options.items()})
    shared.options_templates.update(sectioned)
    # opts is built before extensions load, over options_templates itself (A1111 v1.10.1): the labels are there
    # now, but not the defaults in opts.data, and an API request's override_settings is restored afterwards only
    # for keys in opts.data (otherwise it stays the server's value). add_option keeps a value already there.
    for key, info in sectioned.items():
        shared.opts.add_option(key, info)
