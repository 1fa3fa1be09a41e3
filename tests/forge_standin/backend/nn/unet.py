"""Stand-in of backend/nn/unet.py where training meets it: the transformer block's order of operations with its
in-place residual adds (`x += n` after a LayerNorm saved x for backward), and the module-level
`attention_function` the backend chose at import. `neo_blocks(unet)` gives an ldm U-Net's blocks this forward."""

from ldm.modules.attention import BasicTransformerBlock as LdmBlock

from backend.attention import attention_pytorch

attention_function = attention_pytorch


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
    for module in unet.modules():
        if type(module) is LdmBlock:
            module.__class__ = BasicTransformerBlock
