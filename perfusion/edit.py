"""The gated rank-1 edit of a cross-attention projection (Perfusion, Eq. 3 and its multi-concept form).

For one projection W (d_out x d_in) and concepts c with target inputs i*_c, gate directions a_c
(a_c . i*_c = 1), energies and output targets o*_c:

    s_c(e) = a_c . e                                 similarity, fp32
    g_c(e) = sigmoid((s_c(e) - beta_c) / tau_c)      gate, fp32
    out(e) = W e - sum_c x_c(e) W i*_c + sum_c g_c(e) o*_c

x = s (approximate projection), or x = G^-1 b with G_cd = energy_c a_c . i*_d and b_c = energy_c s_c
(exact C^-1-orthogonal projection of e off span{i*_c}). Infusion concepts add g_c(e) r_c only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .options import PROJECTIONS


def gate_direction(i_star: torch.Tensor, c_inv_i_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, energy) from i* [d] and C^-1 i* [d]: energy = i*^T C^-1 i*, a = C^-1 i* / energy."""
    energy = (i_star * c_inv_i_star).sum()
    return c_inv_i_star / energy, energy.reshape(1)


def similarity(e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """s = a . e in fp32: e [..., d], a [n, d] -> [..., n]."""
    return e.float() @ a.float().T


def gate(s: torch.Tensor, beta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """g = sigmoid((s - beta) / tau): s [..., n], beta and tau [n] -> [..., n]."""
    return torch.sigmoid((s - beta) / tau)


def exact_mix(a: torch.Tensor, i_star: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """M [n, n] float64 with x = s @ M the exact projection's coefficients: x = G^-1 b, b_c = energy_c s_c,
    G_cd = energy_c a_c . i*_d, so M = (G^-1 diag(energy))^T (float64 inside). Constant for a set of
    concepts: compute it once per activation, not per call. The pseudo-inverse keeps concepts with the
    same (or dependent) i* from failing the whole image."""
    a64, i64, en64 = a.double(), i_star.double(), energy.double().reshape(-1)
    gram = en64[:, None] * (a64 @ i64.T)
    return (torch.linalg.pinv(gram, hermitian=True) @ torch.diag(en64)).T


def projection_coefficients(
    s: torch.Tensor,
    a: torch.Tensor,
    i_star: torch.Tensor,
    energy: torch.Tensor,
    projection: str = "approximate",
    mix: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [..., n]: how much of each W i*_c to remove from W e.

    s [..., n] similarities; a, i_star [n, d]; energy [n]; mix: exact_mix of these concepts if already
    known. For one concept both forms equal s.
    """
    if projection == "approximate" or a.shape[0] == 1:
        return s
    if projection != "exact":
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    return s @ (exact_mix(a, i_star, energy) if mix is None else mix).to(s.dtype)


def edited_output(
    y: torch.Tensor,
    e: torch.Tensor,
    a: torch.Tensor,
    i_star: torch.Tensor,
    energy: torch.Tensor,
    w_i_star: torch.Tensor,
    targets: torch.Tensor,
    beta: torch.Tensor,
    tau: torch.Tensor,
    projected: Optional[Sequence[int]] = None,
    projection: str = "approximate",
    ungated: Optional[torch.Tensor] = None,
    mix: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The edited projection output.

    y [..., d_out] = W e (any dtype); e [..., d_in]; a, i_star [n, d_in]; energy, beta, tau [n];
    w_i_star [n, d_out] = W i*_c; targets [n, d_out] = o*_c; projected: indices of the concepts whose
    W i*_c is projected out (default all: Perfusion; the others are additive, like Infusion residuals);
    ungated [n] bool: concepts whose gate is replaced by s itself (ROME's closed form, an ablation);
    mix: exact_mix of the projected concepts, when the caller keeps it.
    Gate and similarity are fp32; the whole update is one fused product [g, -x] @ [o*; W i*] added to
    y in fp32; the result has y's dtype.
    """
    n = a.shape[0]
    projected = range(n) if projected is None else list(projected)
    s = similarity(e, a)
    coef, rows = gate(s, beta.float(), tau.float()), targets.float()
    if ungated is not None:
        coef = torch.where(ungated, s, coef)
    if len(projected):
        full = len(projected) == n
        x = projection_coefficients(
            s if full else s[..., projected],
            a if full else a[projected],
            i_star if full else i_star[projected],
            energy if full else energy[projected],
            projection,
            mix,
        )
        coef = torch.cat([coef, -x], -1)
        rows = torch.cat([rows, (w_i_star if full else w_i_star[projected]).float()])
    flat = y.reshape(-1, y.shape[-1]).float()
    return torch.addmm(flat, coef.reshape(-1, coef.shape[-1]), rows).reshape(y.shape).to(y.dtype)
