"""Regional composition: the blend against a float64 reference, the base prompts and mask rows, and sampling on the
tiny model (zero masks give exactly the base prompt's image; each pass sees only its own concept)."""

from __future__ import annotations

import pytest
import torch
from tiny import pattern_images, tiny_adapter, tiny_covariance

import perfusion.regional as regional
from perfusion.generate import generate
from perfusion.hooks import Activation, attach
from perfusion.regional import Region, base_prompts, blend, generate_regional, mask_rows
from perfusion.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adapter = tiny_adapter("v")
    cov = tiny_covariance(adapter)
    out = tmp_path_factory.mktemp("regional")
    concepts = {}
    for name, sup, seed in (("hugsy", "toy", 0), ("mochi", "cat", 1), ("boxy", "toy", 2)):
        cfg = TrainConfig(name=name, token=name, superclass=sup, steps=2, batch_size=2, grad_accum=1, lr_values=0.3)
        trainer = Trainer(adapter, cov, cfg, pattern_images(2, seed=seed), None, out, out / f"{name}.safetensors")
        concepts[name] = trainer.run().concept
    return adapter, concepts


def test_blend_matches_a_float64_reference_and_caps_the_masks():
    g = torch.Generator().manual_seed(0)
    base, own = torch.randn(2, 3, 4, 4, generator=g), [torch.randn(2, 3, 4, 4, generator=g) for _ in range(2)]
    masks = [torch.rand(2, 4, 4, generator=g), torch.rand(2, 4, 4, generator=g)]
    total = (masks[0] + masks[1]).double()
    scale = 1 / total.clamp(min=1)
    ref = base.double() * (1 - total * scale)[:, None]
    for p, m in zip(own, masks):
        ref += p.double() * (m.double() * scale)[:, None]
    assert torch.allclose(blend(base, own, masks).double(), ref, atol=1e-6)
    assert (total > 1).any()  # the cap was exercised
    assert torch.equal(blend(base, own, [torch.zeros(2, 4, 4)] * 2), base)  # no region: the base
    assert torch.allclose(blend(base, own, [torch.ones(2, 4, 4), torch.zeros(2, 4, 4)]), own[0])  # one full region


def test_base_prompts_and_mask_rows(trained):
    adapter, c = trained
    regions = [Region(Activation(c["hugsy"]), ["x"]), Region(Activation(c["boxy"]), ["x"])]
    prompts = ["a Hugsy at the left and a boxy at the right", "a boxy on top of a hugsy"]
    bases = base_prompts(prompts, regions)
    assert bases == ["a toy at the left and a toy at the right", "a toy on top of a toy"]
    assert base_prompts(["hugsys and a hugsy-like toy"], regions) == ["hugsys and a toy-like toy"]  # whole words only
    rows = mask_rows(adapter, prompts, bases, regions)
    _, toy = adapter.encode(bases, {"toy": None})
    # both share the superclass: each takes the occurrence where its own word stood
    assert rows == [[toy["toy"][0][0], toy["toy"][1][1]], [toy["toy"][0][1], toy["toy"][1][0]]]
    with pytest.raises(ValueError, match="does not contain the concept word 'boxy'"):
        mask_rows(adapter, ["a hugsy alone"], ["a toy alone"], regions)


def test_sampling_runs_each_concept_in_its_own_pass_and_zero_masks_give_the_base_image(trained, monkeypatch):
    adapter, c = trained
    hooks = attach(adapter.diffusion_model)
    regions = [
        Region(Activation(c["hugsy"], 0.6, 0.15), ["a hugsy at the left"] * 2),
        Region(Activation(c["mochi"], 0.6, 0.15), ["a mochi at the right"] * 2),
    ]
    prompts = ["a hugsy at the left and a mochi at the right"] * 2
    kw = dict(latent_shape=(4, 8, 8), steps=3, seed=5)
    seen, masks_seen = [], []
    real_apply, real_blend = adapter.apply_model, regional.blend

    def spy_apply(x, t, context):
        seen.append([i.concept.token for i in hooks.activations.items])
        return real_apply(x, t, context)

    def spy_blend(base, own, masks):
        masks_seen.append(masks)
        return real_blend(base, own, masks)

    monkeypatch.setattr(adapter, "apply_model", spy_apply)
    monkeypatch.setattr(regional, "blend", spy_blend)
    out = generate_regional(adapter, prompts, regions, **kw)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()  # decoded: the tiny first stage
    assert seen == [[], ["hugsy"], ["mochi"]] * 3  # per step: the base pass, then each concept alone
    assert all(0 <= m.min() and m.max() <= 1 and m.max() > 0.99 for ms in masks_seen for m in ms)
    assert hooks.activations.items == []  # nothing left switched on
    assert torch.equal(out, generate_regional(adapter, prompts, regions, **kw))  # reproducible
    monkeypatch.setattr(adapter, "apply_model", real_apply)
    monkeypatch.setattr(regional, "min_max", lambda maps: torch.zeros_like(maps))  # no region anywhere
    alone = generate_regional(adapter, prompts, regions, **kw)
    base = generate(adapter, ["a toy at the left and a cat at the right"] * 2, **kw)
    assert torch.allclose(alone, base, atol=1e-5)
    assert (out - base).abs().max() > 1e-3  # control: with the regions, the concepts change the image
    with pytest.raises(ValueError, match="one prompt per image"):
        generate_regional(adapter, prompts, [Region(regions[0].item, ["x"])], **kw)
