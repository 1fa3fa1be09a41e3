"""Sampling with concepts through the Adapter: several concepts, global locking, clean hooks afterwards."""

from __future__ import annotations

import pytest
import torch
from tiny import pattern_images, tiny_adapter, tiny_covariance

from perfusion.generate import generate, key_words
from perfusion.hooks import Activation, attach
from perfusion.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adapter = tiny_adapter("v")
    cov = tiny_covariance(adapter)
    out = tmp_path_factory.mktemp("gen")
    concepts = []
    for name, sup, seed in (("hugsy", "toy", 0), ("mochi", "cat", 1)):
        cfg = TrainConfig(name=name, token=name, superclass=sup, steps=2, batch_size=2, grad_accum=1, lr_values=0.3)
        concepts.append(
            Trainer(adapter, cov, cfg, pattern_images(2, seed=seed), None, out, out / f"{name}.safetensors")
            .run()
            .concept
        )
    return adapter, concepts


def test_global_locking_feeds_the_superclass_encoding_to_keys(trained):
    adapter, (hugsy, mochi) = trained
    prompts = ["a hugsy and a mochi"]
    seen = []
    layer = next(iter(attach(adapter.diffusion_model).layers.values()))
    # 3-D inputs only: the edit's own W i* calls pass through the module too
    handle = layer.to_k.register_forward_hook(lambda m, a, y: seen.append(a[0].detach()) if a[0].dim() == 3 else None)
    items = [Activation(hugsy, 0.7, 0.15, lock="global"), Activation(mochi, 0.7, 0.15)]
    try:
        generate(adapter, prompts, items, latent_shape=(4, 8, 8), steps=2)
    finally:
        handle.remove()
    expected, rows = adapter.encode(prompts, key_words(adapter, items))
    plain, _ = adapter.encode(["a toy and a mochi"], {"mochi": mochi.embedding})
    assert torch.allclose(expected, plain, atol=1e-5)  # the global concept's word became its superclass
    cond_rows = seen[0][0]
    assert torch.allclose(cond_rows, expected[0], atol=1e-5)  # cond row of the CFG batch: substituted
    uncond, _ = adapter.encode([""])
    assert torch.allclose(seen[0][1], uncond[0], atol=1e-5)  # uncond row untouched
    assert attach(adapter.diffusion_model).activations.items == []  # nothing left switched on


def test_concepts_change_images_and_base_is_reproducible(trained):
    adapter, (hugsy, mochi) = trained
    kw = dict(latent_shape=(4, 8, 8), steps=3, seed=5)
    base = generate(adapter, ["a photo of a toy"], **kw)
    assert torch.equal(base, generate(adapter, ["a photo of a toy"], **kw))
    one = generate(adapter, ["a photo of a hugsy"], [Activation(hugsy, 0.6, 0.15)], **kw)
    both = generate(
        adapter,
        ["a hugsy and a mochi"],
        [Activation(hugsy, 0.6, 0.15), Activation(mochi, 0.6, 0.15)],
        projection="exact",
        **kw,
    )
    assert one.shape == both.shape == (1, 3, 16, 16) and torch.isfinite(both).all()
    assert not torch.allclose(one, base, atol=1e-3)
