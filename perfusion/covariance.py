"""C = E[e e^T], the uncentered covariance of the text encodings a U-Net's cross-attention reads.

Estimated once per text encoder (and clip skip) from the prompt corpus, accumulated in float64,
regularised with a ridge of `ridge * trace(C) / d`, and cached as safetensors with its provenance.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as _save_bytes

from .edit import gate_direction
from .files import atomic_write, short_hash

POSITIONS = ("all", "tokens")
# encode(prompts) -> (context [B, N, d], lengths [B]: rows holding BOS, the prompt's tokens and EOS)
Encoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, int], None]


class CovarianceError(ValueError):
    """A covariance file that cannot be used; the message names the file and the problem."""


class NonFiniteEncodingError(CovarianceError):
    """The text encoder gave NaN or Inf for the corpus's ordinary prompts: no covariance can come of it."""


@dataclass
class Covariance:
    """C [d, d] float64 (ridge included) with where it came from."""

    matrix: torch.Tensor  # never changed after construction: what is derived from it is cached
    rows: int
    prompts: int
    encoder_hash: str
    clip_skip: int
    positions: str
    ridge: float
    _inverse: dict = field(default_factory=dict, repr=False, compare=False)  # device -> C^-1 float64

    @cached_property
    def hash(self) -> str:
        """Short content hash, recorded in concept files as covariance_hash (computed once)."""
        return short_hash(self.matrix.double().contiguous().numpy().tobytes())

    @cached_property
    def _cholesky(self) -> torch.Tensor:
        return torch.linalg.cholesky(self.matrix.double())

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """C^-1 x for x [..., d] (float64 Cholesky solve on the CPU), returned in x's dtype and device."""
        y = torch.cholesky_solve(x.detach().double().cpu().reshape(-1, x.shape[-1]).T, self._cholesky).T
        return y.reshape(x.shape).to(x.dtype).to(x.device)

    def inverse(self, device: torch.device) -> torch.Tensor:
        """C^-1 [d, d] float64 on `device`, from the Cholesky factor once per device: a gate direction is
        then one mat-vec where i* lives, with no copy to the CPU and no sync."""
        key = str(device)
        if key not in self._inverse:
            self._inverse[key] = torch.cholesky_inverse(self._cholesky).to(device)
        return self._inverse[key]


def build_covariance(
    encode: Encoder,
    prompts: Sequence[str],
    *,
    positions: str = "all",
    ridge: float = 1e-5,
    batch_size: int = 64,
    encoder_hash: str = "",
    clip_skip: int = 1,
    progress: Optional[Progress] = None,
) -> Covariance:
    """Accumulate sum(e e^T) over the counted rows of every prompt's encoding, in float64.

    positions "all" counts every context row the U-Net sees (padding included); "tokens" counts
    BOS, the prompt's tokens and EOS only. progress(done, total) is called after each batch.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if not prompts:
        raise ValueError("no prompts to estimate the covariance from")
    total, rows, outer = len(prompts), 0, None
    for start in range(0, total, batch_size):
        with torch.no_grad():
            context, lengths = encode(list(prompts[start : start + batch_size]))
        # accumulated in float64 where the encoder ran (one copy to the CPU at the end, no per-batch sync);
        # a device without float64 (Apple's MPS) accumulates on the CPU
        where = context.device if context.device.type != "mps" else torch.device("cpu")
        e = context.detach().to(where).double()
        if positions == "tokens":
            keep = torch.arange(e.shape[1], device=where)[None, :] < lengths.to(where)[:, None]
            e = e[keep]
        e = e.reshape(-1, e.shape[-1])
        outer = e.T @ e if outer is None else outer + e.T @ e
        rows += e.shape[0]
        if progress:
            progress(min(start + batch_size, total), total)
    c = outer.cpu() / rows
    if not torch.isfinite(c).all():  # caught here, not as a failed Cholesky factorisation later
        raise NonFiniteEncodingError(
            "the text encoder gave NaN or Inf values for ordinary prompts (the covariance corpus); nothing was saved"
        )
    c = c + torch.eye(c.shape[0], dtype=c.dtype) * (ridge * c.trace() / c.shape[0])
    return Covariance(c, rows, total, encoder_hash, clip_skip, positions, ridge)


def save_covariance(cov: Covariance, path: str | os.PathLike) -> Path:
    meta = {
        "perfusion_covariance": "1",
        "rows": str(cov.rows),
        "prompts": str(cov.prompts),
        "encoder_hash": cov.encoder_hash,
        "clip_skip": str(cov.clip_skip),
        "positions": cov.positions,
        "ridge": repr(cov.ridge),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return atomic_write(path, _save_bytes({"covariance": cov.matrix.double().contiguous()}, metadata=meta))


def load_covariance(path: str | os.PathLike) -> Covariance:
    """Read a covariance file written by save_covariance (safetensors only; never unpickled)."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CovarianceError(f"{path}: not a readable covariance file ({e})") from None
    c = tensors.get("covariance")
    if meta.get("perfusion_covariance") != "1" or c is None or c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise CovarianceError(f"{path}: not a Perfusion covariance file (expected a square 'covariance' tensor)")
    if not torch.isfinite(c).all():
        raise CovarianceError(f"{path}: covariance holds NaN or Inf values; delete it to rebuild")
    return Covariance(
        c,
        int(meta["rows"]),
        int(meta["prompts"]),
        meta.get("encoder_hash", ""),
        int(meta.get("clip_skip", 1)),
        meta.get("positions", "all"),
        float(meta.get("ridge", 0)),
    )


def adapter_encoder(adapter) -> Encoder:
    """An Encoder over an engine Adapter: its contexts, every row counted (for positions "all")."""

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        context, _ = adapter.encode(texts)
        return context, torch.full((len(texts),), context.shape[1])

    return encode


def cached_covariance(
    cache_dir: str | os.PathLike,
    encode: Encoder,
    prompts: Sequence[str],
    *,
    encoder_hash: str,
    clip_skip: int = 1,
    positions: str = "all",
    ridge: float = 1e-5,
    batch_size: int = 64,
    progress: Optional[Progress] = None,
) -> Covariance:
    """The covariance for this encoder/clip skip/positions/corpus size, built and saved on first use.

    An unreadable cache file is rebuilt (and replaced atomically), never trusted.
    """
    if not encoder_hash:  # a constant would let two models share one file: key by the corpus at least
        raise ValueError("cached_covariance needs the encoder's hash (the model's, or its weights')")
    corpus = short_hash("\n".join(prompts).encode(), 8)
    name = f"covariance-{encoder_hash[:16]}-skip{clip_skip}-{positions}-{len(prompts)}-{corpus}.safetensors"
    path = Path(cache_dir) / name
    if path.exists():
        try:
            cov = load_covariance(path)
            if (cov.encoder_hash, cov.clip_skip, cov.positions, cov.prompts) == (
                encoder_hash,
                clip_skip,
                positions,
                len(prompts),
            ):
                return cov
        except CovarianceError:
            pass
    cov = build_covariance(
        encode,
        prompts,
        positions=positions,
        ridge=ridge,
        batch_size=batch_size,
        encoder_hash=encoder_hash,
        clip_skip=clip_skip,
        progress=progress,
    )
    save_covariance(cov, path)
    return cov


def concept_gate(cov: Covariance, i_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [d], energy [1]) for target input i* [d] under covariance C (float64 inside, i*'s dtype out), on
    i*'s device (devices without float64, such as Apple's MPS, solve on the CPU)."""
    if i_star.device.type == "mps":
        a, energy = gate_direction(i_star.double().cpu(), cov.solve(i_star.double().cpu()))
    else:
        i64 = i_star.double()
        a, energy = gate_direction(i64, cov.inverse(i_star.device) @ i64)
    return a.to(i_star.dtype).to(i_star.device), energy.to(i_star.dtype).to(i_star.device)
