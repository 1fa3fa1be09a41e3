"""Regional composition in the WebUI: two or more concepts in one prompt, each drawn from its own clause inside the
region where the base model's attention puts its superclass word (perfusion.regional; docs/world.md has the
measurements that made it the default).

`start` puts a RegionalComposition on the U-Net in place of the concepts' activations (activate); `feed` tells it,
before every sampling pass (the first and the hires fix), which context tensors of the batch's conditioning are
prompts with concepts and what runs in their place. Prompt schedules and AND sub-prompts each give one context
tensor; each is handled on its own text: a sub-prompt with one concept applies it as usual, one with none runs as
the bare model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..hooks import Activation, Hooks
from ..regional import RegionalComposition, plan_twins
from . import host
from .adapter import prompt_tokenizer, word_rows_in
from .state import runtime


def start(hooks: Hooks, items: Sequence[Activation], projection: str, regions: str, blend: str) -> RegionalComposition:
    """Put a RegionalComposition of `items` on the U-Net (regions: options.RegionSource, blend:
    options.RegionBlend; the settings)."""
    stop()
    runtime.regional = RegionalComposition(hooks, items, projection, model=hooks.model, regions=regions, blend=blend)
    return runtime.regional


def stop() -> None:
    if runtime.regional is not None:
        runtime.regional.detach()
    runtime.regional = None


def entry_texts(prompts: list[str], steps: int, hires_steps: Optional[int]) -> list[str]:
    """The text behind every context tensor of the WebUI's multi-conditioning of `prompts`, in host.cond_tensors'
    order: per image, per AND sub-prompt, per schedule entry."""
    from modules import prompt_parser

    res_indexes, flat, _ = prompt_parser.get_multicond_prompt_list(prompts)
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules(
        flat, steps, hires_steps, host.webui_option("use_old_scheduling", False)
    )
    return [text for indexes in res_indexes for index, _ in indexes for _, text in schedules[index]]


def feed(p: Any, cond: Any) -> int:
    """Register the batch's context tensors that hold concept words with their twins; returns how many were
    registered. Called right before each sampling pass with that pass's conditioning."""
    composition = runtime.regional
    model = host.sd_model()
    if composition is None or model is None or cond is None:
        return 0
    composition.clear()
    texts = entry_texts(*host.sampling_pass(p))
    # [N, d] each (A1111 keeps one per schedule entry; a batched [B, N, d] is B of them)
    originals = [row for t in host.cond_tensors(cond) for row in t.reshape(-1, *t.shape[-2:])]
    if len(texts) != len(originals):
        raise ValueError(f"{len(originals)} conditioning tensors for {len(texts)} prompt texts")
    items = composition.items
    plans = [(original, plan) for text, original in zip(texts, originals) if (plan := plan_twins(text, items))]
    if not plans:
        return 0
    wanted = sorted({t for _, plan in plans for t in plan.texts()})
    encoded = dict(zip(wanted, _encode(p, model, wanted)))
    tokenizer = prompt_tokenizer(model)
    superclasses = {i.concept.superclass for i in items}
    for original, plan in plans:
        base_rows = {s: word_rows_in(tokenizer, plan.base, s, False) for s in superclasses} if len(plan.own) > 1 else {}
        composition.add(original[None], [plan.twins(encoded, base_rows, items)])
    return len(composition.pairs)


@torch.no_grad()
def _encode(p: Any, model: Any, texts: list[str]) -> list[torch.Tensor]:
    """The WebUI's conditioning of each text (emphasis, CLIP skip, the concepts' words registered): [N, d] each."""
    from modules.prompt_parser import SdConditioning

    with host.text_engine_notes_kept():
        cond = model.get_learned_conditioning(SdConditioning(texts, width=p.width, height=p.height))
    (tensor,) = list(host.cond_tensors(cond))
    return list(tensor)


def missed() -> bool:
    """Prompts with concepts were registered for this batch but no U-Net call carried them: the sampler (or another
    extension) changed the conditioning on its way to the U-Net, and the concepts were not drawn."""
    composition = runtime.regional
    return composition is not None and bool(composition.pairs) and composition.composed == 0
