"""A tiny real-architecture text-to-image model behind the engine's Adapter (for trainer tests)."""

from __future__ import annotations

import torch
from models import small_text_encoder, small_unet

import perfusion
from perfusion.adapter import LdmClipAdapter
from perfusion.clip_tokenizer import load_tokenizer
from perfusion.corpus import prompt_corpus
from perfusion.covariance import adapter_encoder


def first_stage(seed: int = 0):
    """A fixed, invertible 'VAE': 2x2 space-to-depth of RGB (12 ch) mixed down to 4 latent channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(12, 12, generator=g))[0][:4]  # [4, 12] orthonormal rows

    def encode(x):
        z = torch.nn.functional.pixel_unshuffle(x, 2)
        return torch.einsum("oc,bchw->bohw", mix.to(x), z)

    def decode(z):
        return torch.nn.functional.pixel_shuffle(torch.einsum("oc,bohw->bchw", mix.to(z), z), 2)

    return encode, decode


def tiny_adapter(prediction: str = "v", seed: int = 0) -> LdmClipAdapter:
    unet = small_unet(64, seed=seed).requires_grad_(False)
    text = small_text_encoder(hidden=64, seed=seed).requires_grad_(False)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return LdmClipAdapter(
        unet, text, load_tokenizer(), torch.cumprod(1 - betas, 0), prediction, first_stage(seed), model_hash="tiny0000"
    )


def tiny_covariance(adapter: LdmClipAdapter, prompts: int = 256) -> perfusion.Covariance:
    return perfusion.build_covariance(adapter_encoder(adapter), prompt_corpus(prompts, seed=5), batch_size=128)


def pattern_images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]: coloured checkerboards with a random offset (never flat)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        shift = int(torch.randint(4, (1,), generator=g))
        check = (((yy + shift) // 4 + (xx // 4)) % 2).float()
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        out.append(colour * check + (1 - check) * -colour * 0.5 + 0.05 * torch.randn(3, size, size, generator=g))
    return torch.stack(out).clamp(-1, 1)
