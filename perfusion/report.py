"""Overfitting report for a trained concept (the two measures of Infusion, arXiv 2404.14007).

- drift (concept-agnostic): mean squared difference of the denoiser's prediction with and without the
  concept switched on, for prompts that do NOT mention it, on the same noisy latents and timesteps
  (a Monte-Carlo "latent Fisher divergence"). Also relative to the base prediction's mean square.
- narrowness (concept-specific): 2-Wasserstein distance between Gaussian fits of image features of
  the concept's generations and of the base model's generations of its superclass.
See docs/overfitting-report.md for exactly what is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .adapter import Adapter
from .concept import Concept
from .diffusion import q_sample
from .generate import generate, key_words
from .hooks import Activation, Activations, KeyContexts, attach

NEUTRAL_PROMPTS = (
    "a photo of a dog",
    "a red car on a street",
    "a bowl of fruit on a table",
    "a mountain landscape",
    "a portrait of a woman",
    "a cat sleeping on a sofa",
    "a city at night",
    "a wooden chair",
)


@dataclass
class Report:
    drift_mse: float
    drift_relative: float
    narrowness_w2: float
    baseline_w2: float
    samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def gaussian_w2(a: torch.Tensor, b: torch.Tensor, ridge: float = 1e-6) -> float:
    """2-Wasserstein distance between Gaussian fits of feature sets a [n, f] and b [m, f] (float64).

    W2^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = torch.eye(a.shape[1], dtype=torch.float64) * ridge
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1) + eye, torch.cov(b.T).reshape(b.shape[1], -1) + eye
    root_a = _sqrtm(s_a)
    cross = _sqrtm(root_a @ s_b @ root_a)
    w2 = (mu_a - mu_b).square().sum() + (s_a + s_b - 2 * cross).trace()
    return float(w2.clamp(min=0).sqrt())


def _sqrtm(s: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Transparent image features [n, 3*8*8 + 6]: an 8x8 RGB thumbnail plus per-channel mean and std."""
    thumb = F.adaptive_avg_pool2d(images.float(), 8).flatten(1)
    return torch.cat([thumb, images.float().mean((2, 3)), images.float().std((2, 3))], 1)


@torch.no_grad()
def drift(
    adapter: Adapter,
    concept: Concept,
    beta: float,
    tau: float,
    prompts=NEUTRAL_PROMPTS,
    latent_shape: tuple[int, int, int] = (4, 64, 64),
    draws: int = 2,
    seed: int = 0,
    lock: str = "local",
) -> tuple[float, float]:
    """(mean squared prediction difference, same divided by the base prediction's mean square)."""
    hooks = attach(adapter.diffusion_model, context_dim=adapter.context_dim)
    gen = torch.Generator().manual_seed(seed)
    diff = base_sq = 0.0
    item = [Activation(concept, beta, tau, lock=lock)]
    context, _ = adapter.encode(list(prompts))
    key_context = None
    if lock == "global":
        key_context = KeyContexts()
        key_context.add(context, adapter.encode(list(prompts), key_words(adapter, item))[0])
    for _ in range(draws):
        n = len(prompts)
        x0 = torch.randn(n, *latent_shape, generator=gen).to(adapter.device) * 0.5
        t = torch.randint(adapter.alphas_cumprod.shape[0], (n,), generator=gen).to(adapter.device)
        x_t = q_sample(x0, t, torch.randn(x0.shape, generator=gen).to(x0), adapter.alphas_cumprod).to(context.dtype)
        hooks.clear()
        base = adapter.apply_model(x_t, t, context).float()
        hooks.activate(Activations(item, key_context=key_context))
        edited = adapter.apply_model(x_t, t, context).float()
        hooks.clear()
        diff += float((edited - base).square().mean())
        base_sq += float(base.square().mean())
    return diff / draws, diff / max(base_sq, 1e-12)


def overfitting_report(
    adapter: Adapter,
    concept: Concept,
    latent_shape: tuple[int, int, int],
    samples: int = 16,
    beta: Optional[float] = None,
    tau: Optional[float] = None,
    seed: int = 0,
    steps: int = 20,
    features: Callable[[torch.Tensor], torch.Tensor] = pixel_features,
    lock: str = "local",
) -> Report:
    """Both measures at the concept's suggested gate (or beta/tau), with local or global key-locking.

    baseline_w2 is the same distance between two independent sets of base-model class samples: the
    narrowness figure means something only against it.
    """
    beta = concept.beta if beta is None else beta
    tau = concept.tau if tau is None else tau
    mse, rel = drift(adapter, concept, beta, tau, latent_shape=latent_shape, seed=seed, lock=lock)
    word = concept.token
    item = [Activation(concept, beta, tau, lock=lock)]
    mine = generate(
        adapter, [f"a photo of a {word}"] * samples, item, latent_shape=latent_shape, seed=seed, steps=steps
    )
    cls = [f"a photo of a {concept.superclass}"] * samples
    base = generate(adapter, cls, latent_shape=latent_shape, seed=seed + 1, steps=steps)
    again = generate(adapter, cls, latent_shape=latent_shape, seed=seed + 2, steps=steps)
    f_mine, f_base, f_again = features(mine).cpu(), features(base).cpu(), features(again).cpu()
    return Report(mse, rel, gaussian_w2(f_mine, f_base), gaussian_w2(f_again, f_base), samples)
