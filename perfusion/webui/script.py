"""The always-visible "Perfusion" accordion in txt2img/img2img: the gate defaults for tags that give none.

Its values reach the generation on the processing object (network.set_generation_defaults in process,
read by the extra network's activate), are written to the infotext when the prompt has tags, and come back on paste and
through the API's `alwayson_scripts` ({"perfusion": {"args": [enabled, beta, tau, lock, projection, composition]}};
a shorter list leaves the rest at the settings').
"""

from __future__ import annotations

from typing import Any

from modules import scripts

from ..options import BETA, BETA_RANGE, COMPOSITIONS, LOCK_CHOICES, PROJECTIONS, TAU, TAU_RANGE
from . import infotext, network
from .network import defaults_from_settings
from .resolve import Defaults


class PerfusionScript(scripts.Script):
    def title(self) -> str:
        return "Perfusion"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        import gradio as gr

        d = defaults_from_settings()
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion("Perfusion", open=False, elem_id=f"perfusion_{tab}_accordion"):
            with gr.Row():
                enabled = gr.Checkbox(
                    value=True, label="Apply <perfusion:...> tags", elem_id=f"perfusion_{tab}_enabled"
                )
                lock = gr.Radio(list(LOCK_CHOICES), value=d.lock, label="Key locking", elem_id=f"perfusion_{tab}_lock")
                composition = gr.Radio(
                    list(COMPOSITIONS),
                    value=d.composition,
                    label="Several concepts",
                    elem_id=f"perfusion_{tab}_composition",
                )
                projection = gr.Radio(
                    list(PROJECTIONS),
                    value=d.projection,
                    label="Projection (together)",
                    elem_id=f"perfusion_{tab}_projection",
                    visible=d.composition == "together",
                )
                # Projection joins several concepts' edits in one prompt: with regional composition each pass
                # has one concept, so it only shows while `together` is picked (also when pasted or reloaded).
                composition.change(
                    _projection_shown, inputs=[composition], outputs=[projection], show_progress="hidden"
                )
            with gr.Row():
                beta = gr.Slider(
                    minimum=BETA_RANGE[0],
                    maximum=BETA_RANGE[1],
                    step=0.01,
                    value=d.beta,
                    label="Gate bias beta",
                    elem_id=f"perfusion_{tab}_beta",
                )
                tau = gr.Slider(
                    minimum=TAU_RANGE[0],
                    maximum=TAU_RANGE[1],
                    step=0.01,
                    value=d.tau,
                    label="Gate temperature tau",
                    elem_id=f"perfusion_{tab}_tau",
                )
        pasted = lambda key, cast: (lambda params: _pasted(params, key, cast))  # noqa: E731
        self.infotext_fields = [
            (enabled, lambda params: True if infotext.DEFAULTS in params else None),
            (beta, pasted("beta", float)),
            (tau, pasted("tau", float)),
            (lock, pasted("lock", str)),
            (projection, pasted("projection", str)),
            (composition, pasted("composition", str)),
        ]
        self.paste_field_names = [infotext.DEFAULTS]
        return [enabled, beta, tau, lock, projection, composition]

    def process(
        self,
        p: Any,
        enabled: bool = True,
        beta: float = BETA,
        tau: float = TAU,
        lock: str = "auto",
        projection: str = "approximate",
        composition: str = "",
        *rest: Any,
    ) -> None:
        settings = defaults_from_settings()
        d = Defaults(
            bool(enabled),
            _gate_value(p, "beta", beta, BETA_RANGE, settings.beta),
            _gate_value(p, "tau", tau, TAU_RANGE, settings.tau),
            lock if lock in LOCK_CHOICES else settings.lock,
            projection if projection in PROJECTIONS else settings.projection,
            composition if composition in COMPOSITIONS else settings.composition,
        )
        network.set_generation_defaults(p, d)  # written to the infotext only when a concept is applied

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        network.feed_global_lock(p, kwargs.get("c"))
        network.feed_regional(p, kwargs.get("c"))

    def postprocess_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        network.check_regional(p)


def _projection_shown(composition: str) -> Any:
    import gradio as gr

    return gr.update(visible=composition == "together")


def _gate_value(p: Any, name: str, value: Any, allowed: tuple[float, float], fallback: float) -> float:
    """A slider's (or alwayson_scripts') value when it is a number in the range tags accept, else the
    setting's, with a warning (a tau of 0 or NaN would otherwise drop every concept without a word)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if allowed[0] <= number <= allowed[1]:
        return number
    network.warn(
        p,
        f"the accordion's {name} {value!r} is not a number in {allowed[0]}..{allowed[1]}; "
        f"using the setting's {fallback:g}",
    )
    return fallback


def _pasted(params: dict, key: str, cast) -> Any:
    value = infotext.parse_defaults(params.get(infotext.DEFAULTS)).get(key)
    if value is None:
        return None
    try:
        return cast(value)
    except ValueError:
        return None
