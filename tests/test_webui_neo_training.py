"""Training on Forge Neo's backend (tests/forge_standin): the tiny model built as Neo's loader builds one (weights
as inference tensors, conditioning and VAE under inference_mode, transformer blocks adding residuals in place,
KModel returning x0), trained through BackendAdapter and the tab's own training path."""

from __future__ import annotations

import pytest
import torch
import webui_host as host
from modules import errors, shared
from tiny import tiny_adapter

from perfusion import load_concept
from perfusion.diffusion import pooled
from perfusion.webui import host as perfusion_host
from perfusion.webui import tab, training
from perfusion.webui.adapter import adapter_for
from perfusion.webui.backend_adapter import (
    BackendAdapter,
    copies_into_norms,
    differentiable_attention,
    make_trainable,
)
from perfusion.webui.training import TrainForm


@pytest.fixture(scope="module")
def neo():
    with host.forge_standin():
        host.load_extension()
        host.load_model()
        from backend.diffusion_engine.sd15 import StableDiffusion

        was = shared.sd_model
        shared.sd_model = StableDiffusion(tiny_adapter(seed=3))
        yield shared.sd_model
        shared.sd_model = was
        host.unload_extension()


@pytest.fixture
def photos(neo, tmp_path):
    host.reset()
    folder = host.write_photos(tmp_path / "photos")
    shared.opts.data["perfusion_dir"] = str(tmp_path / "concepts")
    shared.opts.data["perfusion_covariance_prompts"] = 128
    yield folder
    shared.opts.data.pop("perfusion_covariance_prompts", None)
    assert errors.exception_records == []


def unet_of(model) -> torch.nn.Module:
    return model.forge_objects.unet.model.diffusion_model


def inputs(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, adapter.context_dim, generator=g)
    return x, torch.tensor([100, 700]), context


def test_neo_is_told_and_gets_the_backend_adapter(neo):
    assert perfusion_host.kind() == "neo"
    adapter = adapter_for(neo, 64)
    assert isinstance(adapter, BackendAdapter) and adapter.arch == "other" and adapter.prediction == "v"
    assert adapter.model_hash == "neo00000" and adapter.context_dim == 64  # 768 wide: "sd1"


def test_as_loaded_the_weights_refuse_backward_and_the_adapter_trains_through_them(neo):
    from backend import memory_management

    memory_management.unload_all_models()
    memory_management.load_model_gpu(neo.forge_objects.unet)  # as a generation leaves them: inference tensors
    x, t, context = inputs(BackendAdapter(neo, 64))
    context.requires_grad_(True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):  # the control: Neo's model as it is
        with copies_into_norms(unet_of(neo)):
            unet_of(neo)(x, t.float(), context=context).square().mean().backward()
    out = BackendAdapter(neo, 64).apply_model(x, t, context)
    out.square().mean().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


def test_the_in_place_residual_adds_need_a_copy_into_each_norm(neo):
    adapter = BackendAdapter(neo, 64)
    make_trainable([unet_of(neo)])
    x, t, context = inputs(adapter)
    context.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inplace"):  # the control: without the copies
        unet_of(neo)(x, t.float(), context=context).square().mean().backward()
    with copies_into_norms(unet_of(neo)):
        unet_of(neo)(x, t.float(), context=context).square().mean().backward()
    assert context.grad.abs().sum() > 0
    hooks = [m._forward_pre_hooks for m in unet_of(neo).modules() if isinstance(m, torch.nn.LayerNorm)]
    assert hooks and not any(hooks)  # removed after


def test_make_trainable_keeps_values_and_shared_weights(neo):
    from backend import memory_management

    memory_management.unload_all_models()
    memory_management.load_model_gpu(neo.forge_objects.clip.patcher)
    encoder = neo.forge_objects.clip.cond_stage_model
    table = encoder.clip_l.transformer.text_model.embeddings.token_embedding
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert table.weight is table.wrapped.weight and table.weight.is_inference()
    assert make_trainable([encoder]) > 0
    assert table.weight is table.wrapped.weight and not table.weight.is_inference()  # one copy, seen twice
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert make_trainable([encoder]) == 0


def test_apply_model_is_the_unets_prediction_not_kmodels_x0(neo):
    adapter = BackendAdapter(neo, 64)
    x, t, context = inputs(adapter, seed=1)
    with torch.no_grad():
        got = adapter.apply_model(x, t, context)
        want = unet_of(neo)(x, t.float(), context=context)
        kmodel = neo.forge_objects.unet.model
        sigma = kmodel.predictor.sigmas[t]
        x0 = kmodel.apply_model(x * (sigma**2 + 1).sqrt()[:, None, None, None], sigma, c_crossattn=context)
    assert torch.allclose(got, want, atol=1e-6)
    assert (got - x0).abs().max() > 0.1  # the control: KModel.apply_model's answer is another quantity


def test_encode_reaches_the_embedding_and_leaves_no_trace(neo):
    from backend.text_processing import classic_engine

    adapter = BackendAdapter(neo, 64)
    classic_engine.last_extra_generation_params.clear()
    classic_engine.last_extra_generation_params["TI"] = "a user's embedding"
    vec = (adapter.word_embedding("teddy")[""] + 0.1).requires_grad_(True)
    context, rows = adapter.encode(["a photo of hugsy", "hugsy"], {"hugsy": {"": vec}, "teddy": None})
    assert rows["hugsy"] == [[4], [1]] and rows["teddy"] == [[], []]
    # a plain sum of a LayerNorm output is constant: its gradient is float noise, so weigh the row
    (context[0, 4] * torch.randn(context.shape[-1], generator=torch.Generator().manual_seed(0))).sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 1e-3
    assert classic_engine.last_extra_generation_params == {"TI": "a user's embedding"}
    assert "hugsy" not in neo.text_processing_engine.embeddings.word_embeddings
    with torch.no_grad():
        plain, _ = adapter.encode(["a photo of hugsy"])
    assert (plain[0, 4] - context[0, 4].detach()).abs().max() > 1e-3  # the learned vector changed the row
    # the control: the host's own entry point keeps nothing for autograd
    assert not neo.get_learned_conditioning(["a photo of teddy"]).requires_grad


def test_a_load_between_steps_is_undone_before_the_next(neo):
    from backend import memory_management

    adapter = BackendAdapter(neo, 64)
    memory_management.unload_all_models()  # a generation or LoRA change in between reloads under inference mode
    vec = adapter.word_embedding("teddy")[""].requires_grad_(True)
    context, rows = adapter.encode(["a photo of hugsy"], {"hugsy": {"": vec}})
    x, t, _ = inputs(adapter)
    adapter.apply_model(x[:1], t[:1], context).square().mean().backward()
    assert vec.grad.abs().sum() > 0


def test_differentiable_attention_replaces_only_functions_without_a_backward(neo, monkeypatch):
    from backend import attention
    from backend.nn import unet

    for chosen, inside in (
        (attention.attention_sage, attention.attention_pytorch),
        (attention.attention_xformers, attention.attention_xformers),  # the control: it has a backward
    ):
        monkeypatch.setattr(unet, "attention_function", chosen)
        with differentiable_attention():
            assert unet.attention_function is inside
        assert unet.attention_function is chosen


def test_with_sageattention_chosen_the_gradient_still_reaches_the_keys_and_values(neo, monkeypatch):
    from backend import attention
    from backend.nn import unet

    monkeypatch.setattr(unet, "attention_function", attention.attention_sage)
    adapter = BackendAdapter(neo, 64)
    make_trainable([unet_of(neo)])
    x, t, context = inputs(adapter)
    context.requires_grad_(True)
    with copies_into_norms(unet_of(neo)), pytest.raises(RuntimeError, match="does not require grad"):
        # the control: with the backend's own choice nothing leads back to the context
        unet_of(neo)(x, t.float(), context=context).square().mean().backward()
    adapter.apply_model(x, t, context).square().mean().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_a_half_precision_unet_trains_close_to_fp32(neo, dtype, tolerance):
    """Forge and Neo compute in fp16/bf16 on a GPU: the step's prediction and the gradient reaching the context
    stay close to fp32's (relative to their largest value) and finite. The loss is scaled as the trainer's
    GradScaler scales it for fp16 weights (its gradients would otherwise sit near fp16's smallest numbers)."""
    adapter = BackendAdapter(neo, 64)
    x, t, context = inputs(adapter, seed=2)

    def step():
        c = context.clone().requires_grad_(True)
        out = adapter.apply_model(x, t, c)
        (out.square().mean() * 2.0**16).backward()
        return out.detach(), c.grad / 2.0**16

    want, want_grad = step()
    kmodel = neo.forge_objects.unet.model
    unet_of(neo).to(dtype)
    unet_of(neo).dtype = kmodel.computation_dtype = adapter.dtype = dtype
    try:
        got, grad = step()
    finally:
        unet_of(neo).float()
        unet_of(neo).dtype = kmodel.computation_dtype = torch.float32
    assert got.dtype == torch.float32 and torch.isfinite(grad).all()
    assert (got - want).abs().max() < tolerance * want.abs().max()
    assert (grad - want_grad).abs().max() < 2 * tolerance * want_grad.abs().max()


def form(photos, **kw) -> TrainForm:
    base = dict(name="neobear", token="neobear", superclass="teddy", folder=str(photos), steps=4, batch_size=2)
    base.update(grad_accum=1, resolution=64, save_every=2, preview_every=2, report_samples=2)
    return TrainForm(**{**base, **kw})


def test_training_runs_on_neo_and_leaves_the_model_as_it_was(neo, photos):
    weights = {k: v.clone() for k, v in unet_of(neo).state_dict().items()}
    previews = []
    result = training.train(form(photos), lambda concept, step: previews.append(step))
    assert result.state == "done", result.message
    concept = load_concept(result.concept)
    assert concept.steps == 4 and concept.arch == "other" and concept.superclass == "teddy"
    assert previews == [0, 2, 4] and result.report is not None
    start = BackendAdapter(neo, 64).word_embedding("teddy")[""]
    assert (concept.embedding[""] - start).abs().max() > 1e-4  # the embedding learned
    assert all(torch.equal(weights[k], v) for k, v in unet_of(neo).state_dict().items())


def test_the_tabs_preview_generates_on_neo(neo, photos):
    show = tab.preview(form(photos))
    picture = show(load_concept(training.train(form(photos, existing="overwrite")).concept), 4)
    assert picture.size == (64, 64)


def test_a_quantized_unet_is_named_by_check(neo, photos, monkeypatch):
    class ParameterGGUF(torch.nn.Parameter):  # how quantized storage shows itself: another Parameter type
        pass

    layer = next(m for m in unet_of(neo).modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setitem(layer._parameters, "weight", ParameterGGUF(layer.weight.detach(), requires_grad=False))
    problems, _ = training.check(form(photos))
    assert any("quantized storage" in p and "ParameterGGUF" in p for p in problems), problems
    monkeypatch.undo()
    assert not any("quantized" in p for p in training.check(form(photos))[0])


def test_a_checkpoint_chosen_and_not_loaded_yet_is_loaded_for_training(neo, photos, monkeypatch):
    """Neo loads the checkpoint chosen in the UI only when a job needs it (`sd_models.forge_model_reload`, which
    every generation calls first), so after a start there is no model until the first image. Training loads it
    the same way, inside its job; the API's check before queueing does not count it as missing."""
    from modules import sd_models

    class ModelData:  # Neo's sd_models.model_data: the chosen checkpoint's parameters, and those of the loaded one
        forge_loading_parameters: dict = {}
        forge_hash = ""

    data, loads = ModelData(), []

    @torch.inference_mode()
    def forge_model_reload():  # Neo's: loads when the chosen parameters differ from the loaded ones
        current = str(data.forge_loading_parameters)
        if data.forge_hash == current:
            return shared.sd_model, False
        try:
            assert data.forge_loading_parameters["checkpoint_info"] is not None
        except Exception:
            raise ValueError("Failed to find available model...") from None
        loads.append(current)
        shared.sd_model, data.forge_hash = neo, current
        return neo, True

    monkeypatch.setattr(shared, "sd_model", None)
    monkeypatch.setattr(sd_models, "model_data", data, raising=False)
    monkeypatch.setattr(sd_models, "forge_model_reload", forge_model_reload, raising=False)
    missing = "no model is loaded: choose a Stable Diffusion checkpoint first"
    quick = form(photos, name="lazybear", steps=2, preview_every=0, report_samples=0)
    # no checkpoint chosen: named, whether or not the check may load one
    assert missing in training.check(quick)[0] and missing in training.check(quick, load=True)[0]
    assert training.train(quick).state == "failed" and loads == []
    data.forge_loading_parameters = {"checkpoint_info": "tiny-sd15-neo.safetensors [663b4cd7]"}
    # chosen: the check outside the queue lock (the API's) neither complains nor loads
    assert training.check(quick)[0] == [] and shared.sd_model is None
    result = training.train(quick)  # the job loads it, as a generation would
    assert result.state == "done", result.message
    assert len(loads) == 1 and shared.sd_model is neo and load_concept(result.concept).steps == 2
    again = form(photos, name="lazybear2", steps=2)
    assert training.check(again, load=True)[0] == [] and len(loads) == 1  # loaded already: not again


@pytest.fixture
def neo_xl(neo):
    """Neo with an SDXL-shaped model (the A1111 SDXL stand-in's encoders and U-Net, built as Neo builds them)."""
    from backend.diffusion_engine.sdxl import StableDiffusionXL
    from webui_host_sdxl import SIZE_FEATURES, TinySDXLModel

    parts = TinySDXLModel(seed=4)
    clip_l, clip_g = (e.encoder for e in parts.conditioner.embedders)
    shared.sd_model = StableDiffusionXL(clip_l, clip_g, parts.model.diffusion_model, parts.adapter, SIZE_FEATURES)
    yield shared.sd_model
    shared.sd_model = neo


def test_sdxl_both_halves_learn_and_the_size_conditioning_reaches_the_unet(neo_xl):
    adapter = adapter_for(neo_xl, 64)
    assert adapter.arch == "sdxl" and adapter.prediction == "eps"
    start = adapter.word_embedding("teddy")
    assert {k: tuple(v.shape) for k, v in start.items()} == {"clip_l": (1, 768), "clip_g": (1, 1280)}
    emb = {k: (v + 0.1).requires_grad_(True) for k, v in start.items()}
    context, rows = adapter.encode(["a photo of hugsy"], {"hugsy": emb}, size=(64, 128))
    vector = pooled(context)
    assert context.shape[-1] == 2048 and rows["hugsy"] == [[4]] and vector.shape == (1, 1280 + 48)
    other, _ = adapter.encode(["a photo of hugsy"], {"hugsy": emb}, size=(128, 64))
    assert not torch.equal(vector[:, 1280:], pooled(other)[:, 1280:]) and torch.equal(
        vector[:, :1280], pooled(other)[:, :1280]
    )
    x, t, _ = inputs(adapter)
    out = adapter.apply_model(x[:1], t[:1], context)
    out.square().mean().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in emb.values())
    with torch.no_grad():  # the vector is the U-Net's y: another size, another prediction
        assert (adapter.apply_model(x[:1], t[:1], other) - out).abs().max() > 1e-5


def test_sdxl_trains_on_neo(neo_xl, photos):
    result = training.train(form(photos, name="xlbear", token="xlbear", preview_every=0, report_samples=0))
    assert result.state == "done", result.message
    concept = load_concept(result.concept)
    assert concept.arch == "sdxl" and set(concept.embedding) == {"clip_l", "clip_g"} and concept.steps == 4


def test_forge_trains_through_the_same_adapter(neo, photos, monkeypatch):
    """lllyasviel's Forge (main @ dfdcbab6) has the same backend objects: told apart from Neo by its version, it
    gets BackendAdapter and trains."""
    from modules_forge import forge_version

    monkeypatch.setattr(forge_version, "version", "f2.0.1v1.10.1-previous-669-gdfdcbab6")
    perfusion_host.kind.cache_clear()
    try:
        assert perfusion_host.kind() == "forge" and isinstance(adapter_for(neo, 64), BackendAdapter)
        result = training.train(form(photos, name="forgebear", steps=2, preview_every=0, report_samples=0))
        assert result.state == "done" and load_concept(result.concept).steps == 2
    finally:
        monkeypatch.undo()
        perfusion_host.kind.cache_clear()
