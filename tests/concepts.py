"""Random but well-formed concepts and covariances for tests (never zeros)."""

from __future__ import annotations

import torch

from perfusion import Concept, gate_direction

# SD1.x attn2 layers (ldm naming) and their output widths: 5 x 320, 5 x 640, 6 x 1280.
SD1_LAYERS = {
    **{
        f"input_blocks.{i}.1.transformer_blocks.0.attn2": w
        for i, w in ((1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280))
    },
    "middle_block.1.transformer_blocks.0.attn2": 1280,
    **{
        f"output_blocks.{i}.1.transformer_blocks.0.attn2": w
        for i, w in ((3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640), (9, 320), (10, 320), (11, 320))
    },
}


def random_covariance(d: int, seed: int = 0) -> torch.Tensor:
    """An SPD [d, d] float64 matrix shaped like an encoding covariance (a few strong directions + noise)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, 2 * d, dtype=torch.float64)
    return (basis * scales) @ basis.T / (2 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)


def encodings(n: int, d: int, seed: int) -> torch.Tensor:
    """[n, d] float32 rows with CLIP-like magnitudes (norm ~ 10-30)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * (0.4 + torch.rand(n, 1, generator=g))).float()


def make_concept(
    layers: dict[str, int],
    d: int,
    cov: torch.Tensor,
    seed: int = 0,
    *,
    token: str = "hugsy",
    superclass: str = "teddy",
    method: str = "perfusion",
    arch: str = "other",
    with_keys: bool = False,
    beta: float = 0.7,
    tau: float = 0.15,
) -> Concept:
    """A concept for a model with `layers` {attn2 path: d_out} reading d-wide context."""
    g = torch.Generator().manual_seed(1000 + seed)
    i_super = encodings(1, d, seed + 7)[0]
    i_star = i_super + 0.3 * encodings(1, d, seed + 11)[0]
    a, energy = gate_direction(i_star.double(), torch.linalg.solve(cov, i_star.double()))
    emb = {"": torch.randn(1, d if arch != "sd1" else 768, generator=g)}
    values = {name: torch.randn(w, generator=g) for name, w in layers.items()}
    keys = {name: torch.randn(w, generator=g) for name, w in layers.items()} if with_keys else {}
    return Concept(
        token=token,
        superclass=superclass,
        embedding=emb,
        i_star=i_star,
        a=a.float(),
        energy=energy.float(),
        i_super=i_super,
        values=values,
        keys=keys,
        method=method,
        arch=arch,
        beta=beta,
        tau=tau,
        steps=400,
        name=token,
    )


def layer_widths(unet) -> dict[str, int]:
    """{attn2 path: to_v out_features} of a model's cross-attention."""
    from perfusion import find_cross_attention

    return {name: m.to_v.out_features for name, m in find_cross_attention(unet).items()}
