"""Text-to-image through any Adapter with concepts switched on (several at once, local or global locking)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Optional

import torch

from .adapter import Adapter, concept_words
from .diffusion import ddim_sample
from .hooks import Activation, Activations, KeyContexts, attach
from .train import confined_context


def key_words(adapter: Adapter, items: Sequence[Activation]) -> dict:
    """Words for the key path's encoding: a globally locked concept's word becomes its superclass's
    input embedding (repeated to the concept's n rows, so rows stay aligned); others stay as they are."""
    words = concept_words([i.concept for i in items])
    for item in items:
        if item.lock == "global":
            n = item.concept.embedding[""].shape[0]
            words[item.concept.token] = {
                k: v.repeat(n, 1) for k, v in adapter.word_embedding(item.concept.superclass).items()
            }
    return words


@torch.no_grad()
def generate(
    adapter: Adapter,
    prompts: list[str],
    items: Sequence[Activation] = (),
    *,
    latent_shape: tuple[int, ...],
    seed: int = 0,
    steps: int = 25,
    guidance: float = 2.0,
    eta: float = 1.0,
    projection: str = "approximate",
    negative: str = "",
    words: Optional[Mapping] = None,
    confine: bool = False,
) -> torch.Tensor:
    """Images [n, 3, R, R] in [-1, 1] for `prompts` (DDIM, classifier-free guidance, noise from `seed`).

    words: more {word: embedding} for the text encoder beyond the active concepts' (e.g. a concept's
    embedding alone, as textual inversion); confine: every row but the concept words' own from the prompt
    with each concept word as its superclass (for concepts trained with TrainConfig.confine)."""
    hooks = attach(adapter.diffusion_model, context_dim=adapter.context_dim)
    cond, rows = adapter.encode(prompts, {**(words or {}), **concept_words([i.concept for i in items])})
    if confine and items:
        twin_words = key_words(adapter, [replace(i, lock="global") for i in items])
        cond = confined_context(cond, adapter.encode(prompts, twin_words)[0], rows)
    uncond, _ = adapter.encode([negative] * len(prompts))
    key_context = None
    if any(i.lock == "global" for i in items):
        key_context = KeyContexts()
        key_context.add(cond, adapter.encode(prompts, key_words(adapter, items))[0])
    hooks.activate(Activations(list(items), projection, key_context))
    try:
        latents = ddim_sample(
            adapter.apply_model,
            adapter.alphas_cumprod,
            cond,
            uncond,
            (len(prompts), *latent_shape),
            adapter.prediction,
            steps=steps,
            eta=eta,
            guidance=guidance,
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        hooks.clear()
    return adapter.decode_latents(latents).clamp(-1, 1)
