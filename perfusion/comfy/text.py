"""Concept words onto a ComfyUI CLIP: a tokenizer that turns each whole-word occurrence of a concept's word
into its learned vectors, through the host's own embedding syntax (`embedding:NAME`).

`CLIP.clone()` shares its tokenizer, so the taught one is a new object over shallow copies of the host's
tokenizers; the input CLIP's tokenizer is never changed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, Optional

import torch

from ..concept import Concept
from ..hooks import ConceptMismatch, KeyContexts
from ..regional import RegionalComposition, plan_twins
from ..tokens import MAX_EMBEDDING_ROWS, as_superclass, concept_rows, content_positions, whole_word

log = logging.getLogger("perfusion")
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


class TwinTokens(dict):
    """Tokens (the host's dict) that also carry `twin`: the same prompt with each globally locked concept's
    word replaced by its superclass, for the keys to read (global key-locking); and, for regional composition,
    `text`: the prompt they were made from."""

    twin: Any = None
    text: Optional[str] = None


class TaughtTokenizer:
    """A CLIP tokenizer that knows concept words, over the untaught `base` (which stays as it was).

    global_words: the words whose concepts lock globally; prompts holding one also get the twin tokens.
    keep_text: prompts holding a concept word carry their text (regional composition encodes its twins)."""

    def __init__(
        self, base: Any, concepts: list[Concept], global_words: frozenset[str] = frozenset(), keep_text: bool = False
    ):
        self.base, self.concepts, self.global_words = base, list(concepts), frozenset(global_words)
        self.keep_text = keep_text
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
        tokens = self._taught.tokenize_with_weights(self.rewrite(text), return_word_ids, **kwargs)
        if self.keep_text and isinstance(tokens, dict) and any(p.search(text) for p, _ in self._patterns):
            out = TwinTokens(tokens)
            out.text = text
            return out
        locked = [
            c
            for c, (pattern, _) in zip(self.concepts, self._patterns)
            if c.token.lower() in self.global_words and pattern.search(text)
        ]
        if not locked or not isinstance(tokens, dict):
            return tokens
        out = TwinTokens(tokens)
        out.twin = self._taught.tokenize_with_weights(
            self.rewrite(as_superclass(text, locked)), return_word_ids, **kwargs
        )
        return out

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


def with_words(
    clip: Any,
    added: list[Concept],
    global_words: frozenset[str] = frozenset(),
    key_contexts: Optional[KeyContexts] = None,
    composition: Optional[RegionalComposition] = None,
) -> Any:
    """A clone of `clip` whose tokenizer knows the words of its concepts and of `added` (a concept whose word
    is already taught replaces it). Raises ConceptMismatch before cloning when a word's vectors do not fit.

    global_words + key_contexts: prompts with those words are encoded twice, and each encoding is paired in
    `key_contexts` with its superclass twin (the MODEL's keys read the twin: global key-locking).
    composition: the MODEL's regional composition; every prompt naming a concept is registered there with its
    twins when encoded (and global locking reads the twins, not key_contexts)."""
    tokens = {c.token.lower() for c in added}
    concepts = [c for c in taught_concepts(clip) if c.token.lower() not in tokens] + list(added)
    old = clip.tokenizer.global_words if isinstance(clip.tokenizer, TaughtTokenizer) else frozenset()
    words = (old - tokens) | frozenset(w.lower() for w in global_words)
    pairing = key_contexts is not None and composition is None
    tokenizer = TaughtTokenizer(  # composing, the words are kept for a later loader that does not compose
        untaught(clip.tokenizer), concepts, words, keep_text=composition is not None
    )
    clone = clip.clone()
    clone.tokenizer = tokenizer
    encode = type(clone).encode_from_tokens.__get__(clone)
    if composition is not None:
        clone.encode_from_tokens = _composing(encode, composition, tokenizer)
    elif pairing and words:
        clone.encode_from_tokens = _pairing(encode, key_contexts)
    return clone


def _composing(encode: Callable, composition: RegionalComposition, tokenizer: TaughtTokenizer) -> Callable:
    """CLIP.encode_from_tokens that registers each prompt naming a concept with its twins (regional.plan_twins:
    the base prompt, each concept's clause, the base prompt's superclass rows) in `composition`."""

    def encode_from_tokens(tokens, return_pooled=False, return_dict=False):
        out = encode(tokens, return_pooled=return_pooled, return_dict=return_dict)
        plan = plan_twins(tokens.text, composition.items) if getattr(tokens, "text", None) else None
        if plan is not None:
            cond = _cond(out, return_pooled, return_dict)
            encoded = {t: encode(tokenizer.tokenize_with_weights(t))[0] for t in plan.texts()}
            base_rows = {}
            if len(plan.own) > 1:
                chunks = _token_ids(untaught(tokenizer).tokenize_with_weights(plan.base))
                for superclass in {i.concept.superclass for i in composition.items}:
                    word = _token_ids(untaught(tokenizer).tokenize_with_weights(superclass))[0]
                    ids = [word[p] for p in content_positions(word)]
                    base_rows[superclass] = concept_rows(chunks, ids, len(chunks[0]))
            composition.add(cond[:1], [plan.twins(encoded, base_rows, composition.items)])
        return out

    return encode_from_tokens


def _cond(out: Any, return_pooled: bool, return_dict: bool) -> torch.Tensor:
    """The context rows [1, N, d] in what CLIP.encode_from_tokens returned for those flags."""
    return out["cond"] if return_dict else out[0] if return_pooled else out


def _token_ids(tokens: dict) -> list[list[int]]:
    """The first text encoder's token ids per chunk ({"l": [[(id, weight, ...), ...], ...]} -> [[id, ...]])."""
    first = tokens["l"] if "l" in tokens else next(iter(tokens.values()))
    return [[int(t[0]) if not isinstance(t[0], torch.Tensor) else -1 for t in chunk] for chunk in first]


def _pairing(encode: Callable, key_contexts: KeyContexts) -> Callable:
    """CLIP.encode_from_tokens that also encodes TwinTokens' twin and registers the (prompt, twin) pair."""

    def encode_from_tokens(tokens, return_pooled=False, return_dict=False):
        out = encode(tokens, return_pooled=return_pooled, return_dict=return_dict)
        twin_tokens = getattr(tokens, "twin", None)
        if twin_tokens is not None:
            cond = _cond(out, return_pooled, return_dict)
            twin = encode(twin_tokens)
            if twin.shape == cond.shape:  # else the words' token counts differ: the keys keep the prompt (local)
                key_contexts.add(cond, twin)
            else:
                log.warning(
                    "Perfusion: global locking could not pair the prompt with its superclass twin (%s vs %s rows)",
                    list(cond.shape),
                    list(twin.shape),
                )
        return out

    return encode_from_tokens
