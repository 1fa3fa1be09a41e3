"""Regional composition in the WebUI stand-in (v1.10.1 call order), on the tiny model: two concepts in one prompt are
composed region by region by default, the paper's way stays selectable, and nothing is left behind."""

import pytest
import torch
import webui_host as host
from modules import infotext_utils, script_callbacks, sd_samplers

from perfusion.webui import composition
from perfusion.webui.state import runtime

PAIR = "a photo of <perfusion:hugsy> hugsy at the left and <perfusion:boxy> boxy at the right, on the moon"
UNPLACED = "a photo of <perfusion:hugsy> hugsy and <perfusion:boxy> boxy, on the moon"  # no place named
REGIONAL = (True, 0.7, 0.15, "local", "approximate", "regional")
TOGETHER = (True, 0.7, 0.15, "local", "approximate", "together")


world = host.world_fixture()


@pytest.fixture
def folder(world, tmp_path):
    with host.concepts_folder(tmp_path) as f:
        host.make_concept(f, "hugsy")
        host.make_concept(f, "boxy", token="boxy", superclass="box", seed=3)
        yield f


def images(processed):
    return torch.stack(list(processed.images))


@pytest.fixture
def calls(world, monkeypatch):
    """Every U-Net forward: (the concepts switched on, batch rows). Spied on the class: a forward set on the
    instance is another extension's, which composition answers with whole-batch passes."""
    unet = world.model.diffusion_model
    real, seen = type(unet).forward, []

    def spy(self, x, *args, **kwargs):
        seen.append(([i.concept.token for i in runtime.hooks.activations.items], x.shape[0]))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(type(unet), "forward", spy)
    return seen


@pytest.fixture
def layer_calls(world, monkeypatch):
    """Every forward of the U-Net's first cross-attention: (the concepts switched on, batch rows, pixels)."""
    layer = next(m for name, m in world.model.diffusion_model.named_modules() if name.endswith("attn2"))
    real, seen = type(layer).forward, []

    def spy(self, x, *args, **kwargs):
        if self is layer:
            seen.append(([i.concept.token for i in runtime.hooks.activations.items], x.shape[0], x.shape[1]))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(type(layer), "forward", spy)
    return seen


def test_two_concepts_compose_region_by_region_by_default(folder, calls, layer_calls):
    out = host.txt2img(PAIR, batch_size=2, steps=3)
    info = out.infotexts[0]
    assert "hugsy tau=0.15 beta=0.7 lock=local; boxy tau=0.15 beta=0.7 lock=local; composition=regional" in info
    assert "composition=regional" in info.split("Perfusion defaults:")[1] and out.comments == ""
    # per step (the prediction blend): the base pass on the batch's 2 prompts and 2 unconditional rows, then each
    # concept's pass on the 2 prompts, whether the prompt names places or not
    assert calls == [([], 4), (["hugsy"], 2), (["boxy"], 2)] * 3
    unplaced = host.txt2img(UNPLACED, batch_size=2, steps=3)
    assert calls[9:] == [([], 4), (["hugsy"], 2), (["boxy"], 2)] * 3 and unplaced.comments == ""
    # the attention blend, for the prompt naming a place for each concept: one pass, in which every
    # cross-attention also reads each concept's clause for the 2 prompts
    from modules import shared

    layer_calls.clear()
    shared.opts.data["perfusion_blend"] = "attention"
    try:
        attended = host.txt2img(PAIR, batch_size=2, steps=3)
    finally:
        shared.opts.data["perfusion_blend"] = "prediction"
    assert calls[18:] == [([], 4)] * 3 and attended.comments == ""
    assert [(on, rows) for on, rows, _ in layer_calls] == [([], 4), (["hugsy"], 2), (["boxy"], 2)] * 3
    together = host.txt2img(PAIR, batch_size=2, steps=3, args=TOGETHER)
    assert "composition=together projection=approximate" in together.infotexts[0]
    assert calls[21:] == [(["hugsy", "boxy"], 4)] * 3  # the paper's: one pass, both concepts on
    assert (images(out) - images(together)).abs().max() > 1e-3
    assert torch.equal(images(out), images(host.txt2img(PAIR, batch_size=2, steps=3)))  # reproducible


@pytest.fixture
def encoded(monkeypatch):
    """Every text regional composition encodes."""
    seen = []
    real = composition._encode

    def spy(p, model, texts):
        seen.extend(texts)
        return real(p, model, texts)

    monkeypatch.setattr(composition, "_encode", spy)
    return seen


def test_each_concept_reads_its_own_clause_and_the_base_reads_superclass_words(folder, encoded):
    host.txt2img(PAIR)
    assert sorted(encoded) == sorted(  # the prompt as the WebUI hands it over: each tag left a space
        [
            "a photo of  teddy at the left and  box at the right, on the moon",
            "a photo of  hugsy at the left, on the moon",
            "boxy at the right, on the moon",
        ]
    )
    twins = runtime_pairs_after(PAIR)
    (only,) = twins
    assert only.rows[0] is not None and only.rows[1] is not None and only.rows[0] < only.rows[1]


def runtime_pairs_after(prompt):
    """The twins the composition held during the generation of `prompt` (read inside the sampler)."""
    held = []

    def sample(params):
        held.extend(t for _, t in runtime.regional.pairs)
        return host.unet_sampler(params)

    sd_samplers.sample_hook = sample
    try:
        host.txt2img(prompt, steps=1)
    finally:
        sd_samplers.sample_hook = host.unet_sampler
    return held


def test_one_concept_and_tag_free_prompts_are_unchanged_and_nothing_stays_on_the_unet(folder, world, calls):
    single = "a photo of <perfusion:hugsy> hugsy"
    regional_default = images(host.txt2img(single))
    assert images(host.txt2img(single, args=TOGETHER)).equal(regional_default)  # one concept: nothing to compose
    assert all(shape == 2 for _, shape in calls)  # one pass per step
    base = images(host.txt2img("a photo of hugsy at the left and boxy at the right, on the moon"))
    host.txt2img(PAIR)
    assert images(host.txt2img("a photo of hugsy at the left and boxy at the right, on the moon")).equal(base)
    unet = world.model.diffusion_model
    assert runtime.regional is None and not unet._forward_hooks and not unet._forward_pre_hooks
    assert not any("forward" in vars(m) for name, m in unet.named_modules() if name.endswith("attn2"))


def test_an_image_whose_prompt_names_one_of_the_two_gets_it_applied_alone(folder, calls):
    """A batch of two prompts (as a prompts-from-file script makes), the second naming only hugsy: there hugsy is
    applied as usual (its own pass covers the image) and boxy not at all. Compared at CFG scale 1: composing, the
    unconditional rows run as the bare model, where the paper's application edits them too (as far as the gate
    leaks, which the tiny model's random concepts do a lot)."""
    single = "<perfusion:hugsy> a photo of hugsy on the moon"
    out = host.txt2img([PAIR, single], batch_size=2, steps=2, cfg_scale=1)
    assert calls == [([], 4), (["hugsy"], 2), (["boxy"], 1)] * 2
    alone = host.txt2img(single, seed=2, steps=2, cfg_scale=1)  # the batch's second image has the next seed
    assert torch.allclose(images(out)[1], images(alone)[0], atol=1e-5)
    base = host.txt2img("a photo of hugsy on the moon", seed=2, steps=2, cfg_scale=1)
    assert (images(alone) - images(base)).abs().max() > 1e-2  # control: hugsy changes that image


def test_an_unreadable_prompt_falls_back_to_together_with_a_warning(folder, monkeypatch, calls):
    def broken(p, cond):
        raise ValueError("2 conditioning tensors for 1 prompt texts")

    monkeypatch.setattr(composition, "feed", broken)
    out = host.txt2img(PAIR, steps=2)
    assert "could not read this prompt" in out.comments and "applied together" in out.comments
    assert "composition=together" in out.infotexts[0]
    assert calls == [(["hugsy", "boxy"], 2)] * 2
    together = host.txt2img(PAIR, steps=2, args=TOGETHER)
    assert images(out).equal(images(together))


def test_the_choice_comes_back_on_paste_and_from_the_settings(folder):
    from modules import shared

    from perfusion.webui.script import _pasted

    out = host.txt2img(PAIR, args=TOGETHER)
    params = infotext_utils.parse_generation_parameters(out.infotexts[0])
    assert _pasted(params, "composition", str) == "together"  # what the accordion's radio gets on paste
    shared.opts.data["perfusion_composition"] = "together"
    try:
        short = host.txt2img(PAIR, args=(True, 0.7, 0.15, "local", "approximate"))  # an API caller's 5 args
    finally:
        shared.opts.data["perfusion_composition"] = "regional"
    assert "composition=together" in short.infotexts[0]


def test_global_locking_reads_each_concepts_own_clause_with_its_superclass_word(folder, encoded):
    glob = host.txt2img(PAIR.replace("<perfusion:boxy>", "<perfusion:boxy:lock=global>"), steps=2)
    assert "boxy tau=0.15 beta=0.7 lock=global" in glob.infotexts[0] and glob.comments == ""
    assert "box at the right, on the moon" in encoded  # boxy's key path; hugsy (local) needs none
    assert not any(t.startswith("a photo of  teddy at the left,") for t in encoded)
    local = host.txt2img(PAIR, steps=2)
    assert (images(glob) - images(local)).abs().max() > 1e-4


def test_a_prompt_the_unet_never_sees_is_reported(folder, monkeypatch):
    """Another extension that rewrites the conditioning on its way to the U-Net: the concepts cannot be composed,
    and the image says so instead of silently dropping them."""
    from perfusion import regional

    monkeypatch.setattr(regional.RegionalComposition, "_match", lambda self, e: None)
    out = host.txt2img(PAIR, steps=2)
    assert "did not find this prompt's conditioning" in out.comments
    monkeypatch.undo()
    assert host.txt2img(PAIR, steps=2).comments == ""  # control: found, nothing said


def test_the_hires_pass_is_composed_too(folder, calls, layer_calls):
    out = host.txt2img(UNPLACED, batch_size=2, steps=2, enable_hr=True, hr_scale=1.5)
    assert out.comments == "" and "composition=regional" in out.infotexts[0]
    per_step = [([], 4), (["hugsy"], 2), (["boxy"], 2)]
    assert len(calls) % 3 == 0 and len(calls) > 6 and calls == per_step * (len(calls) // 3)  # both passes
    layer_calls.clear()
    out = host.txt2img(PAIR, batch_size=2, steps=2, enable_hr=True, hr_scale=1.5)  # places: inside the attention
    assert out.comments == "" and "composition=regional" in out.infotexts[0]
    sizes = sorted({pixels for _, _, pixels in layer_calls})
    assert len(sizes) == 2  # the first pass and the hires pass, both composed
    for pixels in sizes:
        assert [(on, rows) for on, rows, p in layer_calls if p == pixels][:3] == per_step
    assert runtime.regional is None  # deactivated after the batch


def test_the_projection_radio_shows_only_while_together_is_picked(world):
    """The accordion built in real Gradio Blocks: projection, which joins several concepts' edits in one prompt,
    is hidden under regional composition (each pass has one concept) and follows the composition radio."""
    gr = pytest.importorskip("gradio")
    from modules import shared

    from perfusion.webui.script import PerfusionScript, _projection_shown

    def built(setting):
        shared.opts.data["perfusion_composition"] = setting
        try:
            with gr.Blocks() as demo:
                controls = PerfusionScript().ui(False)
        finally:
            shared.opts.data["perfusion_composition"] = "regional"
        projection, composition = controls[4], controls[5]
        (wired,) = [d for d in demo.dependencies if d["outputs"] == [projection._id]]
        assert wired["inputs"] == [composition._id] and (wired["targets"], wired["trigger"]) == (
            [composition._id],
            "change",
        )
        return projection.visible

    assert built("regional") is False and built("together") is True
    assert _projection_shown("together")["visible"] is True and _projection_shown("regional")["visible"] is False


PER_CONCEPT = [([], 4), (["hugsy"], 2), (["boxy"], 2)]  # a step's U-Net calls: the base pass, then each concept's


@pytest.mark.parametrize(
    "name, value, default, bad, value_calls",
    [
        ("regions", "attention", "places", "words", PER_CONCEPT),
        ("blend", "attention", "prediction", "latent", [([], 4)]),
    ],
)
def test_a_regional_setting_says_so_and_a_bad_value_is_reported(folder, calls, name, value, default, bad, value_calls):
    """Setting *regions* to attention (regions from the model's attention) or *blend* to attention (one U-Net pass,
    blended inside the cross-attentions): a prompt naming places is composed that way, and the infotext says so; a
    value the setting cannot have is reported and the default used."""
    from modules import shared

    key = f"perfusion_{name}"
    shared.opts.data[key] = value
    try:
        out = host.txt2img(PAIR, batch_size=2, steps=2)
    finally:
        shared.opts.data[key] = default
    assert calls == value_calls * 2 and out.comments == ""
    assert "composition=regional" in out.infotexts[0] and f"Perfusion {name}: {value}" in out.infotexts[0]
    placed = host.txt2img(PAIR, batch_size=2, steps=2)
    assert calls[2 * len(value_calls) :] == PER_CONCEPT * 2 and f"Perfusion {name}: {default}" in placed.infotexts[0]
    assert (images(out) - images(placed)).abs().max() > 1e-3
    shared.opts.data[key] = bad
    try:
        odd = host.txt2img(PAIR, batch_size=2, steps=2)
    finally:
        shared.opts.data[key] = default
    assert f"Perfusion: setting '{name}' is '{bad}'" in odd.comments and "Perfusion: Perfusion" not in odd.comments
    assert torch.equal(images(odd), images(placed))


def test_an_api_request_overriding_a_setting_leaves_the_setting_as_it_was(folder):
    """An API request's override_settings for a Perfusion setting holds for that request only: the WebUI restores
    the keys it finds in opts.data afterwards, so the settings must be there (a first override once stayed the
    server's value until restart, seen in the real A1111 v1.10.1)."""
    from modules import shared

    assert shared.opts.data["perfusion_blend"] == "prediction" and "perfusion_regions" in shared.opts.data
    overrides = {"perfusion_blend": "attention", "perfusion_regions": "attention"}
    overridden = host.txt2img(PAIR, steps=2, override_settings=overrides)
    assert "Perfusion blend: attention" in overridden.infotexts[0]
    after = host.txt2img(PAIR, steps=2)
    assert "Perfusion blend: prediction" in after.infotexts[0] and "Perfusion regions: places" in after.infotexts[0]
    assert shared.opts.perfusion_blend == "prediction" and shared.opts.perfusion_regions == "places"


def test_pasting_an_image_offers_the_regions_it_was_made_with(folder):
    """The regions setting is the setting's own infotext field, written whenever several concepts are composed
    regionally: pasting an image made with another value than the current one offers it as an override (the
    WebUI's paste dropdown and the API's `infotext`)."""
    from modules import shared

    def offered(infotext: str) -> list:
        params = infotext_utils.parse_generation_parameters(infotext)
        script_callbacks.infotext_pasted_callback(infotext, params)
        return infotext_utils.get_override_settings(params)

    shared.opts.data["perfusion_regions"] = "attention"
    try:
        attention = host.txt2img(PAIR, steps=2).infotexts[0]
        assert offered(attention) == []  # the same as now: nothing to override
        alone = host.txt2img(PAIR.replace("<perfusion:boxy> ", ""), steps=2).infotexts[0]
        assert "Perfusion regions" not in alone  # one concept is never composed
    finally:
        shared.opts.data["perfusion_regions"] = "places"
    assert offered(attention) == [("Perfusion regions", "perfusion_regions", "attention")]
    placed = host.txt2img(PAIR, steps=2).infotexts[0]
    assert offered(placed) == []
    shared.opts.data["perfusion_regions"] = "attention"
    try:
        assert offered(placed) == [("Perfusion regions", "perfusion_regions", "places")]
    finally:
        shared.opts.data["perfusion_regions"] = "places"
    shared.opts.data["perfusion_blend"] = "attention"
    try:
        attended = host.txt2img(PAIR, steps=2).infotexts[0]
    finally:
        shared.opts.data["perfusion_blend"] = "prediction"
    assert offered(attended) == [("Perfusion blend", "perfusion_blend", "attention")]
    together = host.txt2img(PAIR, steps=2, args=TOGETHER).infotexts[0]
    assert "Perfusion regions" not in together and "Perfusion blend" not in together and offered(together) == []
