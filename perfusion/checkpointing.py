"""Gradient checkpointing of a U-Net's blocks that keeps gradients flowing to the concept's tensors.

The ldm U-Net's own `use_checkpoint` passes only the block's parameters to its checkpoint function, so
tensors a hook brings in (the concept's values, keys, embedding) would get no gradient. Here each
block of `input_blocks`, `middle_block`, `output_blocks` (ldm and Forge U-Nets) runs under
torch.utils.checkpoint's non-reentrant mode, which tracks every tensor used in the recomputation.
Activations inside a block are recomputed in the backward pass: memory for speed (about one more
forward). Hooks must not change between a forward and its backward (the trainer activates them once
per micro-step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The blocks to checkpoint; a clear error for a U-Net of another layout."""
    if not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise TypeError(
            f"gradient checkpointing needs an ldm-style U-Net (input_blocks, middle_block, "
            f"output_blocks); {type(unet).__name__} has another layout"
        )
    return [*unet.input_blocks, unet.middle_block, *unet.output_blocks]


@contextmanager
def checkpointed_blocks(unet: nn.Module) -> Iterator[None]:
    """Inside: every block's forward is checkpointed while gradients are enabled (no-grad passes, such as
    previews, run as usual). Restored on exit."""
    blocks = unet_blocks(unet)

    def wrap(block: nn.Module):
        plain = block.forward

        def forward(*args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(plain, *args, use_reentrant=False, **kwargs)
            return plain(*args, **kwargs)

        return forward

    for block in blocks:
        block.forward = wrap(block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
