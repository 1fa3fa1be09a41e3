"""Concepts onto a ComfyUI MODEL: object patches that swap each cross-attention to_k/to_v forward.

The patcher applies object patches to the shared U-Net when the clone is loaded and restores them when
another one is, so the input MODEL keeps its output (as a LoRA's clone does). The swapped forward calls the
module's own forward (ComfyUI's cast or offloaded Linear, weight patches included) and then the engine's edit.
With several concepts composed region by region, the U-Net's own forward is swapped too: a ComposedForward that
runs the engine's RegionalComposition around it (the prompts registered by the loader's CLIP, text.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Optional

import torch

from ..hooks import Activation, Activations, Editor, KeyContexts, find_cross_attention
from ..options import REGION_BLEND, REGION_SOURCE, Composition, Projection, RegionBlend, RegionSource
from ..regional import RegionalComposition

log = logging.getLogger("perfusion")
UNET = "diffusion_model"  # the U-Net's attribute on the patcher's model (comfy.model_base.BaseModel)


class PatchedForward:
    """What one to_k ("k") or to_v ("v") runs while the clone is loaded: `original`, then the edit."""

    def __init__(self, editor: Editor, layer: str, kind: str, original: Callable[..., torch.Tensor]):
        self.editor, self.layer, self.kind, self.original = editor, layer, kind, original

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.kind == "k":
            replaced = self.editor.key_input(x)
            x = x if replaced is None else replaced
        y = self.original(x, *args, **kwargs)
        edited = self.editor.edit(self.layer, self.kind, self.original, x, y)
        return y if edited is None else edited


class ComposedForward:
    """What the U-Net's forward runs while the clone is loaded: `original`, composed region by region."""

    def __init__(self, composition: RegionalComposition, original: Callable[..., torch.Tensor]):
        self.composition, self.original = composition, original
        self.warned = False

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if not self.composition.pairs and not self.warned:
            self.warned = True
            log.warning(
                "Perfusion: no prompt naming the concepts was encoded with the last concept loader's CLIP, so they "
                "are not drawn; connect that CLIP to the text encode nodes"
            )
        return self.composition(self.original, *args, **kwargs)


class ComposedLayer:
    """What a cross-attention layer's forward runs while the clone is loaded: `original`, blended by the
    composition where it composes a call by attention (RegionalComposition.layer_forward)."""

    def __init__(self, composition: RegionalComposition, layer: str, original: Callable[..., torch.Tensor]):
        self.original = original
        self.forward = composition.layer_forward(layer, original)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.forward(*args, **kwargs)


def _forward_key(layer: str, attr: str = "") -> str:
    return f"{UNET}.{layer}.{attr}.forward" if attr else f"{UNET}.{layer}.forward"


UNET_FORWARD = f"{UNET}.forward"


def layers(model: Any) -> dict[str, torch.nn.Module]:
    """The U-Net's cross-attention modules {path: attn2} (the shared ones: read, never changed here)."""
    return find_cross_attention(model.get_model_object(UNET))


def _activations(model: Any) -> Activations:
    """What the MODEL's patched forwards apply (earlier loaders put one Editor on all of them)."""
    for value in getattr(model, "object_patches", {}).values():
        if isinstance(value, PatchedForward):
            return value.editor.activations
    return Activations()


def composition(model: Any) -> Optional[RegionalComposition]:
    """The MODEL's regional composition (several concepts, composed region by region), if any."""
    patched = getattr(model, "object_patches", {}).get(UNET_FORWARD)
    return patched.composition if isinstance(patched, ComposedForward) else None


def applied(model: Any) -> list[Activation]:
    """The concepts a MODEL already applies (put there by earlier loaders), in order."""
    composed = composition(model)
    return list(composed.items) if composed is not None else list(_activations(model).items)


def key_contexts(model: Any) -> Optional[KeyContexts]:
    """The (prompt, superclass twin) pairs the MODEL's globally locked concepts read, if any."""
    return _activations(model).key_context


def with_concepts(
    model: Any,
    added: list[Activation],
    projection: Projection = "approximate",
    contexts: Optional[KeyContexts] = None,
    compose: Composition = "together",
    limit: Optional[int] = None,
    regions: RegionSource = REGION_SOURCE,
    blend: RegionBlend = REGION_BLEND,
) -> Any:
    """A clone of `model` applying its concepts and `added` (an added concept whose word is already applied
    replaces it): in one edit, or with compose "regional" and two or more concepts, region by region (the clone's
    `composition(clone)` then takes the prompts; `limit` caps how many it keeps; `regions` and `blend` as
    RegionalComposition's). Validated first:
    ConceptMismatch names a concept that does not fit, and nothing is cloned. `model` itself is not changed."""
    found = layers(model)
    words = {a.concept.token.lower() for a in added}
    prior = [a for a in applied(model) if a.concept.token.lower() not in words]
    items = prior + list(added)
    if not any(a.lock == "global" for a in items):
        contexts = None
    composed = None
    if compose == "regional" and len(items) > 1:
        editor = Editor(found, Activations([], projection), cache_rows=False)
        composed = RegionalComposition(editor, items, projection, limit=limit, regions=regions, blend=blend)
    else:
        editor = Editor(found, Activations(items, projection, contexts), cache_rows=False)
    clone = model.clone()
    current = model.get_model_object(UNET_FORWARD)
    unet_forward = current.original if isinstance(current, ComposedForward) else current
    if composed is not None:
        clone.add_object_patch(UNET_FORWARD, ComposedForward(composed, unet_forward))
    elif isinstance(current, ComposedForward):  # the chain composed so far; this loader applies them together
        del clone.object_patches[UNET_FORWARD]
    for layer in found:
        key = _forward_key(layer)
        current = model.get_model_object(key)
        original = current.original if isinstance(current, ComposedLayer) else current
        if composed is not None:
            clone.add_object_patch(key, ComposedLayer(composed, layer, original))
        elif isinstance(current, ComposedLayer):
            del clone.object_patches[key]
        for kind, attr in (("k", "to_k"), ("v", "to_v")):
            key = _forward_key(layer, attr)
            current = model.get_model_object(key)
            original = current.original if isinstance(current, PatchedForward) else current
            clone.add_object_patch(key, PatchedForward(editor, layer, kind, original))
    return clone
