"""Training through the WebUI's own text path (stand-in over the tiny model): rows, gradients, a short run."""

import pytest
import torch
import webui_host as host
from modules import errors, sd_hijack, sd_samplers, shared
from tiny import pattern_images, tiny_covariance

from perfusion.train import TrainConfig, Trainer
from perfusion.webui.adapter import WebUIAdapter


@pytest.fixture(scope="module")
def webui():
    host.load_extension()
    model = host.load_model()
    yield WebUIAdapter(model)
    host.unload_extension()


def test_encodings_and_rows_match_the_engines_own_clip_path(webui):
    emb = {"": torch.randn(2, 64) * 0.5}
    prompts = ["a photo of hugsy on a beach", "hugsy", "a teddy and a teddy"]
    ours, rows = webui.encode(prompts, {"hugsy": emb, "teddy": None})
    reference, ref_rows = shared.sd_model.adapter.encode(prompts, {"hugsy": emb, "teddy": None})
    assert rows == ref_rows == {"hugsy": [[5], [2], []], "teddy": [[], [], [2, 5]]}
    assert torch.allclose(ours, reference, atol=1e-5)
    assert "hugsy" not in sd_hijack.model_hijack.embedding_db.word_embeddings


def test_gradient_reaches_the_embedding_through_the_webui_text_path(webui):
    emb = {"": (torch.randn(1, 64) * 0.5).requires_grad_()}
    context, rows = webui.encode(["a photo of hugsy"], {"hugsy": emb})
    (
        context[0, rows["hugsy"][0][0]] * torch.randn(64)
    ).sum().backward()  # (a plain sum of a LayerNorm output is constant)
    assert emb[""].grad is not None and emb[""].grad.abs().sum() > 0


def test_long_prompt_rows_land_in_the_second_chunk(webui):
    prompt = " ".join(["red"] * 80) + " hugsy"
    emb = {"": torch.randn(1, 64)}
    context, rows = webui.encode([prompt], {"hugsy": emb})
    assert context.shape[1] == 154 and rows["hugsy"] == [[77 + 1 + 5]]


def test_a_short_training_run_in_the_webui_gives_a_concept_that_generates(webui, tmp_path):
    shared.opts.data["perfusion_dir"] = str(tmp_path)
    cfg = TrainConfig(
        name="hugsy",
        token="hugsy",
        superclass="teddy",
        steps=3,
        batch_size=2,
        grad_accum=1,
        templates=("a photo of a [name]",),
        seed=0,
    )
    result = Trainer(
        webui,
        tiny_covariance(shared.sd_model.adapter, 128),
        cfg,
        pattern_images(2),
        None,
        tmp_path / "work",
        tmp_path / "hugsy.safetensors",
    ).run()
    concept = result.concept
    assert (tmp_path / "hugsy.safetensors").exists() and concept.steps == 3
    seen = []

    def spy(params):
        seen.append((params.text_cond[0] @ concept.a).max().item())
        return host.unet_sampler(params)

    sd_samplers.sample_hook = spy
    try:
        out = host.txt2img("a photo of a <perfusion:hugsy:0.15> hugsy")
    finally:
        sd_samplers.sample_hook = host.unet_sampler
    assert "Perfusion: hugsy" in out.infotexts[0] and out.comments == ""
    assert seen[0] > 0.5  # the gate direction fits the word as generation encodes it
    assert errors.exception_records == []


def test_covariance_key_is_the_model_hash_or_a_fingerprint_of_the_text_encoder(webui, monkeypatch):
    model = shared.sd_model
    monkeypatch.setattr(model, "sd_model_hash", "", raising=False)
    fingerprint = WebUIAdapter(model).encoder_hash
    assert fingerprint.startswith("weights-") and fingerprint == WebUIAdapter(model).encoder_hash
    weight = next(model.model.diffusion_model.parameters())
    with torch.no_grad():
        weight.add_(1.0)  # another model's weights
    try:
        assert WebUIAdapter(model).encoder_hash != fingerprint
    finally:
        with torch.no_grad():
            weight.sub_(1.0)
    monkeypatch.setattr(model, "sd_model_hash", "6ce0161689", raising=False)
    assert WebUIAdapter(model).encoder_hash == "6ce0161689"
