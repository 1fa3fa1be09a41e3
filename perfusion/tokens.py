"""Where a word lands in the context tensor: found by tokenizing, never by word index.

A prompt is encoded in chunks of `chunk_length` rows (77 for CLIP: BOS, up to 75 tokens, EOS and
padding); the context tensor is the chunks' encodings concatenated, so a token at position p of
chunk k is row k * chunk_length + p.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

CLIP_BOS, CLIP_EOS = 49406, 49407
MAX_EMBEDDING_ROWS = 75  # a prompt is split into chunks of 75 tokens; a word's vectors must fit in one


def whole_word(word: str) -> re.Pattern:
    """`word` as a whole word, any case (as a concept's word is matched in prompts)."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def as_superclass(text: str, concepts: Iterable) -> str:
    """`text` with each concept's word (whole words, any case) replaced by its superclass word: the base prompt of
    regional composition, the twin global locking's keys read. `concepts`: anything with .token and .superclass."""
    for c in concepts:
        text = whole_word(c.token).sub(c.superclass, text)
    return text


def content_positions(chunk: Sequence[int], bos: int = CLIP_BOS, eos: int = CLIP_EOS) -> range:
    """Positions of a chunk's prompt tokens: after the leading BOS, up to the first EOS."""
    start = 1 if chunk and chunk[0] == bos else 0
    stop = next((p for p in range(start, len(chunk)) if chunk[p] == eos), len(chunk))
    return range(start, stop)


def word_rows(
    chunks: Sequence[Sequence[int]],
    word: Sequence[int],
    chunk_length: int = 77,
    bos: int = CLIP_BOS,
    eos: int = CLIP_EOS,
) -> list[list[int]]:
    """Context rows of every occurrence of `word` (its token ids, one or several) in `chunks`.

    chunks: the id sequences the encoder sees, one per chunk (each `chunk_length` long, BOS first).
    Returns one list of rows per occurrence, in prompt order; an occurrence may straddle a chunk
    boundary. Example: "a photo of hugsy" with hugsy -> 2 tokens gives [[4, 5]].
    """
    if not word:
        raise ValueError("word has no tokens")
    stream = [
        (k * chunk_length + p, chunk[p]) for k, chunk in enumerate(chunks) for p in content_positions(chunk, bos, eos)
    ]
    ids = [t for _, t in stream]
    n = len(word)
    return [[row for row, _ in stream[i : i + n]] for i in range(len(ids) - n + 1) if ids[i : i + n] == list(word)]


def concept_rows(
    chunks: Sequence[Sequence[int]],
    word: Sequence[int],
    chunk_length: int = 77,
    bos: int = CLIP_BOS,
    eos: int = CLIP_EOS,
) -> list[int]:
    """One row per occurrence of `word`: its last token's row (in a causal encoder it has read the whole word)."""
    return [rows[-1] for rows in word_rows(chunks, word, chunk_length, bos, eos)]
