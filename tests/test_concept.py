"""Concept file format v1: round trip, size, and every kind of bad file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from concepts import SD1_LAYERS, make_concept, random_covariance
from safetensors.torch import save_file

import perfusion
from perfusion import ConceptError, load_concept, save_concept
from perfusion.concept import peek_concept


@pytest.fixture(scope="module")
def sd1():
    c = make_concept(SD1_LAYERS, 768, random_covariance(768), arch="sd1", token="hugsy", superclass="teddy")
    c.base_model_hash, c.covariance_hash = "6ce0161689", "a1b2c3d4e5f6"
    return c


def test_round_trip_keeps_everything(tmp_path, sd1):
    path = save_concept(sd1, tmp_path / "hugsy.safetensors")
    back = load_concept(path)
    assert back.name == "hugsy" and (back.token, back.superclass, back.arch, back.method) == (
        "hugsy",
        "teddy",
        "sd1",
        "perfusion",
    )
    assert (back.beta, back.tau, back.train_beta, back.train_tau, back.steps) == (0.7, 0.15, 0.75, 0.10, 400)
    assert back.base_model_hash == "6ce0161689" and back.covariance_hash == "a1b2c3d4e5f6" and back.created
    assert back.layers == sorted(SD1_LAYERS)
    assert torch.equal(back.a, sd1.a.float()) and torch.equal(back.energy, sd1.energy.float())  # fp32 on disk
    for name in ("i_star", "i_super"):
        assert torch.equal(getattr(back, name), getattr(sd1, name).half())
    assert all(torch.equal(back.values[k], v.half()) for k, v in sd1.values.items())
    assert torch.equal(back.embedding[""], sd1.embedding[""].half())
    # s(i*) stays 1 within fp16 rounding of i*
    assert float(back.a @ back.i_star.float()) == pytest.approx(1.0, abs=2e-3)


def test_sd1_concept_is_at_most_36_kb(tmp_path, sd1):
    size = save_concept(sd1, tmp_path / "hugsy.safetensors").stat().st_size
    payload = 2 * (12_480 + 768 * 3) + 4 * (768 + 1)
    assert payload <= size <= 36_000, size


def test_fp32_save_and_keys(tmp_path):
    c = make_concept({"attn2": 320}, 1024, random_covariance(1024), arch="sd2", with_keys=True)
    back = load_concept(save_concept(c, tmp_path / "k.safetensors", dtype=torch.float32))
    assert torch.equal(back.keys["attn2"], c.keys["attn2"]) and torch.equal(back.i_star, c.i_star)


def test_sdxl_needs_both_embeddings(tmp_path):
    cov = random_covariance(2048)
    c = make_concept({"attn2": 640}, 2048, cov, arch="sdxl")
    with pytest.raises(ConceptError, match="embedding.clip_l and embedding.clip_g"):
        save_concept(c, tmp_path / "x.safetensors")
    c.embedding = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    back = load_concept(save_concept(c, tmp_path / "x.safetensors"))
    assert back.embedding["clip_g"].shape == (2, 1280)


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, sd1, monkeypatch):
    path = save_concept(sd1, tmp_path / "hugsy.safetensors")
    before = path.read_bytes()
    import perfusion.files as files

    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        save_concept(sd1, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["hugsy.safetensors"]


def _rewrite(tmp_path, sd1, edit_tensors=None, edit_meta=None):
    """Save sd1 as raw safetensors after changing its tensors/metadata."""
    good = save_concept(sd1, tmp_path / "good.safetensors")
    tensors = {k: v.clone() for k, v in perfusion.concept._load_safetensors_bytes(good.read_bytes()).items()}
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    return bad


@pytest.mark.parametrize(
    "edit_tensors,edit_meta,message",
    [
        (lambda t: t.pop("a"), None, "missing: a"),
        (lambda t: t.update(extra=torch.ones(3)), None, "unexpected tensor.*extra"),
        (lambda t: t.update(i_star=torch.ones(767)), None, "i_star.*768"),
        (lambda t: t.update(i_super=torch.ones(768, 1)), None, "i_super.*shape"),
        (
            lambda t: t.update({"v.middle_block.1.transformer_blocks.0.attn2": torch.ones(2, 640)}),
            None,
            "v.middle_block",
        ),
        (lambda t: t.__setitem__("i_super", torch.full((768,), float("nan"))), None, "i_super.*NaN"),
        (lambda t: t.__setitem__("energy", torch.tensor([float("inf")])), None, "energy.*NaN or Inf"),
        (lambda t: t.__setitem__("embedding", torch.ones(1, 1024)), None, "1024 wide, sd1 needs 768"),
        (None, lambda m: m.update(perfusion_format="2"), "format '2' is not supported"),
        (None, lambda m: m.pop("perfusion_format"), "not a Perfusion concept"),
        (None, lambda m: m.pop("superclass"), "superclass"),
        (None, lambda m: m.update(tau="fast"), "'tau' is not a number"),
        (None, lambda m: m.update(tau="0"), "tau must be positive"),
        (None, lambda m: m.update(method="dreambooth"), "method 'dreambooth'"),
        (None, lambda m: m.update(lock="global"), "lock 'global' is not one of local, hard"),
        (None, lambda m: m.update(context_dim="1024"), "context_dim"),
    ],
)
def test_bad_tensors_and_metadata(tmp_path, sd1, edit_tensors, edit_meta, message):
    bad = _rewrite(tmp_path, sd1, edit_tensors, edit_meta)
    with pytest.raises(ConceptError, match=message) as err:
        load_concept(bad)
    assert str(bad) in str(err.value)
    if "NaN" in message:  # values: the header-only peek cannot see them (load, at generation, does)
        assert peek_concept(bad).i_super.is_meta
    else:
        with pytest.raises(ConceptError, match=message):
            peek_concept(bad)


def test_peek_reads_the_header_only_and_matches_load(tmp_path, sd1, monkeypatch):
    import perfusion.files

    path = save_concept(sd1, tmp_path / "hugsy.safetensors")
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    read = []
    real_read = perfusion.files.os.read

    def counted(fd, size):
        chunk = real_read(fd, size)
        read.append(len(chunk))
        return chunk

    monkeypatch.setattr(perfusion.files.os, "read", counted)
    head = peek_concept(path)
    assert sum(read) == 8 + 8 + n and 8 + n < path.stat().st_size / 2  # the length, then the header: no tensor data
    read.clear()
    full = load_concept(path)
    assert sum(read) == path.stat().st_size  # control: load reads everything
    assert all(t.is_meta for t in (head.i_star, head.a, head.energy, *head.values.values(), *head.embedding.values()))
    for field in ("token", "superclass", "method", "arch", "context_dim", "clip_skip", "tau", "beta", "train_beta",
                  "train_tau", "lock", "steps", "created", "base_model_hash", "covariance_hash", "name"):  # fmt: skip
        assert getattr(head, field) == getattr(full, field), field
    assert {k: v.shape for k, v in head.values.items()} == {k: v.shape for k, v in full.values.items()}
    assert head.shared_metadata == full.shared_metadata


def test_bad_files(tmp_path, sd1):
    good = save_concept(sd1, tmp_path / "good.safetensors").read_bytes()
    cases = {
        "empty": b"",
        "text": b"this is a text file, not a concept\n" * 10,
        "truncated": good[: len(good) - 100],
        "truncated-header": good[:200],
        "oversized-header": struct.pack("<Q", 2**40) + good[8:],
        "header-not-json": struct.pack("<Q", 10) + b"not json!!" + b"\0" * 64,
    }
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    start, end = header["a"]["data_offsets"]
    header["a"]["data_offsets"] = [start, end - 4]  # one float short of its [768] shape
    raw = json.dumps(header, separators=(",", ":")).encode()
    cases["offsets-short-of-shape"] = struct.pack("<Q", len(raw)) + raw + good[8 + n :]
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        for read in (load_concept, peek_concept):
            with pytest.raises(ConceptError) as err:
                read(path)
            assert str(path) in str(err.value), (name, read)
    with pytest.raises(ConceptError, match="do not hold a F32 tensor of shape"):
        peek_concept(tmp_path / "offsets-short-of-shape.safetensors")
    for read in (load_concept, peek_concept):
        with pytest.raises(ConceptError, match="cannot read"):
            read(tmp_path / "missing.safetensors")


def test_pickles_are_never_unpickled(tmp_path, sd1):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    path = tmp_path / "evil.safetensors"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ConceptError, match="not a safetensors file|header"):
        load_concept(path)
    assert not marker.exists()


def test_wrong_dtype_in_header_is_refused(tmp_path, sd1):
    good = save_concept(sd1, tmp_path / "good.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    header["a"]["dtype"] = "I64"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n
    path = tmp_path / "dtype.safetensors"
    path.write_bytes(good[:8] + raw + good[8 + n :])
    with pytest.raises(ConceptError, match="'a' has an unsupported dtype"):
        load_concept(path)


def test_infusion_file_has_no_embedding_rows_and_its_size(tmp_path):
    c = make_concept(
        SD1_LAYERS, 768, random_covariance(768), method="infusion", arch="sd1", token="teddy", superclass="teddy"
    )
    c.embedding = {"": torch.zeros(0, 768)}
    path = save_concept(c, tmp_path / "teddy.safetensors")
    back = load_concept(path)
    assert back.method == "infusion" and back.embedding[""].shape == (0, 768)
    assert path.stat().st_size <= 34_000  # measured 33,460 bytes: see docs/concept-format.md


def test_metadata_other_tools_read(tmp_path):
    """modelspec keys (title, architecture, trigger phrase, the tensors' sha256) and ss_ keys: written on save,
    kept through load, the computed ones recomputed (a re-saved file never carries a stale hash)."""
    import hashlib

    c = make_concept(SD1_LAYERS, 768, random_covariance(768), arch="sd1")
    c.shared_metadata = {"ss_steps": "400", "modelspec.hash_sha256": "0xstale", "other": "dropped"}
    path = save_concept(c, tmp_path / "hugsy.safetensors")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data[8 + n :]).hexdigest()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/perfusion"
    assert meta["modelspec.trigger_phrase"] == "hugsy" and meta["modelspec.title"] == "hugsy"
    assert meta["ss_steps"] == "400" and "other" not in meta and meta["ss_network_module"] == "perfusion.perfusion"
    loaded = load_concept(path)
    assert loaded.shared_metadata["ss_steps"] == "400"
    loaded.values = {k: v * 2 for k, v in loaded.values.items()}
    again = save_concept(loaded, tmp_path / "again.safetensors").read_bytes()
    (m,) = struct.unpack("<Q", again[:8])
    new_hash = json.loads(again[8 : 8 + m])["__metadata__"]["modelspec.hash_sha256"]
    assert new_hash == "0x" + hashlib.sha256(again[8 + m :]).hexdigest() != meta["modelspec.hash_sha256"]
