"""What the hot paths compute once and keep (issue: per-run and per-activation constants), pinned: each cached
value equals what recomputing gives, and is computed once."""

from __future__ import annotations

import pytest
import torch
from concepts import encodings, layer_widths, make_concept, random_covariance
from models import small_unet

import perfusion
from perfusion import Activation, Activations, attach
from perfusion import covariance as covariance_module
from perfusion import hooks as hooks_module


def test_covariance_hash_and_inverse_are_computed_once_and_right(monkeypatch):
    cov = perfusion.Covariance(random_covariance(64, seed=2), 10, 5, "enc", 1, "all", 1e-5)
    calls = []
    real = covariance_module.short_hash
    monkeypatch.setattr(covariance_module, "short_hash", lambda data: calls.append(1) or real(data))
    assert cov.hash == cov.hash == real(cov.matrix.double().contiguous().numpy().tobytes()) and len(calls) == 1
    inv = cov.inverse(torch.device("cpu"))
    assert cov.inverse(torch.device("cpu")) is inv
    torch.testing.assert_close(inv @ cov.matrix, torch.eye(64, dtype=torch.float64), atol=1e-8, rtol=0)
    i_star = encodings(1, 64, 3)[0]
    a, energy = perfusion.concept_gate(cov, i_star)
    c_inv_i = torch.linalg.solve(cov.matrix, i_star.double())  # the float64 reference, solved afresh
    torch.testing.assert_close(a.double(), c_inv_i / (i_star.double() @ c_inv_i), rtol=1e-6, atol=1e-9)
    assert float(a.double() @ i_star.double()) == pytest.approx(1.0, abs=1e-5)


def test_exact_mix_and_projections_are_computed_once_per_activation(monkeypatch):
    d = 96
    unet = small_unet(d)
    cov = random_covariance(d, seed=d)
    concepts = [make_concept(layer_widths(unet), d, cov, seed=s, token=f"c{s}") for s in range(3)]
    ctx = encodings(2 * 77, d, 4).reshape(2, 77, d)
    ctx[0, 5] = concepts[0].i_star
    mixes, projections = [], []
    real_mix, real_project = hooks_module.exact_mix, hooks_module.Hooks._project
    monkeypatch.setattr(hooks_module, "exact_mix", lambda *a: mixes.append(1) or real_mix(*a))
    monkeypatch.setattr(
        hooks_module.Hooks, "_project", lambda self, *a: projections.append(1) or real_project(self, *a)
    )
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    with torch.no_grad(), attach(unet, Activations([Activation(c, 0.7, 0.15) for c in concepts], "exact")) as hooks:
        first = unet(x, t, context=ctx)
        layers = len(hooks.layers)
        assert len(mixes) == 2 and len(projections) == 2 * layers  # one mix per path, one projection per layer and path
        second = unet(x, t, context=ctx)
        assert len(mixes) == 2 and len(projections) == 2 * layers  # the second forward reuses every one
        assert torch.equal(first, second)
        hooks.activate(Activations([Activation(c, 0.7, 0.15) for c in concepts], "exact"))
        third = unet(x, t, context=ctx)
        assert (
            len(mixes) == 4 and len(projections) == 4 * layers and torch.equal(first, third)
        )  # a new activation recomputes
    with attach(unet, Activations([Activation(c, 0.7, 0.15) for c in concepts], "exact")):
        unet(x, t, context=ctx)  # with a graph being built (training), every call projects afresh
        unet(x, t, context=ctx)
    assert len(projections) == 8 * layers
