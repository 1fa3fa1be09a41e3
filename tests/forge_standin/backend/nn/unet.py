"""Stand-in of backend/nn/unet.py where training meets it: the transformer block's order of operations with its
in-place residual adds (`x += n` after a LayerNorm saved x for backward), and the module-level
`attention_function` (the backend's choice at import) that every CrossAttention calls. `neo_blocks(unet)` gives an
ldm U-Net these forwards."""

import torch
from ldm.modules.attention import BasicTransformerBlock as LdmBlock
from ldm.modules.attention import CrossAttention as LdmAttention

from backend.attention import attention_pytorch

attention_function = attention_pytorch


class CrossAttention(LdmAttention):
    def forward(self, x, context=None, value=None, mask=None, transformer_options=None):
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(context if value is None else value)
        return self.to_out(attention_function(q, k, v, self.heads, mask))


class BasicTransformerBlock(LdmBlock):
    def forward(self, x, context=None, transformer_options=None):
        n = self.norm1(x)
        n = self.attn1(n, context=context if self.disable_self_attn else None)
        x += n
        n = self.norm2(x)
        n = self.attn2(n, context=context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


def neo_blocks(unet) -> None:
    """Neo's forward order in every transformer block, its plain GroupNorm, and its timestep embedding cast to
    the input's dtype (`timestep_embedding(...).to(x.dtype)`): the U-Net computes in fp16/bf16 when its weights
    are."""
    for module in unet.modules():
        if type(module) is LdmBlock:
            module.__class__ = BasicTransformerBlock
        elif type(module) is LdmAttention:  # q, k, v through the backend's chosen attention function
            module.__class__ = CrossAttention
        elif isinstance(module, torch.nn.GroupNorm):  # ldm's GroupNorm32 computes in fp32, Neo's in the input's
            module.__class__ = torch.nn.GroupNorm
    unet.time_embed.register_forward_pre_hook(lambda m, args: (args[0].to(m[0].weight.dtype),))
