"""Overfitting report: the W2 formula against closed forms, drift, and an end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import pattern_images, tiny_adapter, tiny_covariance

from perfusion.report import drift, gaussian_w2, overfitting_report, pixel_features
from perfusion.train import TrainConfig, Trainer


def test_w2_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 1, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(4000, 1, generator=g, dtype=torch.float64) * 0.5 - 1
    # 1-D: W2 = sqrt((mu_a - mu_b)^2 + (sd_a - sd_b)^2) with the sample moments
    expected = math.sqrt((a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2)
    assert gaussian_w2(a, b, ridge=0) == pytest.approx(expected, rel=1e-6)
    # commuting (diagonal) covariances: sum over axes of the 1-D terms
    x = torch.randn(3000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0])
    y = torch.randn(3000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5]) + 2
    cx, cy = torch.cov(x.T), torch.cov(y.T)
    assert gaussian_w2(x, x, ridge=0) == pytest.approx(0.0, abs=1e-5)
    assert gaussian_w2(x, y, ridge=0) > 3
    # general case against scipy-free reference: W2^2 for equal means = tr(Sx + Sy - 2 (Sx^1/2 Sy Sx^1/2)^1/2)
    vals, vecs = torch.linalg.eigh(cx)
    root = vecs @ torch.diag(vals.sqrt()) @ vecs.T
    m = root @ cy @ root
    v2, q2 = torch.linalg.eigh(m)
    ref = ((x.mean(0) - y.mean(0)).square().sum() + (cx + cy - 2 * q2 @ torch.diag(v2.sqrt()) @ q2.T).trace()).sqrt()
    assert gaussian_w2(x, y, ridge=0) == pytest.approx(float(ref), rel=1e-8)


def test_pixel_features_shape():
    f = pixel_features(pattern_images(2))
    assert f.shape == (2, 3 * 64 + 6) and torch.isfinite(f).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adapter = tiny_adapter("v")
    cov = tiny_covariance(adapter)
    out = tmp_path_factory.mktemp("report")
    cfg = TrainConfig(name="hugsy", token="hugsy", superclass="toy", steps=3, batch_size=2, grad_accum=1, lr_values=0.3)
    return adapter, Trainer(adapter, cov, cfg, pattern_images(3), None, out, out / "hugsy.safetensors").run().concept


def test_drift_grows_as_the_gate_opens(trained):
    adapter, concept = trained
    closed, _ = drift(adapter, concept, beta=5.0, tau=0.05, latent_shape=(4, 8, 8))
    opened, rel = drift(adapter, concept, beta=-5.0, tau=0.05, latent_shape=(4, 8, 8))
    # with the gate shut only the projection term -s(e) W i* acts; an open gate adds o* on every row
    assert 0 < closed < opened / 10 and rel > 0


def test_report_end_to_end(trained):
    adapter, concept = trained
    r = overfitting_report(adapter, concept, latent_shape=(4, 8, 8), samples=6, steps=3)
    assert r.samples == 6 and r.drift_mse >= 0 and r.narrowness_w2 > 0 and r.baseline_w2 > 0
    assert set(r.as_dict()) == {"drift_mse", "drift_relative", "narrowness_w2", "baseline_w2", "samples"}


def test_report_follows_the_locking_mode(trained):
    adapter, concept = trained
    local = overfitting_report(adapter, concept, latent_shape=(4, 8, 8), samples=4, steps=3)
    glob = overfitting_report(adapter, concept, latent_shape=(4, 8, 8), samples=4, steps=3, lock="global")
    assert glob.narrowness_w2 != local.narrowness_w2  # the samples' keys come from the superclass's encoding
    assert glob.baseline_w2 == local.baseline_w2  # base-model sets do not depend on the concept
