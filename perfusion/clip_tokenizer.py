"""The real CLIP text tokenizer, rebuilt offline from the BPE file in the open_clip wheel.

open_clip ships ``bpe_simple_vocab_16e6.txt.gz`` (the merge list CLIP was trained with).
Hugging Face's ``CLIPTokenizer`` wants the same information as ``vocab.json`` +
``merges.txt``.  This module derives those two files from the gzip, caches them on disk and
loads a ``transformers.CLIPTokenizer`` from them, so nothing is fetched from a model hub.

open_clip itself is never imported (its package ``__init__`` pulls in torchvision); the
file is located through ``importlib.util.find_spec`` only.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    import transformers

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "BOS_ID",
    "EOS_ID",
    "VOCAB_SIZE",
    "MAX_LENGTH",
    "bpe_vocabulary_file",
    "write_tokenizer_files",
    "load_tokenizer",
    "default_cache_dir",
]

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
BOS_ID = VOCAB_SIZE - 2  # 49406
EOS_ID = VOCAB_SIZE - 1  # 49407
MAX_LENGTH = 77
# 256 byte symbols + 256 end-of-word byte symbols + merges + 2 specials = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894
MERGES_HEADER = "#version: 0.2"

_INSTALL_HINT = "pip install --no-deps open-clip-torch==3.3.0"


def bpe_vocabulary_file() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open_clip package.

    Located with ``importlib.util.find_spec`` so open_clip is not imported.
    Raises FileNotFoundError (with an install hint) when the package or file is missing.
    """
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    locations: list[str] = []
    if spec is not None:
        if spec.submodule_search_locations:
            locations.extend(spec.submodule_search_locations)
        elif spec.origin:
            locations.append(str(Path(spec.origin).parent))
    for loc in locations:
        candidate = Path(loc) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in: {', '.join(locations)})" if locations else " (package open_clip not found)"
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {BPE_FILE_NAME} is not available{where}. Install it with: {_INSTALL_HINT}"
    )


def _byte_symbols() -> list[str]:
    """The 256 byte-level unicode symbols, in CLIP/GPT-2 vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first (in byte order); the
    remaining bytes are mapped, in byte order, to code points 256, 257, ... and follow.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    kept = set(printable)
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in kept:
            symbols.append(chr(256 + extra))
            extra += 1
    assert len(symbols) == 256
    return symbols


def _read_merges(bpe_path: Path) -> list[str]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # line 0 is a header; CLIP uses exactly the next NUM_MERGES merges.
    merges = lines[1 : 1 + NUM_MERGES]
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like the CLIP BPE merge list")
    return merges


def _build_vocab(merges: list[str]) -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens.extend(m.replace(" ", "") for m in merges)
    tokens.extend([BOS_TOKEN, EOS_TOKEN])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built a CLIP vocabulary of {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


def _files_complete(dest: Path) -> bool:
    vocab_path, merges_path = dest / "vocab.json", dest / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        return False
    try:
        with open(vocab_path, encoding="utf-8") as fh:
            vocab = json.load(fh)
        if (
            not isinstance(vocab, dict)
            or len(vocab) != VOCAB_SIZE
            or vocab.get(BOS_TOKEN) != BOS_ID
            or vocab.get(EOS_TOKEN) != EOS_ID
        ):
            return False
        with open(merges_path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return len(lines) == 1 + NUM_MERGES and lines[0] == MERGES_HEADER
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def write_tokenizer_files(dest: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face CLIPTokenizer layout) into dest.

    Derived from :func:`bpe_vocabulary_file`. Idempotent: if both files already exist and are
    complete nothing is written. Each file is written to a temporary name and moved into
    place (``perfusion.files.atomic_write``), so readers never see a partial file. Returns dest.
    """
    dest = Path(dest)
    if _files_complete(dest):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    merges = _read_merges(bpe_vocabulary_file())
    vocab = _build_vocab(merges)
    # merges.txt first: completeness is judged on both files, and vocab.json last means a
    # crash in between leaves an incomplete pair that is simply rewritten next time.
    atomic_write(dest / "merges.txt", (MERGES_HEADER + "\n" + "\n".join(merges) + "\n").encode("utf-8"))
    atomic_write(dest / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return dest


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "sd-webui-perfusion" / "clip-tokenizer"


def load_tokenizer(cache_dir: Path | None = None) -> transformers.CLIPTokenizer:
    """The real CLIP tokenizer (49408 ids, BOS 49406, EOS 49407, model_max_length 77).

    The files are generated once under cache_dir (default
    ``~/.cache/sd-webui-perfusion/clip-tokenizer``) and loaded from there, offline.
    """
    from transformers import CLIPTokenizer

    path = write_tokenizer_files(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True, model_max_length=MAX_LENGTH)
    if len(tok) != VOCAB_SIZE or tok.bos_token_id != BOS_ID or tok.eos_token_id != EOS_ID:
        raise RuntimeError(
            f"CLIP tokenizer loaded from {path} is inconsistent: size {len(tok)}, "
            f"bos {tok.bos_token_id}, eos {tok.eos_token_id}"
        )
    return tok
