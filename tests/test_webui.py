"""The extension's generation side inside the WebUI stand-in (v1.10.1 call order), on the tiny model."""

import hashlib
import os
import shutil

import pytest
import torch
import webui_host as host
from modules import (
    errors,
    extra_networks,
    infotext_utils,
    script_callbacks,
    sd_hijack,
    sd_samplers,
    shared,
    ui_extra_networks,
)
from modules.textual_inversion.textual_inversion import Embedding

world = host.world_fixture()


@pytest.fixture
def folder(world, tmp_path):
    with host.concepts_folder(tmp_path) as f:
        yield f


def images(processed):
    return torch.stack(list(processed.images))


def test_extension_loads_settings_network_page_and_script(world):
    assert shared.opts.perfusion_beta == 0.7 and shared.opts.perfusion_tau == 0.15
    assert shared.opts.data_labels["perfusion_lock"].section[0] == "perfusion"
    assert "perfusion" in extra_networks.extra_network_registry
    assert [p.title for p in ui_extra_networks.extra_pages] == ["Perfusion"]
    _, script = host.runner()
    assert script.title() == "Perfusion"
    assert errors.exception_records == []


def test_tag_applies_the_concept_and_a_tag_free_prompt_is_the_base_model_again(folder):
    host.make_concept(folder)
    base = images(host.txt2img("a photo of hugsy"))
    tagged = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    assert (images(tagged) - base).abs().max() > 1e-3
    assert "Perfusion: hugsy tau=0.15 beta=0.7 lock=local" in tagged.infotexts[0]
    assert tagged.comments == ""
    after = host.txt2img("a photo of hugsy")
    assert torch.equal(images(after), base)
    assert "hugsy" not in sd_hijack.model_hijack.embedding_db.word_embeddings


def test_the_concept_word_reaches_the_text_encoder_as_its_learned_embedding(folder):
    """The tagged prompt's conditioning holds i* at the word's row (so the gate opens there: s = 1)."""
    concept = host.make_concept(folder)
    seen = host.spy_on_gate(concept)
    host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    host.txt2img("a photo of hugsy")
    assert abs(seen[0] - 1) < 1e-4 and seen[-1] < 0.9


def test_tag_values_override_sliders_and_sliders_fill_in(folder):
    host.make_concept(folder)
    a = host.txt2img("a photo of <perfusion:hugsy:0.3:beta=0.5> hugsy", args=(True, 0.9, 0.2, "local", "exact"))
    assert "hugsy tau=0.3 beta=0.5 lock=local" in a.infotexts[0]
    assert "Perfusion defaults: beta=0.9 tau=0.2 lock=local projection=exact" in a.infotexts[0]
    b = host.txt2img("a photo of <perfusion:hugsy> hugsy", args=(True, 0.9, 0.2, "local", "exact"))
    assert "hugsy tau=0.2 beta=0.9 lock=local" in b.infotexts[0]
    off = host.txt2img("a photo of <perfusion:hugsy> hugsy", args=(False, 0.9, 0.2, "local", "exact"))
    assert "disabled in the Perfusion accordion" in off.comments
    assert torch.equal(images(off), images(host.txt2img("a photo of hugsy")))


def test_preferred_gate_from_card_metadata(folder):
    host.make_concept(folder)
    (folder / "hugsy.json").write_text('{"preferred_beta": 0.55, "preferred_tau": 0.25}')
    out = host.txt2img("a photo of <perfusion:hugsy> hugsy")
    assert "hugsy tau=0.25 beta=0.55" in out.infotexts[0]


def test_global_lock_feeds_superclass_twin_to_the_keys(folder):
    host.make_concept(folder)
    seen = []
    hooks = None

    def spy(params):
        seen.append(len(host_runtime().key_contexts.pairs) if host_runtime().key_contexts else 0)
        return host.unet_sampler(params)

    sd_samplers.sample_hook = spy
    local = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy", batch_size=2)
    glob = host.txt2img("a photo of <perfusion:hugsy:0.15:lock=global> hugsy", batch_size=2)
    assert "lock=global" in glob.infotexts[0] and glob.comments == ""
    assert seen[-1] == 2  # both cond rows paired with their twins
    assert (images(glob) - images(local)).abs().max() > 1e-4
    del hooks


def host_runtime():
    from perfusion.webui import state

    return state.runtime


def test_hires_pass_batches_and_no_leak_after_an_exception(folder):
    host.make_concept(folder)
    prompt = "a photo of <perfusion:hugsy:0.15> hugsy"
    activations = []
    real = host_runtime().hooks.activate

    def record(items, *args, **kw):
        activations.append(len(items))
        return real(items, *args, **kw)

    host_runtime().hooks.activate = record
    try:
        host.txt2img(prompt, enable_hr=True, hr_scale=1.5, n_iter=2, batch_size=2)
    finally:
        del host_runtime().hooks.activate
    assert activations == [0, 1, 0, 1, 0, 1, 0, 1, 0]  # per batch: first pass, hires pass; then deactivate
    base = images(host.txt2img("a photo of hugsy"))

    def boom(params):
        raise RuntimeError("out of memory")

    sd_samplers.sample_hook = boom
    with pytest.raises(RuntimeError):
        host.txt2img(prompt)
    sd_samplers.sample_hook = host.unet_sampler
    assert torch.equal(images(host.txt2img("a photo of hugsy")), base)


def test_interrupt_then_tag_free_is_base(folder):
    host.make_concept(folder)
    base = images(host.txt2img("a photo of hugsy"))

    def interrupt(params):
        shared.state.interrupted = True
        return host.unet_sampler(params)

    sd_samplers.sample_hook = interrupt
    host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy", n_iter=2)
    shared.state.interrupted = False
    sd_samplers.sample_hook = host.unet_sampler
    assert torch.equal(images(host.txt2img("a photo of hugsy")), base)


@pytest.mark.parametrize(
    "prompt, negative, message",
    [
        ("a photo of <perfusion:nobody:0.15> hugsy", "", "no concept named 'nobody'"),
        ("a photo of <perfusion:hugsy:7> hugsy", "", "tau 7 is outside"),
        (
            "a photo of <perfusion:hugsy:0.15:lock=sideways> hugsy",
            "",
            "lock=sideways is not one of auto/local/global/hard",
        ),
        ("a photo of <perfusion:hugsy:0.15> a bear", "", "its word 'hugsy' is not in the prompt"),
        ("a photo of <perfusion:hugsy:0.15> hugsy", "<perfusion:hugsy:0.15>", "tags in the negative prompt"),
    ],
)
def test_bad_tags_warn_and_still_generate(folder, prompt, negative, message):
    host.make_concept(folder)
    out = host.txt2img(prompt, negative=negative)
    assert message in out.comments
    assert len(out.images) == 1


def test_bad_files_are_skipped_with_a_warning(folder, tmp_path_factory):
    host.make_concept(folder)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    other = tmp_path_factory.mktemp("other")
    concept = host.make_concept(other, "wide")
    shutil.copy(other / "wide.safetensors", folder / "wide.safetensors")
    from perfusion import save_concept

    concept.i_star = torch.randn(32)
    concept.a, concept.i_super = torch.randn(32), torch.randn(32)
    save_concept(concept, folder / "wide.safetensors")
    base = images(host.txt2img("a photo of hugsy and wide and broken"))
    out = host.txt2img("a photo of <perfusion:broken:0.15> <perfusion:wide:0.15> hugsy and wide and broken")
    assert "broken.safetensors" in out.comments and "wide: made for 32-wide text encodings" in out.comments
    assert torch.equal(images(out), base)
    assert "Perfusion:" not in out.infotexts[0].split("\n")[-1]


def test_two_concepts_combine_and_infotext_paste_resolves_hashes(folder, capsys):
    host.make_concept(folder, "hugsy")
    host.make_concept(folder, "boxy", token="boxy", superclass="box", seed=3)
    out = host.txt2img(
        "<perfusion:hugsy:0.15> <perfusion:boxy:0.2> hugsy and boxy",
        args=(True, 0.7, 0.15, "local", "exact", "together"),
    )
    info = out.infotexts[0]
    assert (
        "hugsy tau=0.15 beta=0.7 lock=local; boxy tau=0.2 beta=0.7 lock=local; composition=together projection=exact"
        in info
    )
    params = infotext_utils.parse_generation_parameters(info)
    script_callbacks.infotext_pasted_callback(info, params)
    assert params["Prompt"] == "<perfusion:hugsy:0.15> <perfusion:boxy:0.2> hugsy and boxy"
    os.rename(folder / "boxy.safetensors", folder / "boxy2.safetensors")
    os.remove(folder / "hugsy.safetensors")
    params = infotext_utils.parse_generation_parameters(info)
    script_callbacks.infotext_pasted_callback(info, params)
    assert params["Prompt"] == "<perfusion:hugsy:0.15> <perfusion:boxy2:0.2> hugsy and boxy"
    printed = capsys.readouterr().out
    assert "pasted concept hugsy" in printed and "is not in" in printed and "boxy2 here" in printed


def test_paste_makes_card_preferences_explicit(folder):
    host.make_concept(folder)
    (folder / "hugsy.json").write_text('{"preferred_beta": 0.55}')
    info = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy").infotexts[0]
    params = infotext_utils.parse_generation_parameters(info)
    script_callbacks.infotext_pasted_callback(info, params)
    assert params["Prompt"] == "a photo of <perfusion:hugsy:beta=0.55:0.15> hugsy"


def test_card_items(folder):
    host.make_concept(folder, tau=0.2)
    (folder / "hugsy.txt").write_text("my teddy")
    page = next(p for p in ui_extra_networks.extra_pages if p.title == "Perfusion")
    page.refresh()
    [item] = list(page.list_items())
    assert item["prompt"] == '"<perfusion:hugsy:0.2> hugsy"'
    assert item["description"] == "my teddy" and item["shorthash"] in item["search_terms"]
    assert {"hugsy", "teddy"} <= set(item["search_terms"])
    assert item["metadata"]["suggested gate"] == "beta 0.7, tau 0.2"
    assert page.create_item_html("txt2img", item)["name"] == "hugsy"
    editor = page.create_user_metadata_editor(None, "txt2img")
    page.items = {"hugsy": item}
    editor.save_user_metadata("hugsy", "desc", "notes", 0.3, "")
    [item] = list(page.list_items())
    assert item["prompt"] == '"<perfusion:hugsy:0.3> hugsy"'


def test_api_routes(folder):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    host.make_concept(folder)
    app = fastapi.FastAPI()
    script_callbacks.app_started_callback(None, app)
    script_callbacks.app_started_callback(None, app)
    assert sum(getattr(r, "path", "") == "/perfusion/v1/concepts" for r in app.routes) == 1
    client = TestClient(app)
    listed = client.get("/perfusion/v1/concepts").json()
    assert [c["name"] for c in listed["concepts"]] == ["hugsy"]
    assert listed["concepts"][0]["metadata"]["superclass"] == "teddy"
    host.make_concept(folder, "boxy", token="boxy", superclass="box")
    assert [c["name"] for c in client.post("/perfusion/v1/refresh").json()["concepts"]] == ["boxy", "hugsy"]


def test_api_auth(folder, monkeypatch):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    monkeypatch.setattr(shared.cmd_opts, "api_auth", "ann:secret", raising=False)
    app = fastapi.FastAPI()
    script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get("/perfusion/v1/concepts").status_code == 401
    assert client.get("/perfusion/v1/concepts", auth=("ann", "wrong")).status_code == 401
    assert client.get("/perfusion/v1/concepts", auth=("ann", "secret")).status_code == 200


def test_reload_ui_twice_leaves_one_hook_per_layer(folder):
    host.make_concept(folder)
    host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    host.reload_ui()
    host.reload_ui()
    host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    unet = shared.sd_model.model.diffusion_model
    attn = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    assert all(len(m.to_k._forward_hooks) == 1 and len(m.to_v._forward_hooks) == 1 for m in attn)
    assert len(extra_networks.extra_network_registry) == 1 and len(ui_extra_networks.extra_pages) == 1


def test_users_own_embedding_of_the_same_word_comes_back(folder):
    host.make_concept(folder)
    mine = Embedding(torch.ones(1, 64), "hugsy")
    sd_hijack.model_hijack.embedding_db.register_embedding(mine, shared.sd_model)
    host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    assert sd_hijack.model_hijack.embedding_db.word_embeddings["hugsy"] is mine
    sd_hijack.model_hijack.embedding_db.register_embedding_by_name(None, shared.sd_model, "hugsy")


def test_retrained_concept_file_invalidates_cached_conditioning(folder):
    host.make_concept(folder, seed=1)
    first = images(host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy"))
    again = images(host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy"))
    assert torch.equal(first, again)
    host.make_concept(folder, seed=2)
    changed = images(host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy"))
    assert (changed - first).abs().max() > 1e-4


def test_defaults_reach_the_infotext_only_when_a_concept_applies(folder):
    host.make_concept(folder)
    applied = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    assert "Perfusion defaults: beta=0.7 tau=0.15" in applied.infotexts[0]
    skipped = host.txt2img("a photo of <perfusion:nobody:0.15> teddy")
    assert "Perfusion" not in skipped.infotexts[0].replace("Perfusion: no concept", "")
    assert "Perfusion defaults" not in skipped.infotexts[0]


def test_xyz_plot_axes_sweep_the_gate_over_the_tags_values(folder, monkeypatch):
    """The X/Y/Z script's axes (scripts/xyz_grid.py's AxisOption/axis_options, found in scripts_data by its
    module name): added once, their values win over a tag's and apply to every concept; a bad value warns."""
    import copy
    from collections import namedtuple

    from modules import scripts

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.choices, self.confirm = label, type, apply, choices, confirm

    xyz = type("xyz_grid", (), {"AxisOption": AxisOption, "axis_options": []})
    script_class = type(
        "Script",
        (scripts.Script,),
        {"__module__": "xyz_grid.py", "title": lambda s: "X/Y/Z plot", "show": lambda s, i: False},
    )
    Data = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
    monkeypatch.setattr(scripts, "scripts_data", [*scripts.scripts_data, Data(script_class, "xyz_grid.py", ".", xyz)])
    from perfusion.webui import xyz as axes

    axes.add_axes()
    axes.add_axes()  # "Reload UI" calls on_before_ui again
    labels = [o.label for o in xyz.axis_options]
    names = ("concept", "beta", "tau", "lock", "projection", "composition", "regions", "blend")
    assert labels == [f"[Perfusion] {x}" for x in names]
    options = {o.label.split()[-1]: o for o in xyz.axis_options}
    assert options["lock"].choices() == ["auto", "local", "global", "hard"]
    assert options["composition"].choices() == ["regional", "together"]
    host.make_concept(folder)
    results = []
    for beta in (0.4, 0.9):
        r, _ = host.runner()
        from modules import processing

        p = processing.StableDiffusionProcessingTxt2Img(
            prompt="a photo of <perfusion:hugsy:0.15:beta=0.7> hugsy", seed=1, steps=3, width=64, height=64
        )
        p.scripts, p.script_args = r, (0, True, 0.7, 0.15, "local", "approximate")
        options["beta"].apply(p, beta, [0.4, 0.9])
        options["lock"].apply(p, "hard", ["hard"])
        results.append(processing.process_images(p))
    assert "hugsy tau=0.15 beta=0.4 lock=hard" in results[0].infotexts[0]
    assert "hugsy tau=0.15 beta=0.9 lock=hard" in results[1].infotexts[0]
    assert (images(results[0]) - images(results[1])).abs().max() > 1e-4
    tag_only = host.txt2img("a photo of <perfusion:hugsy:0.15:beta=0.4:lock=hard> hugsy")
    assert torch.equal(images(tag_only), images(results[0]))  # the axis value is exactly that gate
    r, _ = host.runner()
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt="a photo of <perfusion:hugsy> hugsy", seed=1, steps=3, width=64, height=64
    )
    p.scripts, p.script_args = r, (0, True, 0.7, 0.15, "local", "approximate")
    options["tau"].apply(p, -1.0, [-1.0])
    bad = processing.process_images(p)
    assert "X/Y/Z plot: tau -1.0 is out of range" in bad.comments and "hugsy tau=0.15 beta=0.7" in bad.infotexts[0]

    # the concept axis: each value is a concept (its tag and its word swapped in), "none" the superclass word
    host.make_concept(folder, name="Boxy", token="boxy", superclass="box", seed=3)
    assert options["concept"].choices() == ["none", "Boxy", "hugsy"]
    prompt = "a photo of <perfusion:hugsy:0.15> hugsy on the moon"
    cells = {}
    grid = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=1, steps=3, width=64, height=64)
    grid.scripts, grid.script_args = r, (0, True, 0.7, 0.15, "local", "approximate")
    options["concept"].confirm(grid, ["hugsy", "Boxy", "none"])
    for value in ("hugsy", "Boxy", "none"):
        p = copy.copy(grid)  # as the script makes each cell: its extra_generation_params dict is shared
        options["concept"].apply(p, value, ["hugsy", "Boxy", "none"])
        cells[value] = (p.prompt, processing.process_images(p))
    assert cells["Boxy"][0] == "a photo of <perfusion:Boxy:0.15> boxy on the moon"
    assert "Boxy tau=0.15" in cells["Boxy"][1].infotexts[0]
    assert cells["none"][0] == "a photo of  teddy on the moon" and "Perfusion" not in cells["none"][1].infotexts[0]
    assert torch.equal(images(cells["hugsy"][1]), images(host.txt2img(prompt)))
    assert torch.equal(images(cells["none"][1]), images(host.txt2img("a photo of  teddy on the moon")))
    assert (images(cells["Boxy"][1]) - images(cells["hugsy"][1])).abs().max() > 1e-4
    pair = "a photo of <perfusion:hugsy> hugsy and <perfusion:Boxy> boxy"
    for value in ("together", "regional"):  # the composition axis over the accordion's choice
        p = processing.StableDiffusionProcessingTxt2Img(prompt=pair, seed=1, steps=3, width=64, height=64)
        p.scripts, p.script_args = r, (0, True, 0.7, 0.15, "local", "approximate", "regional")
        options["composition"].apply(p, value, ["together", "regional"])
        assert f"composition={value}" in processing.process_images(p).infotexts[0].split("Perfusion defaults")[0]
    assert options["regions"].choices() == ["places", "attention"]
    placed = "a photo of <perfusion:hugsy> hugsy at the left and <perfusion:Boxy> boxy at the right"
    regions = {}
    for value in ("places", "attention", "words"):  # the regions axis over the setting; a bad value warns
        p = processing.StableDiffusionProcessingTxt2Img(prompt=placed, seed=1, steps=3, width=64, height=64)
        p.scripts, p.script_args = r, (0, True, 0.7, 0.15, "local", "approximate", "regional")
        options["regions"].apply(p, value, ["places", "attention"])
        regions[value] = processing.process_images(p)
    assert "Perfusion regions: attention" in regions["attention"].infotexts[0]
    assert "Perfusion regions: places" in regions["places"].infotexts[0]
    assert regions["attention"].comments == "" and regions["places"].comments == ""
    assert (images(regions["attention"]) - images(regions["places"])).abs().max() > 1e-4
    assert "X/Y/Z plot: regions is 'words'" in regions["words"].comments
    assert torch.equal(images(regions["words"]), images(regions["places"]))
    assert options["blend"].choices() == ["auto", "prediction", "attention"]
    p = processing.StableDiffusionProcessingTxt2Img(prompt=placed, seed=1, steps=3, width=64, height=64)
    p.scripts, p.script_args = r, (0, True, 0.7, 0.15, "local", "approximate", "regional")
    options["blend"].apply(p, "attention", ["prediction", "attention"])  # the blend axis over the setting
    attended = processing.process_images(p)
    assert "Perfusion blend: attention" in attended.infotexts[0] and attended.comments == ""
    assert "Perfusion blend: prediction" in regions["places"].infotexts[0]  # the default
    assert (images(attended) - images(regions["places"])).abs().max() > 1e-4
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=1, steps=3, width=64, height=64)
    with pytest.raises(ValueError, match="no concept named 'nobody'"):
        options["concept"].confirm(p, ["hugsy", "nobody"])  # before the grid starts, not in its fifth cell
    p.prompt = "a photo of hugsy"
    with pytest.raises(ValueError, match="no <perfusion:NAME> tag"):
        options["concept"].confirm(p, ["Boxy"])


def test_cards_read_headers_only_and_show_a_hash_once_known(folder, monkeypatch):
    """A cards page of many concepts reads no file in full and hashes none (as Lora cards, which show the cached
    hash only); a generation hashes the concept it uses, and its card then shows the hash."""
    from modules import hashes

    import perfusion.webui.library as library_module

    host.make_concept(folder, name="cardonly")
    loads, computed = [], []
    real_load, real_sha256 = library_module.load_concept, hashes.sha256
    monkeypatch.setattr(library_module, "load_concept", lambda path: loads.append(path) or real_load(path))
    monkeypatch.setattr(hashes, "sha256", lambda *a, **kw: computed.append(a) or real_sha256(*a, **kw))
    page = next(p for p in ui_extra_networks.extra_pages if p.title == "Perfusion")
    page.refresh()
    [item] = list(page.list_items())
    assert loads == [] and computed == []
    assert item["shorthash"] == "" and "sha256" not in item["metadata"] and "error" not in item["metadata"]
    assert item["metadata"]["token"] == "hugsy" and item["metadata"]["layers"] == 7
    host.txt2img("a photo of <perfusion:cardonly:0.15> hugsy")
    assert len(loads) == 1 and len(computed) == 1  # the generation: the whole file, hashed once
    [item] = list(page.list_items())
    full = hashlib.sha256((folder / "cardonly.safetensors").read_bytes()).hexdigest()
    assert item["shorthash"] == full[:12] and item["metadata"]["sha256"] == full and len(computed) == 1


def test_hashes_come_from_the_webuis_cached_machinery(folder):
    """As Lora and embeddings do: the file's sha256 is computed once by modules.hashes (cache.json, title
    "perfusion/NAME"), its first 12 digits in the infotext."""
    import hashlib

    from modules import hashes

    host.make_concept(folder)
    out = host.txt2img("a photo of <perfusion:hugsy:0.15> hugsy")
    cached = hashes.cache("hashes")["perfusion/hugsy"]["sha256"]
    assert cached == hashlib.sha256((folder / "hugsy.safetensors").read_bytes()).hexdigest()
    assert (
        f'Perfusion hashes: "hugsy: {cached[:12]}"' in out.infotexts[0] or f"hugsy: {cached[:12]}" in out.infotexts[0]
    )
