"""Regional composition: several concepts in one image, each drawn from its own prompt inside its own region.

Applied together in one prompt, a concept's look travels on the context rows after its word (a causal text
encoder computes them from the learned embedding) to the other objects, and its own object loses it
(docs/world.md). Here every sampling step runs
  * the base prompt: every concept word replaced by its superclass word, no edit (the layout and the other
    objects, as the base model draws words), whose cross-attention on each superclass word locates that
    concept's object: a soft mask M_k, the running mean over the steps so far, min-max per image;
  * each concept's own prompt (e.g. "a hugsy at the left on a gray background"), its edit on;
and blends the guided predictions: pred = (1 - sum M_k) pred_base + sum M_k pred_k (sum M_k capped at 1).
No layout is asked of the user: the base model's own attention places each object.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapter import Adapter, concept_words
from .diffusion import ddim_sample, join_contexts
from .hooks import Activation, attach
from .masks import QueryKeyCapture, min_max


@dataclass(frozen=True)
class Region:
    """One concept of a regional composition: its activation and, per image, its own prompt."""

    item: Activation
    prompts: list[str]


def blend(base: torch.Tensor, own: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1 - sum M_k) base + sum M_k own_k for predictions [n, C, h, w] and masks [n, h, w] in [0, 1]; where the
    masks add up to more than 1 they are scaled down to sum 1."""
    total = torch.stack(list(masks)).sum(0)
    scale = 1 / total.clamp(min=1)
    out = base * (1 - total * scale)[:, None]
    for pred, mask in zip(own, masks):
        out = out + pred * (mask * scale)[:, None]
    return out


def base_prompts(prompts: list[str], regions: Sequence[Region]) -> list[str]:
    """The prompts with every region's concept word (whole words, any case) replaced by its superclass word."""
    out = []
    for text in prompts:
        for r in regions:
            c = r.item.concept
            text = re.sub(rf"(?<!\w){re.escape(c.token)}(?!\w)", c.superclass, text, flags=re.IGNORECASE)
        out.append(text)
    return out


def mask_rows(adapter: Adapter, prompts: list[str], bases: list[str], regions: Sequence[Region]) -> list[list[int]]:
    """Per region, per image: the base prompt's row of the superclass word that stands where the region's concept
    word stood (concepts sharing a superclass take its occurrences in the order their words appear)."""
    _, own_rows = adapter.encode(prompts, concept_words([r.item.concept for r in regions]))
    _, base_rows = adapter.encode(bases, {r.item.concept.superclass: None for r in regions})
    out = [[0] * len(prompts) for _ in regions]
    for b in range(len(prompts)):
        by_class: dict[str, list[tuple[int, int]]] = {}
        for k, r in enumerate(regions):
            found = own_rows[r.item.concept.token][b]
            if not found:
                raise ValueError(
                    f"prompt {b} ({prompts[b]!r}) does not contain the concept word {r.item.concept.token!r}"
                )
            by_class.setdefault(r.item.concept.superclass, []).append((found[0], k))
        for superclass, members in by_class.items():
            rows = base_rows[superclass][b]
            for (_, k), row in zip(sorted(members), rows):
                out[k][b] = row
    return out


@torch.no_grad()
def generate_regional(
    adapter: Adapter,
    prompts: list[str],
    regions: Sequence[Region],
    *,
    latent_shape: tuple[int, ...],
    seed: int = 0,
    steps: int = 25,
    guidance: float = 2.0,
    eta: float = 1.0,
    negative: str = "",
) -> torch.Tensor:
    """Images [n, 3, R, R] in [-1, 1]: `prompts` (each holding every region's concept word) composed region by
    region (module docstring); the same sampler, noise and guidance as generate()."""
    n = len(prompts)
    if any(len(r.prompts) != n for r in regions):
        raise ValueError(f"every region needs one prompt per image ({n})")
    hooks = attach(adapter.diffusion_model, context_dim=adapter.context_dim)
    saved = hooks.activations
    bases = base_prompts(prompts, regions)
    base, _ = adapter.encode(bases)
    uncond, _ = adapter.encode([negative] * n)
    rows = mask_rows(adapter, prompts, bases, regions)
    own = [adapter.encode(r.prompts, concept_words([r.item.concept]))[0] for r in regions]
    size = tuple(latent_shape[-2:])
    # [regions, n, h, w]: the attention summed over the steps so far (min-max of the sum is min-max of the mean)
    running = torch.zeros(len(regions), n, *size, device=adapter.device)

    def guided(x, t, cond, items):
        hooks.activate(list(items))
        both = adapter.apply_model(torch.cat([x, x]), torch.cat([t, t]), join_contexts(cond, uncond))
        c, u = both.chunk(2)
        return u + guidance * (c - u)

    def denoise(x, t, _context):
        """ddim_sample's model without its own guidance: the blended guided prediction."""
        hooks.clear()
        with QueryKeyCapture(hooks.layers) as captured:
            pred_base = guided(x, t, base, [])
        running.add_(captured.row_attention(rows, size))  # the conditional half of the batch
        masks = [min_max(r) for r in running]
        preds = [guided(x, t, cond, [r.item]) for cond, r in zip(own, regions)]
        return blend(pred_base, preds, masks)

    try:
        latents = ddim_sample(
            denoise,
            adapter.alphas_cumprod,
            base,
            None,  # guidance happens inside denoise, per context
            (n, *latent_shape),
            adapter.prediction,
            steps=steps,
            eta=eta,
            generator=torch.Generator().manual_seed(seed),
        )
    finally:
        hooks.activate(saved)
    return adapter.decode_latents(latents).clamp(-1, 1)
