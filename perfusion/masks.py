"""Object masks from the model's own cross-attention on the superclass word (no segmenter needed).

For each image: noise its latent to a mid timestep, run the base denoiser on "a photo of a
<superclass>", and average over every attn2 layer and head the attention that each latent pixel
pays to the superclass word's context row. Queries and keys are read with forward hooks on
`to_q` / `to_k`, so this works with any attention implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from .adapter import Adapter
from .dataset import by_size
from .diffusion import q_sample
from .hooks import attach


def fill_attention_masks(
    adapter: Adapter, latents: list[torch.Tensor], masks: list, superclass: str, seed: int = 0
) -> list:
    """`masks` (per image: a mask, "attention" or None) with each "attention" replaced by that image's attention
    mask [h, w]; `latents` holds each image's [C, h, w], and the images of one size go through in one batch."""
    if not any(isinstance(m, str) for m in masks):
        return list(masks)
    filled = list(masks)
    for idx in by_size(latents).values():
        found = attention_masks(adapter, torch.stack([latents[i] for i in idx]), superclass, seed=seed)
        for i, mask in zip(idx, found):
            if isinstance(filled[i], str):
                filled[i] = mask
    return filled


@torch.no_grad()
def attention_masks(
    adapter: Adapter, latents: torch.Tensor, superclass: str, timestep_fraction: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """Soft masks [N, h, w] in [0, 1] (min-max per image) for latents [N, C, h, w]."""
    hooks = attach(adapter.diffusion_model, context_dim=adapter.context_dim)
    saved = hooks.activations
    hooks.clear()
    n, _, h, w = latents.shape
    context, rows = adapter.encode([f"a photo of a {superclass}"] * n, {superclass: None})
    try:
        with QueryKeyCapture(hooks.layers) as captured:
            t = torch.full((n,), int(timestep_fraction * (adapter.alphas_cumprod.shape[0] - 1)), device=latents.device)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
            adapter.apply_model(q_sample(latents, t, noise, adapter.alphas_cumprod).to(context.dtype), t, context)
    finally:
        hooks.activate(saved)
    return min_max(captured.row_attention([[rows[superclass][0][-1]] * n], (h, w))[0]).cpu()


class QueryKeyCapture:
    """Within `with`, keeps what every cross-attention's to_q / to_k returned on the last forward (forward hooks,
    so any attention implementation works)."""

    def __init__(self, layers: dict):
        self.layers, self.store, self._handles = layers, {name: {} for name in layers}, []

    def __enter__(self) -> QueryKeyCapture:
        for name, attn in self.layers.items():
            store = self.store[name]
            self._handles.append(attn.to_q.register_forward_hook(lambda m, a, y, s=store: s.__setitem__("q", y)))
            self._handles.append(attn.to_k.register_forward_hook(lambda m, a, y, s=store: s.__setitem__("k", y)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def row_attention(
        self, rows: Sequence[Sequence[int]], size: tuple[int, int], batch: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """[m, n, h, w]: for each of the m lists rows[j] (a context row per image of the n = len(rows[j]) images
        `batch` of the captured batch, by default its first n), the attention each image's pixels pay to its row,
        averaged over heads, resized to `size` (h, w) and summed over the layers. One softmax per layer serves all
        m lists."""
        return sum(self.layer_attention(name, rows, size, batch) for name in self.layers)

    def layer_attention(
        self, name: str, rows: Sequence[Sequence[int]], size: tuple[int, int], batch: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """row_attention's [m, n, h, w] from the one layer `name`."""
        h, w = size
        index = torch.as_tensor(rows)  # [m, n]
        m, n = index.shape
        images = torch.as_tensor(list(range(n)) if batch is None else list(batch))
        attn, store = self.layers[name], self.store[name]
        q = store["q"][images.to(store["q"].device)].float()
        k = store["k"][images.to(store["k"].device)].float()
        heads = attn.heads
        q = q.reshape(n, q.shape[1], heads, -1).transpose(1, 2)  # [n, heads, hw, dh]
        k = k.reshape(n, k.shape[1], heads, -1).transpose(1, 2)  # [n, heads, rows, dh]
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # [n, heads, hw, rows]
        picked = probs.permute(0, 3, 1, 2)[torch.arange(n)[None], index.to(probs.device)].mean(2)  # [m, n, hw]
        side = int(round((picked.shape[-1] * w / h) ** 0.5))
        grid = picked.reshape(m * n, 1, picked.shape[-1] // side, side)
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).reshape(m, n, h, w)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """maps [n, h, w] scaled to [0, 1] per image."""
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp(min=1e-12)
