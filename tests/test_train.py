"""The trainer end to end on a tiny real-architecture model (ldm UNetModel + CLIPTextModel, real tokenizer)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tiny import pattern_images, tiny_adapter, tiny_covariance

import perfusion
from perfusion.dataset import soft_mask
from perfusion.diffusion import q_sample, training_target
from perfusion.hooks import Activation, attach
from perfusion.train import NonFiniteError, TrainConfig, Trainer, TrainError


@pytest.fixture(scope="module")
def world():
    adapter = tiny_adapter("v")
    return adapter, tiny_covariance(adapter), pattern_images(3)


def config(**kw):
    base = dict(
        name="hugsy",
        token="hugsy",
        superclass="toy",
        steps=8,
        batch_size=2,
        grad_accum=2,
        seed=7,
        lr_values=0.03,
        lr_embedding=0.006,
    )
    base.update(kw)
    return TrainConfig(**base)


def eval_loss(adapter, trainer, concept) -> float:
    """Loss on fixed draws (never used in training), with `concept` active at the train gate."""
    hooks = attach(adapter.diffusion_model)
    hooks.activate([Activation(concept, 0.75, 0.10)])
    total = 0.0
    with torch.no_grad():
        for k in range(6):
            x0, mask, prompts, t, noise, _ = trainer._micro_batch(10_000, k)
            context, _ = adapter.encode(prompts, {concept.token: concept.embedding})
            pred = adapter.apply_model(q_sample(x0, t, noise, adapter.alphas_cumprod), t, context)
            total += float((pred - training_target(x0, t, noise, adapter.alphas_cumprod, "v")).square().mean())
    hooks.clear()
    return total / 6


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_loss_falls_and_only_the_concept_changes(world, tmp_path):
    adapter, cov, images = world
    before_unet, before_text = snapshot(adapter.diffusion_model), snapshot(adapter.text_encoder)
    progress = []
    # a random U-Net attends ~uniformly over 77 rows, so the concept row has little leverage: a larger
    # value learning rate makes the (deterministic) fall clear in 25 steps
    cfg = config(steps=25, lr_values=0.3, lr_embedding=0.05)
    trainer = Trainer(adapter, cov, cfg, images, None, tmp_path, tmp_path / "hugsy.safetensors")
    state = trainer._init_state()
    init = trainer._concept(state, state.i_star, 0)
    result = trainer.run(progress=progress.append)
    assert result.step == 25 and not result.interrupted and len(result.losses) == 25
    assert eval_loss(adapter, trainer, result.concept) < eval_loss(adapter, trainer, init) - 0.005
    # the base model is untouched, bit for bit
    assert all(torch.equal(v, snapshot(adapter.diffusion_model)[k]) for k, v in before_unet.items())
    assert all(torch.equal(v, snapshot(adapter.text_encoder)[k]) for k, v in before_text.items())
    # what did change: the embedding row, every value target, and i* (EMA)
    c = perfusion.load_concept(result.path)
    assert not torch.allclose(c.embedding[""].float(), init.embedding[""].float(), atol=1e-4)
    assert all(not torch.allclose(c.values[k].float(), init.values[k].float(), atol=1e-3) for k in c.values)
    assert not torch.allclose(c.i_star.float(), init.i_star.float(), atol=1e-5)
    assert c.keys == {} and c.method == "perfusion" and c.steps == 25 and c.covariance_hash == cov.hash
    assert [p.step for p in progress] == list(range(1, 26)) and progress[-1].eta_s == 0
    rows = list(csv.reader(open(tmp_path / "hugsy.loss.csv")))
    assert rows[0][:3] == ["step", "loss", "smoothed_loss"] and len(rows) == 26
    # the run's summary in the keys other tools read
    meta = c.shared_metadata
    assert (
        meta["ss_steps"] == "25" and meta["ss_max_train_steps"] == "25" and meta["modelspec.trigger_phrase"] == "hugsy"
    )
    assert meta["ss_num_train_images"] == str(len(images)) and meta["ss_learning_rate"] == "0.3"
    assert meta["modelspec.resolution"] == f"{images.shape[-1]}x{images.shape[-1]}"
    assert meta["ss_enable_bucket"] == "False"


def test_buckets_put_one_size_in_each_micro_batch_and_condition_on_it(world, tmp_path, monkeypatch):
    """Images of two sizes (aspect-ratio buckets): each keeps its own latents and mask grid, a micro-batch never
    mixes sizes, both sizes are drawn, the text encoder hears the batch's size, the metadata lists the buckets."""
    adapter, cov, images = world
    tall = [F.interpolate(images[i : i + 1], size=(48, 16), mode="area")[0] for i in (1, 2)]  # 1:3 portraits
    heard = []
    encode = adapter.encode

    def spy(prompts, words=None, size=None):
        heard.append(size)
        return encode(prompts, words, size)

    monkeypatch.setattr(adapter, "encode", spy)
    given = torch.zeros(48, 16)
    given[:24] = 1  # the upper half
    cfg = config(steps=2, batch_size=2, grad_accum=1)
    trainer = Trainer(adapter, cov, cfg, [images[0], *tall], [None, given, "attention"], tmp_path, tmp_path / "b.sft")
    assert [tuple(z.shape) for z in trainer.latents] == [(2, 4, 16, 16), (2, 4, 24, 8), (2, 4, 24, 8)]
    assert torch.allclose(trainer.masks[1][0], soft_mask(given, (24, 8)))
    assert trainer.masks[2][0].std() > 0.01  # the attention mask of a portrait, on its own grid
    latent_of = {(32, 32): (16, 16), (16, 48): (24, 8)}
    draws = [trainer._micro_batch(step, 0) for step in range(12)]
    for x0, mask, _, _, _, size in draws:
        assert tuple(x0.shape[-2:]) == tuple(mask.shape[-2:]) == latent_of[size]
    assert {d[-1] for d in draws} == {(32, 32), (16, 48)}
    heard.clear()
    result = trainer.run()
    # one size-free pass averages i_super over the templates; every training micro-batch names its size
    assert heard[0] is None and heard[1:] and set(heard[1:]) <= {(32, 32), (16, 48)}
    assert all(math.isfinite(v) for v in result.losses)
    meta = result.concept.shared_metadata
    assert meta["ss_enable_bucket"] == "True" and meta["modelspec.resolution"] == "32x32"
    assert json.loads(meta["ss_bucket_info"]) == {
        "buckets": {"0": {"resolution": [32, 32], "count": 1}, "1": {"resolution": [16, 48], "count": 2}}
    }


def test_keys_stay_locked_to_the_superclass(world, tmp_path):
    adapter, cov, images = world
    trainer = Trainer(adapter, cov, config(steps=4), images, None, tmp_path, tmp_path / "k.safetensors")
    concept = trainer.run().concept
    hooks = attach(adapter.diffusion_model)
    hooks.activate([Activation(concept, 0.75, 0.10)])
    with torch.no_grad():
        ctx, rows = adapter.encode(["a photo of a hugsy"], {"hugsy": concept.embedding})
        rows = rows["hugsy"]
        for attn in hooks.layers.values():
            k_concept = attn.to_k(ctx)[0, rows[0][0]]
            k_super = attn.to_k.weight @ concept.i_super.float()
            g = torch.sigmoid((concept.a.float() @ ctx[0, rows[0][0]].float() - 0.75) / 0.10)
            s = concept.a.float() @ ctx[0, rows[0][0]].float()
            expected = (
                attn.to_k.weight @ ctx[0, rows[0][0]] - s * (attn.to_k.weight @ concept.i_star.float()) + g * k_super
            )
            assert torch.allclose(k_concept, expected, atol=1e-4)
            # at i* itself the key is the gated superclass key
            k_at_star = attn.to_k(concept.i_star.float()[None, None])[0, 0]
            g1 = torch.sigmoid(torch.tensor((1 - 0.75) / 0.10))
            assert torch.allclose(k_at_star, g1 * k_super, atol=1e-4)
    hooks.clear()
    # i_super: the superclass word's encoding, averaged over every template written with it (issue 16: one
    # micro-batch, a single prompt at batch size 1, used to decide it)
    prompts = sorted({t.replace("[name]", "toy").replace("[filewords]", "").strip() for t in trainer.cfg.templates})
    with torch.no_grad():
        ctx, rows = adapter.encode(prompts, {"toy": None})
        rows = rows["toy"]
    assert torch.allclose(concept.i_super, torch.stack([ctx[b, r[0]] for b, r in enumerate(rows)]).mean(0), atol=1e-5)
    one_batch = trainer._micro_batch(0, 0, word="toy")[2]
    with torch.no_grad():
        ctx1, rows1 = adapter.encode(one_batch, {"toy": None})
    first = torch.stack([ctx1[b, r[0]] for b, r in enumerate(rows1["toy"])]).mean(0)
    assert not torch.allclose(concept.i_super, first, atol=1e-3)  # not the first micro-batch's any more


def test_hard_lock_training_holds_the_key_at_the_superclass_and_is_stored(world, tmp_path, monkeypatch):
    """lock='hard': every training forward sees K = W_K i_super at i* (not the gated g W_K i_super of local
    locking); the file says 'hard' and an Activation without a lock applies it so."""
    adapter, cov, images = world
    seen = []
    real = perfusion.hooks.Editor.activate

    def spy(self, activations):
        seen.extend(a.lock for a in (activations.items if hasattr(activations, "items") else activations))
        return real(self, activations)

    monkeypatch.setattr(perfusion.hooks.Editor, "activate", spy)
    result = Trainer(
        adapter, cov, config(steps=3, lock="hard"), images, None, tmp_path, tmp_path / "h.safetensors"
    ).run()
    assert seen and set(seen) == {"hard"}
    c = perfusion.load_concept(result.path)
    assert c.lock == "hard" and Activation(c).lock == "hard" and Activation(c, lock="local").lock == "local"
    hooks = attach(adapter.diffusion_model)
    hooks.activate([Activation(c, 0.75, 0.10)])
    with torch.no_grad():
        for attn in hooks.layers.values():
            k_at_star = attn.to_k(c.i_star.float()[None, None])[0, 0]
            assert torch.allclose(k_at_star, attn.to_k.weight @ c.i_super.float(), atol=1e-4)
    hooks.clear()
    with pytest.raises(TrainError, match="lock must be one of local, hard"):
        config(lock="global").check()


def test_confined_training_shows_the_unet_the_superclass_prompt_but_on_the_words_rows(world, tmp_path, monkeypatch):
    """confine=True: every context row but the concept word's is the superclass prompt's encoding (the learned
    word cannot ride on the rows after it); the word's own row is its own (and trains the embedding)."""
    from perfusion.train import confined_context

    adapter, cov, images = world
    trainer = Trainer(adapter, cov, config(steps=1, confine=True), images, None, tmp_path, tmp_path / "c.safetensors")
    seen = []
    real = adapter.apply_model
    monkeypatch.setattr(adapter, "apply_model", lambda x, t, c: seen.append(c.detach().clone()) or real(x, t, c))
    state = trainer._init_state()  # a learned word: away from the superclass's embedding, trainable
    state.embedding = {k: (v + 0.5 * torch.randn_like(v)).requires_grad_() for k, v in state.embedding.items()}
    trainer._micro_step(state, attach(adapter.diffusion_model), torch.amp.GradScaler(enabled=False), 0, 0)
    prompts = trainer._micro_batch(0, 0)[2]
    with torch.no_grad():
        own, rows = adapter.encode(prompts, {"hugsy": state.embedding})
        twin, _ = adapter.encode(prompts, {"hugsy": adapter.word_embedding("toy")})
    keep = torch.zeros(own.shape[:2], dtype=torch.bool)
    for b, r in enumerate(rows["hugsy"]):
        keep[b, r] = True
    assert keep.any() and (~keep).any()
    assert torch.allclose(seen[0][~keep], twin[~keep], atol=1e-5)
    assert torch.allclose(seen[0][keep], own[keep], atol=1e-5)
    assert not torch.allclose(own[~keep], twin[~keep], atol=1e-3)  # the causal encoder did carry the word on
    assert torch.equal(confined_context(own, twin, {}), twin)  # no concept: the superclass prompt throughout


def test_interrupt_and_resume_equals_an_uninterrupted_run(world, tmp_path):
    adapter, cov, images = world
    straight = Trainer(adapter, cov, config(), images, None, tmp_path / "a", tmp_path / "a.safetensors").run()
    calls = {"n": 0}

    def stop_after_seven():
        calls["n"] += 1
        return calls["n"] > 7  # mid-way through step 4's accumulation

    first = Trainer(adapter, cov, config(), images, None, tmp_path / "b", tmp_path / "b.safetensors")
    part = first.run(should_stop=stop_after_seven)
    assert part.interrupted and part.step == 3 and part.path.exists()  # interrupt still saves
    resumed = Trainer(adapter, cov, config(), images, None, tmp_path / "b", tmp_path / "b.safetensors").run(resume=True)
    assert resumed.step == 8 and not resumed.interrupted
    assert resumed.losses == straight.losses
    for k, v in straight.concept.values.items():
        assert torch.equal(resumed.concept.values[k], v)
    assert torch.equal(resumed.concept.embedding[""], straight.concept.embedding[""])
    assert torch.equal(resumed.concept.i_star, straight.concept.i_star)
    rows = list(csv.reader(open(tmp_path / "b" / "hugsy.loss.csv")))
    assert [r[0] for r in rows[1:]] == [str(s) for s in range(1, 9)]


@pytest.mark.parametrize("where", ["text encoder", "loss"])
def test_nan_stops_before_the_step_and_keeps_the_last_finite_files(world, tmp_path, monkeypatch, where):
    adapter, cov, images = world
    poisoned = {"on": False}
    encode, apply_model = adapter.encode, adapter.apply_model

    def nan_encode(prompts, words=None, size=None):
        context, rows = encode(prompts, words, size)
        return (context * float("nan") if poisoned["on"] and where == "text encoder" else context), rows

    def nan_apply(x, t, context):
        out = apply_model(x, t, context)
        return out * float("inf") if poisoned["on"] and where == "loss" else out

    monkeypatch.setattr(adapter, "encode", nan_encode)
    monkeypatch.setattr(adapter, "apply_model", nan_apply)
    trainer = Trainer(adapter, cov, config(save_every=1), images, None, tmp_path, tmp_path / "n.safetensors")
    with pytest.raises(NonFiniteError, match=f"step 3: the {where}") as raised:
        trainer.run(progress=lambda p: poisoned.update(on=p.step == 2))
    assert raised.value.where == where
    on_disk = perfusion.load_concept(tmp_path / "hugsy-00002.safetensors")  # validation refuses NaN: finite
    assert on_disk.steps == 2 and not (tmp_path / "n.safetensors").exists()
    poisoned["on"] = False
    resumed = Trainer(adapter, cov, config(save_every=1), images, None, tmp_path, tmp_path / "n.safetensors").run(
        resume=True
    )
    assert resumed.step == 8 and torch.isfinite(resumed.concept.embedding[""]).all()


def test_resume_refuses_a_different_run_and_a_missing_checkpoint(world, tmp_path):
    adapter, cov, images = world
    Trainer(adapter, cov, config(steps=2), images, None, tmp_path, tmp_path / "c.safetensors").run()
    with pytest.raises(TrainError, match="superclass"):
        Trainer(adapter, cov, config(superclass="dog"), images, None, tmp_path, tmp_path / "c.safetensors").run(
            resume=True
        )
    with pytest.raises(TrainError, match="nothing to resume"):
        Trainer(adapter, cov, config(name="other"), images, None, tmp_path, tmp_path / "d.safetensors").run(resume=True)


def test_superclass_must_be_one_token(world, tmp_path):
    adapter, cov, images = world
    with pytest.raises(TrainError, match="'teddy bear' is 2 tokens.*teddy, bear"):
        Trainer(adapter, cov, config(superclass="teddy bear"), images, None, tmp_path, tmp_path / "x.safetensors")
    with pytest.raises(TrainError, match="must differ"):
        Trainer(adapter, cov, config(token="toy"), images, None, tmp_path, tmp_path / "x.safetensors")


def test_masked_loss_ignores_the_background(world, tmp_path):
    adapter, cov, images = world
    masks = [torch.zeros(32, 32) for _ in range(3)]
    for m in masks:
        m[8:24, 8:24] = 1
    trainer = Trainer(adapter, cov, config(steps=1, flip=False), images, masks, tmp_path, tmp_path / "m.safetensors")
    grid = trainer.masks[0][0]  # image 0, unflipped
    assert grid.shape == (16, 16) and grid.mean() == pytest.approx(1.0, abs=1e-4)
    assert grid[0, 0] < 0.2 < 1.0 < grid[8, 8]


def test_infusion_run_writes_a_valid_small_file(world, tmp_path):
    adapter, cov, images = world
    cfg = config(method="infusion", token="toy", superclass="toy", steps=3, lr_values=0.01)
    result = Trainer(adapter, cov, cfg, images, None, tmp_path, tmp_path / "toy.safetensors").run()
    c = perfusion.load_concept(result.path)
    assert c.method == "infusion" and c.token == "toy" and c.embedding[""].shape[0] == 0
    assert all(v.abs().sum() > 0 for v in c.values.values())  # residuals learned from zero
    assert torch.equal(c.i_star, c.i_super)


def test_attention_masks_from_the_models_own_cross_attention(world, tmp_path):
    adapter, cov, images = world
    from perfusion.masks import attention_masks

    latents = adapter.encode_images(images)
    masks = attention_masks(adapter, latents, "toy", seed=7)  # the seed config() trains with
    assert masks.shape == (3, 16, 16) and masks.min() == 0 and masks.max() == 1
    assert masks.std() > 0.05  # not a constant map
    trainer = Trainer(
        adapter, cov, config(steps=1, flip=False), images, "attention", tmp_path, tmp_path / "a.safetensors"
    )
    from perfusion.dataset import soft_mask

    assert torch.allclose(trainer.masks[1][0], soft_mask(masks[1], (16, 16)))
    with pytest.raises(TrainError, match="'attention' or None"):
        Trainer(adapter, cov, config(), images, "alpha", tmp_path, tmp_path / "a.safetensors")


def test_a_caption_may_place_the_word_itself(world, tmp_path):
    """[filewords] is filled before [name], as in the WebUI's textual-inversion dataset: a caption holding [name]
    puts the concept's word (and, for i_super, the superclass word) where the caption says; a template without
    [name] needs [name] in every caption."""
    adapter, cov, images = world
    cfg = TrainConfig(
        name="h",
        token="hugsy",
        superclass="toy",
        steps=1,
        batch_size=2,
        templates=("a photo of [filewords]",),
        flip=False,  # mirrored copies: the next test
    )
    captions = ["a small [name] at the left", "a big [name] at the top"]
    trainer = Trainer(adapter, cov, cfg, images[:2], None, tmp_path, tmp_path / "h.safetensors", captions=captions)
    prompts = set(trainer._micro_batch(0, 0)[2]) | set(trainer._micro_batch(1, 0)[2])
    assert prompts <= {"a photo of a small hugsy at the left", "a photo of a big hugsy at the top"} and prompts
    supers = set(trainer._micro_batch(0, 0, word="toy")[2])
    assert supers <= {"a photo of a small toy at the left", "a photo of a big toy at the top"}
    with pytest.raises(TrainError, match="image 2's caption 'at the top' has no"):
        Trainer(
            adapter,
            cov,
            cfg,
            images[:2],
            None,
            tmp_path,
            tmp_path / "x.safetensors",
            captions=[captions[0], "at the top"],
        )
    usual = replace(cfg, templates=("a [name] [filewords]",))
    plain = Trainer(
        adapter,
        cov,
        usual,
        images[:2],
        None,
        tmp_path,
        tmp_path / "p.safetensors",
        captions=["at the left", "at the top"],
    )
    assert set(plain._micro_batch(0, 0)[2]) <= {"a hugsy at the left", "a hugsy at the top"}


def test_a_mirrored_photo_trains_with_its_caption_mirrored(world, tmp_path):
    """With flip on, a mirrored copy's caption says right where the photo's says left (and the reverse); a caption
    that names no side is the same for both copies."""
    from perfusion.train import mirror_caption

    assert mirror_caption("Left of a tree, LEFT arm, right-handed, at the right") == (
        "Right of a tree, RIGHT arm, left-handed, at the left"
    )
    assert mirror_caption("a leftover, rightly, in the centre") == "a leftover, rightly, in the centre"
    adapter, cov, images = world
    cfg = TrainConfig(name="h", token="hugsy", superclass="toy", steps=1, batch_size=4, templates=("[filewords]",))
    captions = ["a small [name] at the left", "a big [name] at the top"]
    trainer = Trainer(adapter, cov, cfg, images[:2], None, tmp_path, tmp_path / "h.safetensors", captions=captions)
    want = {
        (0, 0): "a small hugsy at the left",
        (0, 1): "a small hugsy at the right",
        (1, 0): "a big hugsy at the top",
        (1, 1): "a big hugsy at the top",
    }
    seen = set()
    for step in range(8):
        x0, _, prompts, *_ = trainer._micro_batch(step, 0)
        for z, prompt in zip(x0, prompts):
            (drawn,) = [(i, f) for i, zs in enumerate(trainer.latents) for f in range(2) if torch.equal(zs[f], z)]
            assert prompt == want[drawn]
            seen.add(drawn)
    assert {(0, 0), (0, 1)} <= seen  # both copies of the placed photo were drawn


def test_templates_file(tmp_path):
    from perfusion.train import read_templates

    good = tmp_path / "t.txt"
    good.write_text("a photo of [name]\n\n[filewords], a [name]\n")
    assert read_templates(good) == ("a photo of [name]", "[filewords], a [name]")
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of [name]\na photo of a dog\n")
    with pytest.raises(TrainError, match="line 2"):
        read_templates(bad)
    with pytest.raises(TrainError, match="cannot read"):
        read_templates(tmp_path / "missing.txt")


def test_preview_and_snapshots_every_n_steps(world, tmp_path):
    adapter, cov, images = world
    seen = []

    def preview(concept, step):
        hooks = attach(adapter.diffusion_model)
        seen.append((step, [i.gate for i in hooks.activations.items], concept.steps))

    cfg = config(steps=4, grad_accum=1, save_every=2, preview_every=2, beta=0.6, tau=0.2)
    Trainer(adapter, cov, cfg, images, None, tmp_path, tmp_path / "p.safetensors").run(preview=preview)
    # step 0 (the starting point), then every 2: the concept is on, at the inference gate
    assert seen == [(0, [(0.6, 0.2)], 0), (2, [(0.6, 0.2)], 2), (4, [(0.6, 0.2)], 4)]
    snap = perfusion.load_concept(tmp_path / "hugsy-00002.safetensors")
    assert snap.steps == 2 and not (tmp_path / "hugsy-00004.safetensors").exists()  # the last one is the final file


def test_autocast_keeps_fp32_parameters(tmp_path):
    adapter = tiny_adapter("eps", seed=1)
    cov = tiny_covariance(adapter, prompts=128)
    seen = set()
    for attn in attach(adapter.diffusion_model).layers.values():
        attn.to_v.register_forward_hook(lambda m, a, y: seen.add(y.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the WebUI trains under autocast; CPU has bf16
        result = Trainer(
            adapter, cov, config(steps=2, grad_accum=1), pattern_images(2), None, tmp_path, tmp_path / "bf.safetensors"
        ).run()
    assert torch.bfloat16 in seen  # the edit really ran in low precision
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(v.dtype == torch.float32 for v in result.concept.values.values())
    assert result.concept.embedding[""].dtype == torch.float32
    assert perfusion.load_concept(result.path).values


def test_ablations_trained_keys_ungated_and_embedding_only(world, tmp_path):
    adapter, cov, images = world
    base = dict(steps=2, grad_accum=1, lr_values=0.3)
    trained = Trainer(
        adapter, cov, config(keys="trained", **base), images, None, tmp_path / "k", tmp_path / "k.safetensors"
    )
    state = trained._init_state()
    c = trained.run().concept
    assert set(c.keys) == set(c.values)
    assert all(not torch.allclose(c.keys[k], state.keys[k], atol=1e-4) for k in c.keys)  # keys moved
    ti = Trainer(adapter, cov, config(edit=False, **base), images, None, tmp_path / "t", tmp_path / "t.safetensors")
    init = ti._init_state()
    c_ti = ti.run().concept
    assert all(torch.equal(c_ti.values[k], init.values[k]) for k in c_ti.values)  # no edit: values untouched
    assert not torch.allclose(c_ti.embedding[""], init.embedding[""])
    c_rome = Trainer(
        adapter, cov, config(gated=False, **base), images, None, tmp_path / "r", tmp_path / "r.safetensors"
    ).run()
    assert c_rome.step == 2
    with pytest.raises(TrainError, match="keys"):
        config(keys="frozen").check()


def test_gradient_checkpointing_recomputes_blocks_and_trains_the_same(world, tmp_path):
    adapter, cov, images = world
    to_k = next(iter(attach(adapter.diffusion_model).layers.values())).to_k
    calls = []
    handle = to_k.register_forward_hook(lambda m, a, y: calls.append(torch.is_grad_enabled()))
    try:
        plain = Trainer(adapter, cov, config(steps=3), images, None, tmp_path / "a", tmp_path / "a.safetensors").run()
        plain_calls, calls[:] = len(calls), []
        saved = Trainer(
            adapter,
            cov,
            config(steps=3, gradient_checkpointing=True),
            images,
            None,
            tmp_path / "b",
            tmp_path / "b.safetensors",
        ).run()
    finally:
        handle.remove()
    assert len(calls) == 2 * plain_calls  # every micro-step's block ran again in backward
    assert all(type(b).forward is b.forward.__func__ for b in adapter.diffusion_model.input_blocks)  # restored
    for k, v in plain.concept.values.items():  # gradients reached the concept's values and embedding alike
        torch.testing.assert_close(saved.concept.values[k], v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(saved.concept.embedding[""], plain.concept.embedding[""], rtol=1e-4, atol=1e-6)
    assert not torch.equal(
        plain.concept.embedding[""],
        Trainer(adapter, cov, config(steps=3), images, None, tmp_path / "c", tmp_path / "c.safetensors")
        ._init_state()
        .embedding[""],
    )


def test_gradient_checkpointing_refuses_an_unknown_unet_layout():
    from perfusion.checkpointing import checkpointed_blocks

    with pytest.raises(TypeError, match="ldm-style U-Net"):
        with checkpointed_blocks(torch.nn.Linear(2, 2)):
            pass


def test_masks_mix_files_none_and_the_models_attention(world, tmp_path):
    """Per image: a given mask is used as given, None trains unmasked, "attention" takes the model's own
    cross-attention on the superclass word (the tab's auto fallback); a bad entry is refused."""
    from perfusion.dataset import soft_mask

    adapter, cov, images = world
    given = torch.zeros(images.shape[-2:])
    given[:, : images.shape[-1] // 2] = 1
    trainer = Trainer(
        adapter, cov, config(flip=False), images, [given, None, "attention"], tmp_path, tmp_path / "m.safetensors"
    )
    grid = torch.stack([m[0] for m in trainer.masks])  # [N, h, w] loss weights on the latent grids
    assert torch.allclose(grid[0], soft_mask(given, grid.shape[-2:]))
    assert torch.equal(grid[1], torch.ones_like(grid[1]))
    assert grid[2].std() > 0.01 and abs(grid[2].mean() - 1) < 1e-4  # a real mask, mean 1
    with pytest.raises(perfusion.train.TrainError, match="masks must be"):
        Trainer(adapter, cov, config(), images, [None, "alpha", None], tmp_path, tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "schedule, warmup, expected",
    [
        ("constant", 0, [1, 1, 1, 1, 1]),
        ("constant", 2, [0.5, 1, 1, 1, 1]),
        ("linear", 0, [1, 0.8, 0.6, 0.4, 0.2]),
        ("linear", 1, [1, 1, 0.75, 0.5, 0.25]),
        ("cosine", 1, [1, 1, 0.8535534, 0.5, 0.1464466]),
    ],
)
def test_learning_rate_schedules(world, tmp_path, schedule, warmup, expected):
    adapter, cov, images = world
    cfg = config(steps=5, warmup_steps=warmup, lr_schedule=schedule)
    trainer = Trainer(adapter, cov, cfg, images, None, tmp_path, tmp_path / "s.safetensors")
    assert [trainer._lr_scale(s) for s in range(5)] == pytest.approx(expected)


def test_a_bad_schedule_is_refused():
    with pytest.raises(perfusion.train.TrainError, match="lr_schedule must be one of constant, cosine, linear"):
        config(lr_schedule="exponential").check()
