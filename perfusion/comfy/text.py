"""Concept words onto a ComfyUI CLIP: a tokenizer that turns each whole-word occurrence of a concept's word
into its learned vectors, through the host's own embedding syntax (`embedding:NAME`).

`CLIP.clone()` shares its tokenizer, so the taught one is a new object over shallow copies of the host's
tokenizers; the input CLIP's tokenizer is never changed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..concept import Concept
from ..hooks import ConceptMismatch
from ..tokens import MAX_EMBEDDING_ROWS, whole_word

IDENTIFIER = "embedding:"  # SDTokenizer.embedding_identifier
_KEY = "perfusion.{}"  # the embedding name a concept word is rewritten to (a name no file can have: no extension)


def encoders(tokenizer: Any) -> dict[str, Any]:
    """{attribute: SDTokenizer} of a CLIP's tokenizer (one for SD1/SD2, clip_l and clip_g for SDXL)."""
    found = {
        k: v for k, v in vars(tokenizer).items() if hasattr(v, "_try_get_embedding") and hasattr(v, "embedding_key")
    }
    if not found and hasattr(tokenizer, "_try_get_embedding"):
        return {"": tokenizer}
    return found


def vectors_for(concept: Concept, encoder: Any) -> torch.Tensor:
    """The concept's word vectors [n, width] for one SDTokenizer (by its embedding_key, else by width)."""
    key, width = getattr(encoder, "embedding_key", ""), int(getattr(encoder, "embedding_size", 0))
    table = concept.embedding
    vectors = table.get(key) if key in table else table.get("")
    src = concept.name or concept.token
    if vectors is None or int(vectors.shape[-1]) != width:
        have = ", ".join(f"{k or 'one encoder'} {list(v.shape)}" for k, v in table.items())
        raise ConceptMismatch(
            f"{src}: its word vectors ({have}) do not fit this CLIP's {key or 'text encoder'} ({width} wide); "
            f"it was made for another architecture ({concept.arch})"
        )
    if not 1 <= int(vectors.shape[0]) <= MAX_EMBEDDING_ROWS:
        raise ConceptMismatch(f"{src}: its word has {vectors.shape[0]} vectors; CLIP takes 1 to {MAX_EMBEDDING_ROWS}")
    return vectors.float()


def _taught_encoder(encoder: Any, table: dict[str, torch.Tensor]) -> Any:
    """A shallow copy of one SDTokenizer whose embedding lookup also answers the names in `table`."""
    taught = copy.copy(encoder)
    fallback = encoder._try_get_embedding  # the host's lookup, for every other name

    def try_get_embedding(name: str):
        words = name.split()
        if words and words[0] in table:
            return table[words[0]], " ".join(words[1:])
        return fallback(name)

    taught._try_get_embedding = try_get_embedding
    return taught


class TaughtTokenizer:
    """A CLIP tokenizer that knows concept words, over the untaught `base` (which stays as it was)."""

    def __init__(self, base: Any, concepts: list[Concept]):
        self.base, self.concepts = base, list(concepts)
        self._patterns = [(whole_word(c.token), _KEY.format(n)) for n, c in enumerate(self.concepts)]
        subs = encoders(base)
        if "" in subs:
            self._taught = _taught_encoder(
                base, {k: vectors_for(c, base) for c, (_, k) in zip(concepts, self._patterns)}
            )
            return
        self._taught = copy.copy(base)
        for attr, encoder in subs.items():
            table = {key: vectors_for(c, encoder) for c, (_, key) in zip(self.concepts, self._patterns)}
            setattr(self._taught, attr, _taught_encoder(encoder, table))

    def rewrite(self, text: str) -> str:
        """`text` with every concept word as ` embedding:KEY ` (spaces: the host splits embeddings on them)."""
        for pattern, key in self._patterns:
            text = pattern.sub(f" {IDENTIFIER}{key} ", text)
        return text

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        return self._taught.tokenize_with_weights(self.rewrite(text), return_word_ids, **kwargs)

    def __getattr__(self, name: str):  # untokenize, state_dict, the sub-tokenizers ...
        return getattr(self._taught, name)


def embedding_width(clip: Any) -> int:
    """The width of the word vectors a CLIP takes (summed over its text encoders: SDXL 768 + 1280)."""
    return sum(int(e.embedding_size) for e in encoders(untaught(clip.tokenizer)).values())


def untaught(tokenizer: Any) -> Any:
    return tokenizer.base if isinstance(tokenizer, TaughtTokenizer) else tokenizer


def taught_concepts(clip: Any) -> list[Concept]:
    tok = clip.tokenizer
    return tok.concepts if isinstance(tok, TaughtTokenizer) else []


def with_words(clip: Any, added: list[Concept]) -> Any:
    """A clone of `clip` whose tokenizer knows the words of its concepts and of `added` (a concept whose word
    is already taught replaces it). Raises ConceptMismatch before cloning when a word's vectors do not fit."""
    tokens = {c.token.lower() for c in added}
    concepts = [c for c in taught_concepts(clip) if c.token.lower() not in tokens] + list(added)
    tokenizer = TaughtTokenizer(untaught(clip.tokenizer), concepts)
    clone = clip.clone()
    clone.tokenizer = tokenizer
    return clone
