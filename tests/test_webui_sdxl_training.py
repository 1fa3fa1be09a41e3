"""Training on SDXL from the tab's logic, in the WebUI stand-in with an SDXL-shaped model (two text encoders,
pooled vector into the U-Net)."""

import base64
import io
import re

import numpy as np
import pytest
import torch
import webui_host as host
from modules import errors, shared
from PIL import Image
from webui_host_sdxl import load_sdxl_model

from perfusion import load_concept
from perfusion.webui import tab, training
from perfusion.webui.adapter import WebUIAdapter
from perfusion.webui.training import TrainForm


@pytest.fixture(scope="module")
def sdxl():
    host.load_extension()
    model = load_sdxl_model()
    yield model
    host.unload_extension()


@pytest.fixture
def env(sdxl, tmp_path):
    host.reset()
    photos = host.write_photos(tmp_path / "photos", count=2, seed=1)
    shared.opts.data["perfusion_dir"] = str(tmp_path / "concepts")
    shared.opts.data["perfusion_covariance_prompts"] = 64
    yield tmp_path / "concepts", photos
    shared.opts.data.pop("perfusion_covariance_prompts", None)
    assert errors.exception_records == []


def test_the_adapter_encodes_both_text_encoders_and_the_pooled_vector(sdxl):
    adapter = WebUIAdapter(sdxl, resolution=512)
    assert adapter.arch == "sdxl" and adapter.context_dim == 2048
    emb = adapter.word_embedding("teddy")
    assert {k: tuple(v.shape) for k, v in emb.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}
    learned = {k: (torch.randn_like(v) * 0.3).requires_grad_(True) for k, v in emb.items()}
    context, rows = adapter.encode(["a photo of hugsy", "a hugsy on a table"], {"hugsy": learned})
    assert context.shape == (2, 77, 2048) and context.vector.shape[0] == 2
    assert rows == {"hugsy": [[4], [2]]}
    plain, _ = adapter.encode(["a photo of hugsy", "a hugsy on a table"])
    assert not torch.allclose(context.vector, plain.vector)  # the word reaches the pooled vector too
    assert torch.equal(context[0, :4], plain[0, :4]) and torch.equal(context[1, :2], plain[1, :2])  # causal
    out = adapter.apply_model(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), context)
    out.square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in learned.values())
    size = sdxl.vectors[-1][:, 1280:]
    assert not torch.equal(size, WebUIAdapter(sdxl, resolution=1024).encode(["x"])[0].vector[:, 1280:].expand_as(size))


def test_a_short_sdxl_run_with_previews_gives_an_sdxl_concept(env, sdxl):
    concepts, photos = env
    previews = []
    form = TrainForm(
        name="hugsy",
        token="hugsy",
        superclass="teddy",
        folder=str(photos),
        steps=3,
        batch_size=1,
        grad_accum=2,
        resolution=64,
        save_every=0,
        preview_every=2,
        mask_source="none",
        report_samples=0,
    )
    before = len(sdxl.vectors)
    result = training.train(form, preview=lambda concept, step: previews.append(step))
    assert result.state == "done" and result.step == 3, result.message
    concept = load_concept(concepts / "hugsy.safetensors")
    assert concept.arch == "sdxl" and concept.context_dim == 2048 and set(concept.embedding) == {"clip_l", "clip_g"}
    start = {k: v for k, v in WebUIAdapter(sdxl).word_embedding("teddy").items()}
    assert all(
        not torch.allclose(concept.embedding[k].float(), start[k], atol=1e-3) for k in start
    )  # both halves trained
    assert (
        previews == [0, 2, 3] and len(sdxl.vectors) - before >= 6
    )  # start, every 2, the end; every micro-step fed a vector


def test_the_tab_preview_samples_with_the_vector(env, sdxl):
    concepts, photos = env
    form = TrainForm(
        name="p",
        token="hugsy",
        superclass="teddy",
        folder=str(photos),
        steps=1,
        batch_size=1,
        grad_accum=1,
        resolution=64,
        save_every=0,
        preview_every=1,
        mask_source="none",
        report_samples=0,
        preview_prompt="a photo of hugsy",
        gradient_checkpointing=True,
    )
    from perfusion.webui import tab

    result = training.train(form, tab.preview(form))
    assert result.state == "done", result.message
    assert shared.state.current_image is not None and shared.state.current_image.size == (64, 64)
    assert sdxl.vectors[-1].shape[0] == 2  # the guided batch: cond and uncond vectors joined


def test_a_portrait_trains_in_its_own_bucket_with_its_size_in_the_vector(env, sdxl):
    """Aspect-ratio buckets on SDXL: a 1:4 photo keeps its shape (64x256 at resolution 128) and SDXL's size
    conditioning of its micro-batches says 64x256, as kohya conditions on the bucket; the square one says 128."""
    concepts, photos = env
    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((280, 70, 3)) * 255).astype(np.uint8)).save(photos / "tall.png")
    form = TrainForm(name="tall", token="hugsy", superclass="teddy", folder=str(photos), steps=4, batch_size=1,
                     grad_accum=2, resolution=128, save_every=0, preview_every=0, mask_source="none",
                     report_samples=0)  # fmt: skip
    problems, dataset = training.check(form)
    assert not problems and dataset.summary() == "3 usable images (2 at 128x128, 1 at 64x256)"
    adapter = WebUIAdapter(sdxl, resolution=128)
    expected = {size: adapter.encode(["x"], size=size)[0].vector[0, 1280:] for size in ((128, 128), (64, 256))}
    assert not torch.allclose(expected[(128, 128)], expected[(64, 256)])
    before = len(sdxl.vectors)
    result = training.train(form)
    assert result.state == "done", result.message
    seen = [v[0, 1280:] for v in sdxl.vectors[before:]]
    matched = [next((s for s, e in expected.items() if torch.allclose(v, e)), None) for v in seen]
    assert None not in matched and set(matched) == {(128, 128), (64, 256)}
    shown = {name: picture for name, _, picture in training.mask_previews(form, dataset)}
    assert shown["tall.png"].size == (64, 256) and shown["bear0.png"].size == (128, 128)
    thumbs = re.findall(r'base64,([^"]+)"', tab.gallery_html(list(training.mask_previews(form, dataset))))
    assert [Image.open(io.BytesIO(base64.b64decode(t))).size for t in thumbs] == [(128, 128), (128, 128), (32, 128)]
    square = training.check(TrainForm(**{**form.__dict__, "aspect": "square"}))[1]
    assert square.summary() == "3 usable images"  # control: all centre-cropped to 128x128
