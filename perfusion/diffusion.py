"""Noise schedule arithmetic and a DDIM sampler (eps or v prediction), host-independent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, context) -> prediction


# A U-Net that also takes one vector per prompt (SDXL: pooled clip_g text + size embedding, its "y") gets it
# with the cross-attention rows: the vector rides on the context tensor under this attribute, so every path
# that passes a context along (sampler, trainer, previews) keeps it without knowing about it.
POOLED = "vector"


def with_pooled(context: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """`context` [B, N, d] carrying `vector` [B, k] (returned for chaining)."""
    if vector.shape[0] != context.shape[0]:
        raise ValueError(f"pooled vector for {vector.shape[0]} prompts, context for {context.shape[0]}")
    setattr(context, POOLED, vector)
    return context


def pooled(context: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-prompt vector [B, k] a context carries, or None."""
    return getattr(context, POOLED, None)


def join_contexts(*contexts: torch.Tensor) -> torch.Tensor:
    """The contexts stacked along the batch, keeping the pooled vector if every one carries it."""
    joined = torch.cat(contexts)
    vectors = [pooled(c) for c in contexts]
    return with_pooled(joined, torch.cat(vectors)) if all(v is not None for v in vectors) else joined


def _coefficients(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) shaped [B, 1, 1, 1] like `like`."""
    ac = alphas_cumprod.to(like.device)[t.long()].to(torch.float32).reshape(-1, *([1] * (like.dim() - 1)))
    return ac.sqrt(), (1 - ac).sqrt()


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a, s = _coefficients(alphas_cumprod, t, x0)
    return a * x0 + s * noise


def training_target(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str
) -> torch.Tensor:
    """What the denoiser should predict: noise (eps) or v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    if prediction == "eps":
        return noise
    a, s = _coefficients(alphas_cumprod, t, x0)
    return a * noise - s * x0


def split_prediction(
    pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a prediction at x_t."""
    a, s = _coefficients(alphas_cumprod, t, x_t)
    if prediction == "eps":
        return (x_t - s * pred) / a, pred
    return a * x_t - s * pred, s * x_t + a * pred


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    alphas_cumprod: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    shape: tuple[int, ...],
    prediction: str,
    steps: int = 25,
    eta: float = 1.0,
    guidance: float = 2.0,
    generator: Optional[torch.Generator] = None,
    x_start: Optional[torch.Tensor] = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """DDIM (eta 0 deterministic, eta 1 ancestral-like) with classifier-free guidance.

    cond/uncond: contexts [B, N, d] (uncond None: no guidance). Returns the final x0 estimate
    [B, ...] (not clipped). x_start with strength < 1 starts from a noised input
    (img2img). Noise comes from `generator` on the CPU, so results do not depend on the device.
    """
    T = alphas_cumprod.shape[0]
    first = max(1, int(round(steps * strength)))
    ts = torch.linspace(T - 1, 0, steps).round().long()[steps - first :]
    device = cond.device
    noise = lambda: torch.randn(shape, generator=generator).to(device)
    x = (
        noise()
        if x_start is None or strength >= 1
        else q_sample(x_start, ts[:1].repeat(shape[0]), noise(), alphas_cumprod)
    )
    ac = alphas_cumprod.double()
    for k, t in enumerate(ts):
        tb = t.repeat(shape[0]).to(device)
        if uncond is None or guidance == 1:
            pred = model(x, tb, cond)
        else:
            both = model(torch.cat([x, x]), torch.cat([tb, tb]), join_contexts(cond, uncond))
            c, u = both.chunk(2)
            pred = u + guidance * (c - u)
        x0, eps = split_prediction(pred, x, tb, alphas_cumprod, prediction)
        if k == len(ts) - 1:
            return x0
        a_t, a_prev = ac[t], ac[ts[k + 1]]
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        dir_xt = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        x = a_prev.sqrt().float() * x0 + dir_xt.float() * eps + sigma.float() * noise()
    return x
