"""Fuzzing concept files: every malformed file, special file and corruption raises ConceptError naming the
file, promptly, and never anything else (generated cases; seeded, so a failure reproduces)."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
from contextlib import contextmanager

import pytest
import torch
from concepts import make_concept, random_covariance

from perfusion import ConceptError, load_concept, save_concept
from perfusion.files import FileRefused, read_regular


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block takes longer than `seconds`."""

    def expire(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory):
    c = make_concept({"attn2": 64, "attn2b": 32}, 96, random_covariance(96), arch="other")
    return save_concept(c, tmp_path_factory.mktemp("good") / "good.safetensors").read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + body


def header_cases(good: bytes):
    """(label, bytes) for malformed headers, offsets, shapes, dtypes and metadata."""
    header, body = split(good)
    tensor = next(k for k in header if k != "__metadata__")
    for offsets in ([0], [0, 1, 2], "ab", [None, None], [1.5, 2], [-1, 4], [10, 2], [0, 10**12], {}, None, True):
        h = json.loads(json.dumps(header))
        h[tensor]["data_offsets"] = offsets
        yield f"data_offsets={offsets!r}", join(h, body)
    for shape in ([-1], ["a"], "768", None, [1.5], [10**9]):
        h = json.loads(json.dumps(header))
        h[tensor]["shape"] = shape
        yield f"shape={shape!r}", join(h, body)
    for dtype in ("I8", "F8", None, 3, "U8"):
        h = json.loads(json.dumps(header))
        h[tensor]["dtype"] = dtype
        yield f"dtype={dtype!r}", join(h, body)
    for meta in ("text", 3, [1, 2], None, {"perfusion_format": 1}, {"perfusion_format": "1", "token": ["x"]}):
        h = json.loads(json.dumps(header))
        h["__metadata__"] = meta
        yield f"__metadata__={meta!r}", join(h, body)
    unusable = ("nan", "inf", "-inf", "1e400", "", "12abc", "1" * 400, "0x10", "1e", " ")
    for field, also in (
        ("context_dim", ("-1", "0", "0.5", "95")),
        ("clip_skip", ("-1", "0", "0.5")),
        ("steps", ("-1", "0.5")),
        ("tau", ("-1", "0")),
        ("train_tau", ("-1", "0")),
        ("beta", ("1e9",)),
        ("train_beta", ("-1e9",)),
    ):
        for value in unusable + also:
            h = json.loads(json.dumps(header))
            h["__metadata__"][field] = value
            yield f"{field}={value!r}", join(h, body)
    for raw in (b"", b"\x00", b"{", b"[]", b'"x"', b"\xff\xfe", b"{}" + b" " * 10):
        yield f"header bytes {raw!r}", join(raw, body)
    yield "header length past the end", struct.pack("<Q", 10**6) + good[8:100]
    yield "header length huge", struct.pack("<Q", 2**63) + good[8:]
    yield "empty file", b""
    yield "7 bytes", good[:7]


def tensor_cases(tmp_path):
    """(label, bytes) for well-formed files holding wrong tensors."""
    from safetensors.torch import save

    c = make_concept({"attn2": 64}, 96, random_covariance(96))
    base = {
        "embedding": c.embedding[""],
        "i_star": c.i_star,
        "a": c.a,
        "energy": c.energy.reshape(1),
        "i_super": c.i_super,
        "v.attn2": c.values["attn2"],
    }
    meta = {
        "perfusion_format": "1",
        "method": "perfusion",
        "token": "hugsy",
        "superclass": "teddy",
        "arch": "other",
        "context_dim": "96",
    }
    for name in base:
        for bad in (torch.tensor(1.0), torch.ones(0), torch.ones(2, 3, 4), torch.full_like(base[name], float("nan"))):
            if name == "energy" and bad.numel() == 1 and not bad.isnan().any():
                continue  # a 0-d energy is the scalar it stands for
            yield f"{name} = {list(bad.shape)}{' NaN' if bad.isnan().any() else ''}", save({**base, name: bad}, meta)
    yield "energy negative", save({**base, "energy": -base["energy"]}, meta)
    yield "int tensor", save({**base, "i_star": torch.ones(96, dtype=torch.int32)}, meta)


def refused_count(tmp_path, cases) -> int:
    """How many (label, bytes) cases there were; each must raise ConceptError naming the file."""
    n = 0
    for label, data in cases:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(data)
        try:
            load_concept(path)
            pytest.fail(f"{label}: loaded")
        except ConceptError as e:
            assert str(path) in str(e), label
        n += 1
    return n


def test_malformed_headers_and_metadata_raise_concept_error(tmp_path, good_bytes):
    assert refused_count(tmp_path, header_cases(good_bytes)) > 100


def test_wrong_tensors_raise_concept_error(tmp_path):
    assert refused_count(tmp_path, tensor_cases(tmp_path)) > 20


def test_truncations_and_bit_flips_never_escape(tmp_path, good_bytes):
    """Random truncations and byte flips: either a valid concept or ConceptError, nothing else."""
    rng = random.Random(5)
    path, loaded = tmp_path / "x.safetensors", 0
    for k in range(300):
        data = bytearray(good_bytes)
        if k % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(min(len(data), 400))] = rng.randrange(256)  # mostly the header
        path.write_bytes(bytes(data))
        try:
            load_concept(path)
            loaded += 1
        except ConceptError as e:
            assert str(path) in str(e)
    assert loaded < 300  # the corruptions were real


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX special files")
def test_special_files_are_refused_without_hanging(tmp_path, good_bytes):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    cases = {"fifo": fifo, "folder": tmp_path / "dir.safetensors", "loop": tmp_path / "loop.safetensors"}
    cases["folder"].mkdir()
    os.symlink(cases["loop"], cases["loop"])
    for device in ("/dev/zero", "/dev/urandom", "/dev/null"):
        link = tmp_path / f"{device.rsplit('/', 1)[1]}.safetensors"
        os.symlink(device, link)
        cases[device] = link
    for label, path in cases.items():
        with deadline(5), pytest.raises(ConceptError, match="cannot read") as err:
            load_concept(path)
        assert str(path) in str(err.value), label
    good = tmp_path / "good.safetensors"
    good.write_bytes(good_bytes)
    link = tmp_path / "link.safetensors"
    os.symlink(good, link)
    assert load_concept(link).token == "hugsy"  # a symlink to a regular file is fine


def test_read_regular_is_bounded(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular(path, 100) == b"x" * 100
    with pytest.raises(FileRefused, match="limit"):
        read_regular(path, 99)
