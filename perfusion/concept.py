"""Concept data and its file format (safetensors, format 1; see docs/concept-format.md).

A concept file never holds code: it is parsed from its JSON header and raw tensor bytes only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load as _load_safetensors_bytes
from safetensors.torch import save as _save_safetensors_bytes

from .files import atomic_write, read_prefix, read_regular
from .options import ARCHS, BETA, METHODS, TAU, TRAIN_BETA, TRAIN_LOCKS, TRAIN_TAU, Arch, Method, TrainLock

FORMAT_VERSION = "1"
SDXL_EMBEDDINGS = {"clip_l": 768, "clip_g": 1280}
MAX_FILE_BYTES = 64 * 2**20
MAX_HEADER_BYTES = 2**20
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# metadata numbers: (smallest, largest) accepted; the integer ones must be whole
_NUMERIC_FIELDS = {
    "context_dim": (1, 65536),
    "clip_skip": (1, 64),
    "steps": (0, 10**9),
    "train_beta": (-100.0, 100.0),
    "train_tau": (0.0, 100.0),
    "beta": (-100.0, 100.0),
    "tau": (0.0, 100.0),
}  # tau > 0: validate says so
_INTEGER_FIELDS = ("context_dim", "clip_skip", "steps")


SKIPPED_SUFFIXES = (".resume.safetensors", ".covariance.safetensors")  # a run's checkpoint, a covariance cache


def is_concept_file(filename: str) -> bool:
    """A file name hosts list as a concept (training checkpoints and caches are not)."""
    return filename.endswith(".safetensors") and not filename.endswith(SKIPPED_SUFFIXES)


class ConceptError(ValueError):
    """A concept file or concept that cannot be used; the message names the file and the problem."""


@dataclass
class Concept:
    """One learned concept.

    Shapes (d = context_dim, the text-encoding width the U-Net's cross-attention reads):
      embedding   {"": [n, d_emb]} for one text encoder, {"clip_l": [n,768], "clip_g": [n,1280]} SDXL
      i_star      [d]   target input: the concept word's encoding
      a           [d]   C^-1 i* / energy, the gate direction (a . i* = 1)
      energy      [1]   i*^T C^-1 i*
      i_super     [d]   the superclass word's encoding at the same rows
      values      {layer: [d_out]}  o*_V per edited attn2 (Infusion: the value residual)
      keys        {layer: [d_out]}  optional o*_K; when absent o*_K = W_K i_super
    """

    token: str
    superclass: str
    embedding: dict[str, torch.Tensor]
    i_star: torch.Tensor
    a: torch.Tensor
    energy: torch.Tensor
    i_super: torch.Tensor
    values: dict[str, torch.Tensor]
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    method: Method = "perfusion"
    arch: Arch = "other"
    base_model_hash: str = ""
    covariance_hash: str = ""
    clip_skip: int = 1
    train_beta: float = TRAIN_BETA
    train_tau: float = TRAIN_TAU
    lock: TrainLock = "local"  # how its key was locked in training: the lock it is applied with by default
    beta: float = BETA
    tau: float = TAU
    steps: int = 0
    created: str = ""
    name: str = ""
    # keys other tools read (`modelspec.*`, kohya-style `ss_*`: training summary), kept through load and save
    shared_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def context_dim(self) -> int:
        return int(self.i_star.shape[-1])

    @property
    def layers(self) -> list[str]:
        return sorted(self.values)


def _tensors(concept: Concept) -> dict[str, torch.Tensor]:
    out = {("embedding" if not k else f"embedding.{k}"): v for k, v in concept.embedding.items()}
    out.update(i_star=concept.i_star, a=concept.a, energy=concept.energy.reshape(1), i_super=concept.i_super)
    out.update({f"v.{layer}": v for layer, v in concept.values.items()})
    out.update({f"k.{layer}": k for layer, k in concept.keys.items()})
    return out


SHARED_PREFIXES = ("modelspec.", "ss_")
# modelspec.architecture per arch (Stability's model spec: "<base model>/<kind of add-on>")
_SPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "other": "other",
}


def _standard_metadata(concept: Concept, created: str, tensors_sha256: str) -> dict[str, str]:
    """What model managers and sites read: the modelspec keys (title, architecture, trigger phrase, hash of
    the tensors) and kohya's identifying ss_ keys; the training summary comes in `shared_metadata`."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_SPEC_ARCH.get(concept.arch, 'other')}/{concept.method}",
        "modelspec.implementation": "sd-webui-perfusion",
        "modelspec.title": concept.name or concept.token,
        "modelspec.date": created,
        "modelspec.trigger_phrase": concept.token,
        "modelspec.description": (
            f"{concept.method.capitalize()} concept: write '{concept.token}' (a {concept.superclass}) in the prompt"
        ),
        "modelspec.hash_sha256": "0x" + tensors_sha256,
        "ss_network_module": f"perfusion.{concept.method}",
        "ss_output_name": concept.name or concept.token,
    }


def _metadata(concept: Concept, tensors_sha256: str = "") -> dict[str, str]:
    created = concept.created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    shared = {  # the computed keys win over ones read from an earlier save (a stale hash, an old title)
        **{k: str(v) for k, v in concept.shared_metadata.items() if k.startswith(SHARED_PREFIXES)},
        **_standard_metadata(concept, created, tensors_sha256),
    }
    if not tensors_sha256:
        shared.pop("modelspec.hash_sha256")
    return shared | {
        "perfusion_format": FORMAT_VERSION,
        "method": concept.method,
        "token": concept.token,
        "superclass": concept.superclass,
        "arch": concept.arch,
        "context_dim": str(concept.context_dim),
        "base_model_hash": concept.base_model_hash,
        "covariance_hash": concept.covariance_hash,
        "clip_skip": str(concept.clip_skip),
        "train_beta": repr(float(concept.train_beta)),
        "train_tau": repr(float(concept.train_tau)),
        "lock": concept.lock,
        "beta": repr(float(concept.beta)),
        "tau": repr(float(concept.tau)),
        "steps": str(int(concept.steps)),
        "created": created,
    }


# Tensors that stay float32 on disk: the gate direction is precision-critical (s = a . e is a
# dot product of large-norm rows), the scalar energy costs nothing.
_FP32_TENSORS = ("a", "energy")


def save_concept(concept: Concept, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Validate and write `concept` to `path` atomically (temp file + rename). Returns the path."""
    path = Path(path)
    validate(concept, source=str(path))
    tensors = {
        name: t.detach().to("cpu", torch.float32 if name in _FP32_TENSORS else dtype).contiguous()
        for name, t in _tensors(concept).items()
    }
    body = _save_safetensors_bytes(tensors)  # the tensor bytes after the header do not depend on the metadata
    (header_len,) = struct.unpack("<Q", body[:8])
    digest = hashlib.sha256(body[8 + header_len :]).hexdigest()
    return atomic_write(path, _save_safetensors_bytes(tensors, metadata=_metadata(concept, digest)))


def _read_header(data: bytes, source: str, file_size: int | None = None) -> dict:
    """Parse and bounds-check a safetensors header before any tensor is built. `data` is the whole file, or
    (with `file_size`) at least its first 8 + header-length bytes."""

    def fail(problem: str) -> ConceptError:
        return ConceptError(f"{source}: {problem}")

    if len(data) < 8:
        raise fail("not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise fail(f"header of {n} bytes is larger than the {MAX_HEADER_BYTES}-byte limit (not a concept file?)")
    size = len(data) if file_size is None else file_size
    if 8 + n > min(len(data), size):
        raise fail("file is truncated (header runs past the end of the file)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise fail("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise fail("not a safetensors file (header is not a JSON object)")
    body = size - 8 - n
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise fail("'__metadata__' must map text keys to text values")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise fail(
                f"tensor '{name}' has an unsupported dtype {info.get('dtype') if isinstance(info, dict) else info!r}"
            )
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)):
            raise fail(f"tensor '{name}': 'data_offsets' must be two whole numbers, found {offsets!r}")
        if not (isinstance(shape, list) and all(type(v) is int and v >= 0 for v in shape)):
            raise fail(f"tensor '{name}': 'shape' must be a list of whole numbers, found {shape!r}")
        start, end = offsets
        if not (0 <= start <= end <= body):
            raise fail(f"file is truncated (tensor '{name}' runs past the end of the file)")
        if end - start != math.prod(shape) * _DTYPES[info["dtype"]].itemsize:
            raise fail(f"tensor '{name}': {end - start} bytes do not hold a {info['dtype']} tensor of shape {shape}")
    return header


def _concept_metadata(header: dict, source: str) -> dict[str, str]:
    """The header's metadata once it is known to be a concept of this format version."""
    meta = header.get("__metadata__") or {}
    version = meta.get("perfusion_format")
    if version is None:
        raise ConceptError(
            f"{source}: not a Perfusion concept (no 'perfusion_format' metadata); "
            "textual-inversion or Lora files belong in their own folders"
        )
    if version != FORMAT_VERSION:
        raise ConceptError(
            f"{source}: concept format {version!r} is not supported (this version reads "
            f"format {FORMAT_VERSION}); update the extension"
        )
    return meta


def _built(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Concept:
    """The validated Concept of a file's tensors and metadata; any problem is a ConceptError naming the file."""
    source = str(path)
    try:
        concept = _from_tensors(tensors, meta, source)
        concept.name = path.stem
        validate(concept, source=source)
    except ConceptError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, RuntimeError) as e:
        # a malformation no check above names; still this file's problem, never the caller's crash
        raise ConceptError(f"{source}: malformed concept ({type(e).__name__}: {e})") from None
    return concept


def peek_concept(path: str | os.PathLike) -> Concept:
    """The concept in `path` read from its header alone (8 bytes + the header: 3 KB of a 35 KB SD1 file): every
    tensor on torch's meta device (shape and dtype, no values). Checked as load_concept checks a file, except
    for the values themselves (finite, positive energy): what cards, the API and fit checks need."""
    path = Path(path)
    try:
        head, size = read_prefix(path, MAX_FILE_BYTES, 8)
        if len(head) == 8:  # then the header, whose length the first 8 bytes give (bounded: _read_header says why)
            head, size = read_prefix(path, MAX_FILE_BYTES, 8 + min(struct.unpack("<Q", head)[0], MAX_HEADER_BYTES))
    except OSError as e:
        raise ConceptError(f"{path}: cannot read the file ({e.strerror or e})") from None
    header = _read_header(head, str(path), file_size=size)
    meta = _concept_metadata(header, str(path))
    tensors = {
        name: torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]], device="meta")
        for name, info in header.items()
        if name != "__metadata__"
    }
    return _built(tensors, meta, path)


def load_concept(path: str | os.PathLike) -> Concept:
    """Read and validate a concept file; any problem raises ConceptError naming the file."""
    path = Path(path)
    source = str(path)
    try:
        data = read_regular(path, MAX_FILE_BYTES)
    except OSError as e:  # FileRefused says why (not a regular file, too large)
        raise ConceptError(f"{source}: cannot read the file ({e.strerror or e})") from None
    meta = _concept_metadata(_read_header(data, source), source)
    try:
        tensors = _load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for malformed bodies
        raise ConceptError(f"{source}: unreadable tensor data ({e})") from None
    return _built(tensors, meta, path)


def _from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str) -> Concept:
    missing = [k for k in ("token", "superclass", "method", "arch", "context_dim") if k not in meta]
    if missing:
        raise ConceptError(f"{source}: metadata field(s) missing: {', '.join(missing)}")
    numbers = {}
    for key, (low, high) in _NUMERIC_FIELDS.items():
        if key in meta:
            try:
                value = float(meta[key])
            except ValueError:
                raise ConceptError(f"{source}: metadata field '{key}' is not a number: {meta[key]!r}") from None
            if not low <= value <= high or (key in _INTEGER_FIELDS and value != int(value)):
                kind = "a whole number" if key in _INTEGER_FIELDS else "a number"
                raise ConceptError(
                    f"{source}: metadata field '{key}' must be {kind} from {low} to {high}, found {meta[key]!r}"
                )
            numbers[key] = value
    required = ("i_star", "a", "energy", "i_super")
    absent = [k for k in required if k not in tensors]
    if absent:
        raise ConceptError(f"{source}: tensor(s) missing: {', '.join(absent)}")
    if tensors["i_star"].dim() != 1:
        raise ConceptError(f"{source}: tensor 'i_star' has shape {list(tensors['i_star'].shape)}, expected [d]")
    embedding, values, keys, extra = {}, {}, {}, []
    for name, t in tensors.items():
        if name == "embedding":
            embedding[""] = t
        elif name.startswith("embedding."):
            embedding[name[len("embedding.") :]] = t
        elif name.startswith("v."):
            values[name[2:]] = t
        elif name.startswith("k."):
            keys[name[2:]] = t
        elif name not in required:
            extra.append(name)
    if extra:
        raise ConceptError(f"{source}: unexpected tensor(s): {', '.join(sorted(extra))}")
    kwargs = {k: (int(v) if k in ("clip_skip", "steps") else v) for k, v in numbers.items() if k != "context_dim"}
    concept = Concept(
        token=meta["token"],
        superclass=meta["superclass"],
        embedding=embedding,
        i_star=tensors["i_star"],
        a=tensors["a"],
        energy=tensors["energy"],
        i_super=tensors["i_super"],
        values=values,
        keys=keys,
        method=meta["method"],
        arch=meta["arch"],
        base_model_hash=meta.get("base_model_hash", ""),
        covariance_hash=meta.get("covariance_hash", ""),
        created=meta.get("created", ""),
        lock=meta.get("lock", "local"),  # files from before the training lock: the paper's
        shared_metadata={k: v for k, v in meta.items() if k.startswith(SHARED_PREFIXES)},
        **kwargs,
    )
    if concept.context_dim != int(numbers["context_dim"]):
        raise ConceptError(
            f"{source}: i_star has {concept.context_dim} entries but metadata says "
            f"context_dim {int(numbers['context_dim'])}"
        )
    return concept


def validate(concept: Concept, source: str = "concept") -> None:
    """Check fields, shapes and finiteness; raise ConceptError naming `source` and the problem."""

    def fail(problem: str) -> ConceptError:
        return ConceptError(f"{source}: {problem}")

    if concept.method not in METHODS:
        raise fail(f"method {concept.method!r} is not one of {', '.join(METHODS)}")
    if concept.arch not in ARCHS:
        raise fail(f"arch {concept.arch!r} is not one of {', '.join(ARCHS)}")
    if not concept.token.strip() or not concept.superclass.strip():
        raise fail("token and superclass must be non-empty words")
    d = concept.context_dim
    for name in ("i_star", "a", "i_super"):
        t = getattr(concept, name)
        if t.dim() != 1 or t.shape[0] != d:
            raise fail(f"tensor '{name}' has shape {list(t.shape)}, expected [{d}]")
    if concept.energy.numel() != 1:
        raise fail(f"tensor 'energy' has shape {list(concept.energy.shape)}, expected [1]")
    if not concept.embedding:
        raise fail("no 'embedding' tensor")
    if concept.arch == "sdxl" and set(concept.embedding) != set(SDXL_EMBEDDINGS):
        raise fail(
            f"SDXL concepts need tensors embedding.clip_l and embedding.clip_g, found "
            f"{', '.join(sorted('embedding' + ('.' + k if k else '') for k in concept.embedding))}"
        )
    if concept.arch != "sdxl" and set(concept.embedding) != {""}:
        raise fail("this architecture takes one tensor named 'embedding'")
    rows = {t.shape[0] if t.dim() == 2 else -1 for t in concept.embedding.values()}
    if len(rows) != 1 or -1 in rows:
        raise fail("embedding tensors must be 2-D [n, d_emb] with the same n")
    if rows == {0} and concept.method == "perfusion":
        raise fail("a Perfusion concept needs at least one embedding row")
    widths = {"sd1": 768, "sd2": 1024}
    for key, t in concept.embedding.items():
        want = SDXL_EMBEDDINGS.get(key) if concept.arch == "sdxl" else widths.get(concept.arch)
        if want is not None and t.shape[1] != want:
            raise fail(f"embedding{'.' + key if key else ''} is {t.shape[1]} wide, {concept.arch} needs {want}")
    if not concept.values:
        raise fail("no value targets (v.<layer> tensors)")
    for kind, table in (("v", concept.values), ("k", concept.keys)):
        for layer, t in table.items():
            if t.dim() != 1 or t.numel() == 0:
                raise fail(f"tensor '{kind}.{layer}' has shape {list(t.shape)}, expected [d_out]")
    extra_keys = set(concept.keys) - set(concept.values)
    if extra_keys:
        raise fail(f"key targets for layers without value targets: {', '.join(sorted(extra_keys))}")
    for layer, k in concept.keys.items():
        if k.shape != concept.values[layer].shape:
            raise fail(f"'k.{layer}' and 'v.{layer}' differ in shape")
    if not concept.energy.is_meta:  # a header-only peek has shapes, no values
        for name, t in _tensors(concept).items():
            if not torch.isfinite(t).all():
                raise fail(f"tensor '{name}' holds NaN or Inf values")
        if not float(concept.energy.reshape(())) > 0:
            raise fail("energy must be positive")
    if concept.lock not in TRAIN_LOCKS:
        raise fail(f"lock {concept.lock!r} is not one of {', '.join(TRAIN_LOCKS)}")
    for name in ("beta", "train_beta"):
        if not math.isfinite(getattr(concept, name)):
            raise fail(f"{name} must be finite")
    for name in ("tau", "train_tau"):
        if not getattr(concept, name) > 0:
            raise fail(f"{name} must be positive")
