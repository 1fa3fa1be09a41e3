"""Pure parts of the WebUI glue: tag parsing, the concepts library, conditioning walks, Forge's DB signature."""

import os
import sys
from collections import namedtuple

import pytest
import torch

from perfusion.webui import host
from perfusion.webui.library import Library
from perfusion.webui.tags import Request, format_tag, parse_request


def test_parse_request_positional_named_and_bad_values():
    assert parse_request(["hugsy"], {}) == (Request("hugsy"), [])
    assert parse_request(["hugsy", "0.15"], {}) == (Request("hugsy", tau=0.15), [])
    assert parse_request(["hugsy", "0.15", "0.6"], {"lock": "global"}) == (Request("hugsy", 0.15, 0.6, "global"), [])
    assert parse_request(["hugsy"], {"TAU": "0.2", "beta": "0.5"})[0] == Request("hugsy", 0.2, 0.5)
    req, warnings = parse_request(["hugsy", "abc", "9"], {"lock": "up", "gain": "2"})
    assert req == Request("hugsy")
    assert len(warnings) == 4
    assert any("gain= ignored" in w for w in warnings) and any("lock=up" in w for w in warnings)
    assert any("'abc' is not a number" in w for w in warnings) and any("beta 9 is outside" in w for w in warnings)
    assert parse_request([], {})[0] is None and parse_request(["hugsy", "nan"], {})[0].tau is None
    assert "extra arguments" in parse_request(["hugsy", "0.1", "0.5", "3"], {})[1][0]


def test_format_tag_keeps_tau_last_for_the_webuis_card_toggle():
    assert format_tag("hugsy", 0.15) == "<perfusion:hugsy:0.15>"
    assert format_tag("hugsy", 0.2, beta=0.6, lock="global") == "<perfusion:hugsy:beta=0.6:lock=global:0.2>"


def test_swap_concept_rewrites_the_first_tag_and_its_word_only():
    from perfusion.webui.tags import swap_concept

    words = {"hugsy": ("hugsy", "teddy"), "boxy": ("boxy", "box"), "Old": ("sks", "dog")}.__getitem__
    prompt = "a photo of <perfusion:hugsy:0.2:beta=0.6> hugsy, hugsyish and <perfusion:boxy> boxy; hugsy!"
    assert swap_concept(prompt, "boxy", words) == (
        "a photo of <perfusion:boxy:0.2:beta=0.6> boxy, hugsyish and <perfusion:boxy> boxy; boxy!"
    )
    assert swap_concept(prompt, "none", words) == "a photo of  teddy, hugsyish and <perfusion:boxy> boxy; teddy!"
    # the word is swapped outside tags only, and the name and the word may differ
    assert swap_concept("<perfusion:Old> sks <lora:sks:1>", "hugsy", words) == "<perfusion:hugsy> hugsy <lora:sks:1>"
    with pytest.raises(ValueError, match="no <perfusion:NAME> tag"):
        swap_concept("a photo of hugsy", "boxy", words)
    with pytest.raises(KeyError):  # an unknown name is the lookup's to report
        swap_concept(prompt, "nobody", words)


def test_library_scan_find_hash_and_reload(tmp_path):
    from concepts import make_concept, random_covariance

    from perfusion import save_concept

    (tmp_path / "sub").mkdir()
    save_concept(make_concept({"l.attn2": 8}, 16, random_covariance(16)), tmp_path / "sub" / "Hugsy.safetensors")
    (tmp_path / "hugsy.resume.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    lib = Library([tmp_path])
    assert list(lib.entries) == ["Hugsy"] and lib.find("hugsy").name == "Hugsy"
    entry = lib.find("Hugsy")
    assert len(entry.shorthash) == 12 and lib.by_hash(entry.shorthash[:8]) is entry
    first = lib.load(entry)
    assert lib.load(entry) is first and first.name == "Hugsy"
    save_concept(make_concept({"l.attn2": 8}, 16, random_covariance(16), seed=4), entry.path)
    os.utime(entry.path, ns=(1, 1))
    assert lib.load(entry) is not first and lib.find("nobody") is None
    save_concept(make_concept({"l.attn2": 8}, 16, random_covariance(16)), tmp_path / "Hugsy.safetensors")
    lib.refresh()
    assert len(lib.clashes) == 1 and "same name" in lib.clashes[0]


def test_cond_tensors_walks_webui_conditioning_structures():
    Scheduled = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])

    class Composable:
        def __init__(self, schedules):
            self.schedules, self.weight = schedules, 1.0

    class Multicond:
        def __init__(self, batch):
            self.shape, self.batch = (2,), batch

    t = [torch.full((77, 8), float(i)) for i in range(4)]
    cond = Multicond([[Composable([Scheduled(5, t[0]), Scheduled(10, t[1])])], [Composable([Scheduled(10, t[2])])]])
    assert [float(x[0, 0]) for x in host.cond_tensors(cond)] == [0, 1, 2]
    sdxl = Scheduled(10, {"crossattn": t[3], "vector": torch.zeros(4)})
    assert [float(x[0, 0]) for x in host.cond_tensors(sdxl)] == [3]


def test_register_embedding_speaks_both_database_signatures():
    calls = []

    class A1111DB:
        def register_embedding_by_name(self, embedding, model, name):
            calls.append(("a1111", embedding, model, name))

    class ForgeDB:
        def register_embedding_by_name(self, embedding, name):
            calls.append(("forge", embedding, name))

    host.register_embedding(A1111DB(), "vec", "hugsy", "model")
    host.register_embedding(ForgeDB(), "vec", "hugsy", "model")
    assert calls == [("a1111", "vec", "model", "hugsy"), ("forge", "vec", "hugsy")]


def test_embedding_vector_and_forge_unet_lookup(monkeypatch):
    assert torch.equal(host.embedding_vector({"": torch.ones(1, 4, dtype=torch.float16)}), torch.ones(1, 4))
    sdxl = {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}
    assert set(host.embedding_vector(sdxl)) == {"clip_l", "clip_g"}
    assert host.embedding_size(sdxl) == (2, 2048) and host.embedding_size({"": torch.ones(3, 768)}) == (3, 768)
    unet, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    forge = type("Forge", (), {})()
    forge.forge_objects = type("O", (), {"unet": type("P", (), {"model": type("M", (), {"diffusion_model": unet})})})
    forge.model = type("M", (), {"diffusion_model": other})()
    assert host.kind() == "a1111" and host.diffusion_model(forge) is other  # A1111/reForge: sd_model.model's
    monkeypatch.setattr(host, "kind", lambda: "neo")
    assert host.diffusion_model(forge) is unet and host.diffusion_model(None) is None


@pytest.mark.parametrize(
    "layout, expected",
    [
        ({}, "a1111"),
        (
            {"modules_forge/forge_version.py": "version = '1.0.0v2-v1.10.1RC'\n", "ldm_patched/__init__.py": ""},
            "reforge",
        ),
        ({"modules_forge/forge_version.py": "version = 'f2.0.1v1.10.1'\n", "backend/__init__.py": ""}, "forge"),
        ({"modules_forge/forge_version.py": "version = 'neo'\n", "backend/__init__.py": ""}, "neo"),
        ({"modules_forge/initialization.py": "", "backend/__init__.py": ""}, "forge"),
    ],
)
def test_the_host_is_told_by_its_packages(monkeypatch, tmp_path, layout, expected):
    """reForge has modules_forge too (over A1111's conditioning): it must not be taken for Forge."""
    for path, text in layout.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("modules_forge", "modules_forge.forge_version", "backend", "ldm_patched"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    host.kind.cache_clear()
    try:
        assert host.kind() == expected
    finally:
        host.kind.cache_clear()


def test_loss_curve_svg_has_labelled_axes_and_both_curves(tmp_path):
    import base64
    import xml.etree.ElementTree as ET

    from perfusion.webui.plot import SMOOTHED, loss_html, read_losses

    path = tmp_path / "x.loss.csv"
    assert loss_html(path) == ""
    path.write_text("step,loss,smoothed_loss,time\n" + "".join(f"{k},{1 / k},{1.2 / k},t\n" for k in range(1, 30)))
    assert read_losses(path)[2] == (3, 1 / 3, 1.2 / 3)
    svg = ET.fromstring(base64.b64decode(loss_html(path).split("base64,")[1].rstrip('">')))
    ns = "{http://www.w3.org/2000/svg}"
    assert svg.get("font-size") == "13"  # the browser's font at a readable size, not a bitmap font
    texts = [t.text or "" for t in svg.iter(f"{ns}text")]
    assert "1.2" in texts and "0.0345" in texts and "1" in texts and "29" in texts and "step" in texts
    lines = list(svg.iter(f"{ns}polyline"))
    assert len(lines) == 2 and lines[1].get("stroke") == SMOOTHED
    points = [tuple(map(float, p.split(","))) for p in lines[1].get("points").split()]
    assert len(points) == 29 and points[0][1] < points[-1][1]  # falling loss: the line goes down (y grows)


def test_cond_caches_are_cleared_in_place_on_every_host():
    """The WebUI shares the cache lists between jobs: they must be emptied in place (A1111: 2 items, Neo: 3)."""
    shared_two, shared_three = ["key", "cond"], ["key", "cond", "extra"]
    p = namedtuple("P", "cached_c cached_uc cached_hr_c cached_hr_uc")(shared_two, shared_three, None, [1])
    host.clear_cond_caches(p)
    assert shared_two == [None, None] and shared_three == [None, None, None] and p.cached_hr_uc == [1]


def test_a_lookup_during_a_rescan_sees_a_whole_listing(tmp_path, monkeypatch):
    """The API's refresh runs on another thread than generations: a lookup in the middle of a rescan finds what
    the last whole scan listed (it used to see an emptied listing and skip the concept)."""
    from concepts import make_concept, random_covariance

    import perfusion.webui.library as library_module
    from perfusion import save_concept

    save_concept(make_concept({"l.attn2": 8}, 16, random_covariance(16)), tmp_path / "hugsy.safetensors")
    lib = Library([tmp_path])
    seen = []
    walk = library_module.os.walk

    def walk_and_look(*a, **kw):
        for step in walk(*a, **kw):
            seen.append(lib.find("hugsy"))  # another thread's generation, mid-scan
            yield step

    monkeypatch.setattr(library_module.os, "walk", walk_and_look)
    lib.refresh()
    assert seen and all(e is not None and e.name == "hugsy" for e in seen)
