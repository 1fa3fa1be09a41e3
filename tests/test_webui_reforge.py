"""reForge (Panchovix/stable-diffusion-webui-reForge, main at 3b56b26) in the WebUI stand-in.

What reForge adds to A1111 v1.10.1 where the extension touches it, as read from its source: a
`modules_forge` package (forge_version "1.0.0v2-v1.10.1RC") and an `ldm_patched` backend, but no Forge
`backend`; `sd_model.forge_objects` beside `sd_model.model.diffusion_model`, which is the same U-Net
object (forge_loader.py:444); A1111's textual-inversion database (sd_hijack) for conditioning, not text
engines; generation under torch.inference_mode (processing.py:997). A check that takes `forge_objects` to
mean Forge never registers the concept's word there.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import webui_host as host
from modules import processing, sd_hijack

from perfusion.webui import host as perfusion_host
from perfusion.webui import tab


@pytest.fixture(scope="module")
def reforge(tmp_path_factory):
    """The stand-in with reForge's packages on sys.path and its model shape (forge_objects sharing the U-Net)."""
    root = tmp_path_factory.mktemp("reforge")
    (root / "modules_forge").mkdir()
    (root / "modules_forge" / "forge_version.py").write_text("version = '1.0.0v2-v1.10.1RC'\n")
    (root / "ldm_patched").mkdir()
    (root / "ldm_patched" / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    perfusion_host.kind.cache_clear()
    host.load_extension()
    model = host.load_model()
    model.forge_objects = SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=model.model.diffusion_model))
    )
    plain = processing.process_images
    processing.process_images = lambda p: _in_inference_mode(plain, p)  # reForge's processing.py:997
    yield model
    processing.process_images = plain
    del model.forge_objects
    host.unload_extension()
    sys.path.remove(str(root))
    for name in ("modules_forge", "modules_forge.forge_version", "ldm_patched"):
        sys.modules.pop(name, None)
    perfusion_host.kind.cache_clear()


def _in_inference_mode(process, p):
    with torch.inference_mode():
        return process(p)


@pytest.fixture
def folder(reforge, tmp_path):
    with host.concepts_folder(tmp_path) as f:
        yield f


def test_reforge_is_told_apart_from_forge(reforge):
    assert perfusion_host.kind() == "reforge" and not perfusion_host.forge_backend()


def test_the_word_is_registered_in_a1111s_database_and_the_gate_opens(folder):
    concept = host.make_concept(folder)
    seen = host.spy_on_gate(concept)
    tagged = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    base = torch.stack(list(host.txt2img("a photo of hugsy").images))
    assert abs(seen[0] - 1) < 1e-4 and seen[-1] < 0.9  # the word's row is i* only with its vectors registered
    assert (torch.stack(list(tagged.images)) - base).abs().max() > 1e-3
    assert "Perfusion: hugsy tau=0.15" in tagged.infotexts[0] and tagged.comments == ""
    after = torch.stack(list(host.txt2img("a photo of hugsy").images))
    assert torch.equal(after, base) and "hugsy" not in sd_hijack.model_hijack.embedding_db.word_embeddings


def test_global_lock_under_inference_mode(folder):
    host.make_concept(folder)
    local = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    glob = host.txt2img("a photo of <perfusion:hugsy:lock=global:0.15> hugsy")
    assert "lock=global" in glob.infotexts[0] and glob.comments == ""
    assert (torch.stack(list(glob.images)) - torch.stack(list(local.images))).abs().max() > 1e-4


def test_the_training_tab_is_offered(reforge):
    pytest.importorskip("gradio")
    tabs = tab.create_tab()
    assert [t[1:] for t in tabs] == [("Perfusion", "perfusion_train")]
    assert "perfusion_train_check" in {b.elem_id for b in tabs[0][0].blocks.values() if hasattr(b, "elem_id")}


def test_taken_for_forge_the_word_would_be_lost_and_the_image_says_so(folder, monkeypatch):
    """The negative control of the test above: with the old guess (forge_objects = Forge) no database takes
    the word's vectors, its row is not i*, and the image's comments say why instead of passing silently."""
    concept = host.make_concept(folder)
    seen = host.spy_on_gate(concept)
    monkeypatch.setattr(perfusion_host, "kind", lambda: "forge")
    out = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    assert seen[0] < 0.9
    assert "has no textual-inversion database for its word's vectors" in out.comments
