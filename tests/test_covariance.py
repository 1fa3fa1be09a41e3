"""Covariance from the shipped prompt corpus through a real-architecture CLIP text encoder."""

from __future__ import annotations

import pytest
import torch
from models import small_text_encoder

import perfusion
from perfusion.clip_tokenizer import load_tokenizer
from perfusion.corpus import prompt_corpus


@pytest.fixture(scope="module")
def encoder():
    tok, model = load_tokenizer(), small_text_encoder(hidden=64)
    calls = []

    def encode(prompts):
        calls.append(len(prompts))
        batch = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        lengths = batch["attention_mask"].sum(1)  # BOS + tokens + EOS
        return model(input_ids=batch["input_ids"]).last_hidden_state, lengths

    encode.calls = calls
    return encode


def test_matches_float64_reference_for_both_position_sets(encoder):
    prompts = prompt_corpus(300, seed=1)
    context, lengths = encoder(prompts)
    e = context.detach().double()
    for positions, rows in (
        ("all", e.reshape(-1, 64)),
        ("tokens", torch.cat([e[b, :n] for b, n in enumerate(lengths.tolist())])),
    ):
        cov = perfusion.build_covariance(encoder, prompts, positions=positions, ridge=1e-5, batch_size=64)
        ref = rows.T @ rows / rows.shape[0]
        ref += torch.eye(64, dtype=torch.float64) * 1e-5 * ref.trace() / 64
        assert cov.matrix.dtype == torch.float64 and cov.rows == rows.shape[0] and cov.prompts == 300
        assert torch.allclose(cov.matrix, ref, rtol=1e-10, atol=1e-12)
    assert cov.positions == "tokens" and cov.rows < 300 * 77


def test_solve_and_gate_direction(encoder):
    prompts = prompt_corpus(200, seed=2)
    cov = perfusion.build_covariance(encoder, prompts)
    x = torch.randn(3, 64, dtype=torch.float64)
    assert torch.allclose(cov.matrix @ cov.solve(x).T, x.T, atol=1e-8)
    i_star = encoder(["a photo of a teddy"])[0][0, 5].detach()
    a, energy = perfusion.concept_gate(cov, i_star)
    assert a.dtype == i_star.dtype and float(a @ i_star) == pytest.approx(1.0, abs=1e-5) and energy.item() > 0


def test_cache_builds_once_saves_provenance_and_rebuilds_a_corrupt_file(tmp_path, encoder):
    prompts = prompt_corpus(130, seed=3)
    progress = []
    start = len(encoder.calls)
    cov = perfusion.cached_covariance(
        tmp_path,
        encoder,
        prompts,
        encoder_hash="abc123",
        clip_skip=2,
        batch_size=64,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(64, 130), (128, 130), (130, 130)] and len(encoder.calls) - start == 3
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and "abc123" in files[0].name and "skip2" in files[0].name
    again = perfusion.cached_covariance(tmp_path, encoder, prompts, encoder_hash="abc123", clip_skip=2)
    assert len(encoder.calls) - start == 3  # served from the cache
    assert torch.equal(again.matrix, cov.matrix) and again.hash == cov.hash
    assert (again.encoder_hash, again.clip_skip, again.prompts, again.positions) == ("abc123", 2, 130, "all")
    files[0].write_bytes(files[0].read_bytes()[:1000])
    with pytest.raises(perfusion.CovarianceError, match=str(files[0])):
        perfusion.load_covariance(files[0])
    rebuilt = perfusion.cached_covariance(tmp_path, encoder, prompts, encoder_hash="abc123", clip_skip=2)
    assert len(encoder.calls) - start == 6 and torch.equal(rebuilt.matrix, cov.matrix)


def test_bad_arguments(encoder):
    with pytest.raises(ValueError, match="no prompts"):
        perfusion.build_covariance(encoder, [])
    with pytest.raises(ValueError, match="positions"):
        perfusion.build_covariance(encoder, ["a cat"], positions="bos")


def test_cache_key_cannot_collide(tmp_path, encoder):
    a, b = prompt_corpus(70, seed=4), prompt_corpus(70, seed=5)
    perfusion.cached_covariance(tmp_path, encoder, a, encoder_hash="abc123", batch_size=64)
    perfusion.cached_covariance(tmp_path, encoder, b, encoder_hash="abc123", batch_size=64)
    assert len(list(tmp_path.iterdir())) == 2  # same model and size, other corpus: another file
    with pytest.raises(ValueError, match="hash"):
        perfusion.cached_covariance(tmp_path, encoder, a, encoder_hash="")


def test_a_text_encoder_giving_nan_is_refused_before_anything_is_saved(tmp_path, encoder):
    """NaN or Inf in the encodings (a random checkpoint's text encoder under the WebUI's emphasis 'Original') is
    named when the covariance is built, and no cache file is written."""
    from perfusion.covariance import NonFiniteEncodingError, build_covariance, cached_covariance

    def broken(texts):
        context, lengths = encoder(texts)
        return context * float("nan"), lengths

    prompts = prompt_corpus(32)
    with pytest.raises(NonFiniteEncodingError, match="NaN or Inf values for ordinary prompts"):
        build_covariance(broken, prompts)
    with pytest.raises(NonFiniteEncodingError):
        cached_covariance(tmp_path, broken, prompts, encoder_hash="x")
    assert list(tmp_path.iterdir()) == []
    assert torch.isfinite(build_covariance(encoder, prompts).matrix).all()  # control: a sound encoder builds one
