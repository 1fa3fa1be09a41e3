"""Concepts onto a ComfyUI MODEL: object patches that swap each cross-attention to_k/to_v forward.

The patcher applies object patches to the shared U-Net when the clone is loaded and restores them when
another one is, so the input MODEL keeps its output (as a LoRA's clone does). The swapped forward calls the
module's own forward (ComfyUI's cast or offloaded Linear, weight patches included) and then the engine's edit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from ..hooks import Activation, Activations, Editor, KeyContexts, find_cross_attention
from ..options import Projection

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


def _forward_key(layer: str, attr: str) -> str:
    return f"{UNET}.{layer}.{attr}.forward"


def layers(model: Any) -> dict[str, torch.nn.Module]:
    """The U-Net's cross-attention modules {path: attn2} (the shared ones: read, never changed here)."""
    return find_cross_attention(model.get_model_object(UNET))


def _activations(model: Any) -> Activations:
    """What the MODEL's patched forwards apply (earlier loaders put one Editor on all of them)."""
    for value in getattr(model, "object_patches", {}).values():
        if isinstance(value, PatchedForward):
            return value.editor.activations
    return Activations()


def applied(model: Any) -> list[Activation]:
    """The concepts a MODEL already applies (put there by earlier loaders), in order."""
    return list(_activations(model).items)


def key_contexts(model: Any) -> Optional[KeyContexts]:
    """The (prompt, superclass twin) pairs the MODEL's globally locked concepts read, if any."""
    return _activations(model).key_context


def with_concepts(
    model: Any, added: list[Activation], projection: Projection = "approximate", contexts: Optional[KeyContexts] = None
) -> Any:
    """A clone of `model` applying its concepts and `added` in one edit (an added concept whose word is
    already applied replaces it). Validated first: ConceptMismatch names a concept that does not fit, and
    nothing is cloned. `model` itself is not changed."""
    found = layers(model)
    words = {a.concept.token.lower() for a in added}
    prior = [a for a in applied(model) if a.concept.token.lower() not in words]
    items = prior + list(added)
    if not any(a.lock == "global" for a in items):
        contexts = None
    editor = Editor(found, Activations(items, projection, contexts), cache_rows=False)
    clone = model.clone()
    for layer in found:
        for kind, attr in (("k", "to_k"), ("v", "to_v")):
            key = _forward_key(layer, attr)
            current = model.get_model_object(key)
            original = current.original if isinstance(current, PatchedForward) else current
            clone.add_object_patch(key, PatchedForward(editor, layer, kind, original))
    return clone
