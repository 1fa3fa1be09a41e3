"""Stand-in of backend/attention.py: the attention functions by name (sage and flash have no backward)."""

import torch


def attention_pytorch(q, k, v, heads, mask=None, **kwargs):
    b, n, d = q.shape
    q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, d)


def attention_sage(q, k, v, heads, mask=None, **kwargs):
    with torch.no_grad():  # a fused kernel autograd cannot see through
        return attention_pytorch(q, k, v, heads, mask)


def attention_xformers(q, k, v, heads, mask=None, **kwargs):
    return attention_pytorch(q, k, v, heads, mask)
