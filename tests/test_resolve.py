"""Tag resolution as a pure function: requests + library + defaults + model facts -> applied, warnings
(no WebUI stand-in)."""

from __future__ import annotations

import torch
from concepts import make_concept, random_covariance
from torch import nn

from perfusion import save_concept
from perfusion.webui.library import Library
from perfusion.webui.resolve import Defaults, ModelFacts, resolve
from perfusion.webui.tags import Request

LAYERS = {"down.attn2": 32, "up.attn2": 16}
D = 48


def attn(width: int) -> nn.Module:
    m = nn.Module()
    m.to_k, m.to_v = nn.Linear(D, width, bias=False), nn.Linear(D, width, bias=False)
    return m


FACTS = ModelFacts({name: attn(w) for name, w in LAYERS.items()}, embedding_width=D, clip_skip=1)


def library(tmp_path, **concepts) -> Library:
    for name, fields in concepts.items():
        c = make_concept(LAYERS, D, random_covariance(D), token=fields.pop("token", name), **fields)
        c.embedding = {"": torch.randn(1, D)}
        save_concept(c, tmp_path / f"{name}.safetensors")
    return Library([tmp_path])


def test_tag_values_then_card_preferences_then_defaults(tmp_path):
    lib = library(tmp_path, hugsy={}, boxy={})
    prefs = {"boxy": {"beta": 0.55}}
    applied, warnings = resolve(
        [Request("hugsy", tau=0.3), Request("boxy")],
        lib,
        Defaults(beta=0.9, tau=0.2),
        FACTS,
        ["a hugsy and a boxy"],
        lambda e: prefs.get(e.name, {}),
    )
    assert warnings == []
    assert [(a.entry.name, a.activation.gate, a.activation.lock) for a in applied] == [
        ("hugsy", (0.9, 0.3), "local"),
        ("boxy", (0.55, 0.2), "local"),
    ]


def test_every_skip_has_its_warning_and_the_rest_still_apply(tmp_path):
    library(tmp_path, hugsy={}, twin={"token": "hugsy"}, wide={}, infu={"method": "infusion"})
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    wide = make_concept({"down.attn2": 64, "up.attn2": 16}, D, random_covariance(D), token="wide")
    wide.embedding = {"": torch.randn(1, D)}
    save_concept(wide, tmp_path / "wide.safetensors")
    requests = [
        Request("hugsy"),
        Request("HUGSY"),
        Request("nobody"),
        Request("broken"),
        Request("twin"),
        Request("wide"),
        Request("infu", lock="global"),
        Request("absent"),
    ]
    lib_absent = library(tmp_path, absent={"token": "zzz"})
    applied, warnings = resolve(requests, lib_absent, Defaults(), FACTS, ["a hugsy, a wide and an infu"], lambda e: {})
    assert [a.entry.name for a in applied] == ["hugsy", "infu"] and applied[1].activation.lock == "local"
    text = "\n".join(warnings)
    for expected in (
        "HUGSY is tagged twice",
        "no concept named 'nobody'",
        "broken.safetensors",
        "share the word 'hugsy'",
        "layer down.attn2 has 64 outputs",
        "Infusion concept",
        "its word 'zzz' is not in the prompt",
    ):
        assert expected in text, expected
    assert len(warnings) == 7


def test_word_vectors_and_clip_skip_are_checked_against_the_model(tmp_path):
    lib = library(tmp_path, hugsy={})
    narrow = ModelFacts(FACTS.layers, embedding_width=D + 1, clip_skip=2)
    applied, warnings = resolve([Request("hugsy")], lib, Defaults(), narrow, ["hugsy"], lambda e: {})
    assert applied == [] and "text encoder takes 49" in warnings[0]
    applied, warnings = resolve(
        [Request("hugsy")], lib, Defaults(), ModelFacts(FACTS.layers, None, 2), ["hugsy"], lambda e: {}
    )
    assert len(applied) == 1 and "CLIP skip 1" in warnings[0]  # applied, with the advice


def test_an_unknown_name_rescans_only_when_a_folder_changed(tmp_path, monkeypatch):
    import os

    lib = library(tmp_path, hugsy={})
    scans = []
    real = Library.refresh
    monkeypatch.setattr(Library, "refresh", lambda self: scans.append(1) or real(self))
    for _ in range(5):
        assert lib.find("boxy") is None
    assert scans == []  # nothing changed on disk: no walk per generation
    library(tmp_path, boxy={})  # a new file: its folder's mtime moves
    st = os.stat(tmp_path)
    os.utime(tmp_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # (coarse clocks)
    before = len(scans)  # (the helper's own Library scanned once)
    assert lib.find("boxy") is not None and len(scans) == before + 1


def test_loaded_concepts_are_bounded_and_most_recent_kept(tmp_path):
    from perfusion.webui import library as library_module

    lib = library(tmp_path, **{f"c{k:03d}": {"token": f"w{k}"} for k in range(library_module.MAX_LOADED + 6)})
    first = lib.load(lib.find("c000"))
    for name in sorted(lib.entries):
        lib.load(lib.entries[name])
        lib.load(lib.find("c000"))  # kept hot
    assert len(lib._loaded) == library_module.MAX_LOADED
    assert lib.load(lib.find("c000")) is first  # still the same parsed object: never evicted
