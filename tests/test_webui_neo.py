"""Forge Neo's backend family (tests/forge_standin) over the WebUI stand-in: the concept's word goes to the
text engine's own database, the U-Net is the patcher's, the training tab is offered (its training:
tests/test_webui_neo_training.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import webui_host as host
from modules import sd_hijack, sd_samplers

from perfusion.webui import host as perfusion_host
from perfusion.webui import tab
from perfusion.webui.state import runtime


@pytest.fixture(scope="module")
def neo():
    with host.forge_standin():
        from backend.text_processing.textual_inversion import EmbeddingDatabase

        host.load_extension()
        model = host.load_model()
        unet = model.model.diffusion_model
        model.forge_objects = SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)))
        engine_db = EmbeddingDatabase(model.adapter._ids, expected_shape=model.adapter.context_dim)
        model.text_processing_engine = SimpleNamespace(embeddings=engine_db)
        model.cond_stage_model.database = lambda: engine_db  # Neo conditions through its engine's database only
        yield model, engine_db
        model.cond_stage_model.database = lambda: sd_hijack.model_hijack.embedding_db
        del model.forge_objects, model.text_processing_engine
        host.unload_extension()


@pytest.fixture
def folder(neo, tmp_path):
    with host.concepts_folder(tmp_path) as f:
        yield f


def test_neo_is_told_by_its_version(neo):
    assert perfusion_host.kind() == "neo" and perfusion_host.forge_backend()


def test_the_word_goes_to_the_engines_database_and_the_gate_opens(neo, folder):
    model, engine_db = neo
    concept = host.make_concept(folder)
    seen, registered = [], []

    def spy(params):
        seen.append((params.text_cond[0] @ concept.a).max().item())
        registered.append(
            ("hugsy" in engine_db.word_embeddings, "hugsy" in sd_hijack.model_hijack.embedding_db.word_embeddings)
        )
        return host.unet_sampler(params)

    sd_samplers.sample_hook = spy
    tagged = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    base = torch.stack(list(host.txt2img("a photo of hugsy").images))
    assert abs(seen[0] - 1) < 1e-4 and seen[-1] < 0.9
    assert registered[0] == (True, False) and "hugsy" not in engine_db.word_embeddings
    assert (torch.stack(list(tagged.images)) - base).abs().max() > 1e-3 and tagged.comments == ""
    assert perfusion_host.embedding_width(model) == model.adapter.context_dim
    vec = engine_db.word_embeddings.get("hugsy")
    assert vec is None  # restored after the batch


def test_a_concept_of_another_width_is_skipped_with_a_warning(neo, folder, monkeypatch):
    """Neo's databases expect one width (SD1 768, SDXL 2048): an SD2-wide concept gets the same clear
    warning as any wrong-architecture file, and the image is the base one."""
    model, engine_db = neo
    monkeypatch.setattr(engine_db, "expected_shape", 1024)
    monkeypatch.setattr(runtime, "width", None)  # asked once per loaded model: as if this one had just loaded
    host.make_concept(folder)
    out = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    assert "1024" in out.comments and "skipped" in out.comments
    assert torch.equal(torch.stack(list(out.images)), torch.stack(list(host.txt2img("a photo of hugsy").images)))


def test_the_training_tab_is_offered(neo):
    pytest.importorskip("gradio")
    blocks = tab.create_tab()[0][0].blocks.values()
    assert any(getattr(b, "elem_id", None) == "perfusion_train_start" for b in blocks)


def test_composing_leaves_the_engines_infotext_record_as_the_prompt_left_it(neo, monkeypatch):
    """Neo's text engine notes every embedding word it encodes in a module-level record (`TI`) that the next
    image's infotext reads: the clauses regional composition encodes must leave it as the prompt left it (in the
    real Neo it grew by the concepts' names with every image)."""
    from backend.text_processing import classic_engine
    from modules.prompt_parser import SdConditioning

    from perfusion.webui import composition

    model, _ = neo
    real = model.get_learned_conditioning

    def noting(texts):  # as Neo's engine does for the words it finds
        record["TI"] = ", ".join([*record.get("TI", "").split(", "), "hugsy"]).lstrip(", ")
        return real(texts)

    monkeypatch.setattr(model, "get_learned_conditioning", noting)
    monkeypatch.setattr(classic_engine, "last_extra_generation_params", {"TI": "hugsy"})  # the prompt's own note
    record = classic_engine.last_extra_generation_params
    rows = composition._encode(SimpleNamespace(width=64, height=64), model, ["a hugsy at the left", "a teddy"])
    assert len(rows) == 2 and rows[0].shape[-1] == model.adapter.context_dim
    assert record == {"TI": "hugsy"}
    model.get_learned_conditioning(SdConditioning(["a hugsy"], width=64, height=64))
    assert record == {"TI": "hugsy, hugsy"}  # control: an encoding outside it does note
