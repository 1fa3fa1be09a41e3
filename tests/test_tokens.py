"""Concept rows found by tokenizing with the real CLIP vocabulary (BOS, multi-token words, long prompts)."""

from __future__ import annotations

import pytest

from perfusion import concept_rows, word_rows
from perfusion.clip_tokenizer import load_tokenizer
from perfusion.tokens import CLIP_BOS, CLIP_EOS


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def chunked(tok, text, per_chunk=75):
    """The WebUI's layout: 75 prompt tokens per chunk, BOS first, EOS after, EOS padding to 77."""
    tokens = ids(tok, text)
    chunks = []
    for start in range(0, max(len(tokens), 1), per_chunk):
        body = tokens[start : start + per_chunk]
        chunks.append([CLIP_BOS] + body + [CLIP_EOS] * (76 - len(body)))
    return chunks


def test_single_token_word_row_counts_bos(tok):
    chunks = chunked(tok, "a photo of a teddy bear")
    assert chunks[0][:8] == [49406, 320, 1125, 539, 320, 11798, 4298, 49407]
    assert concept_rows(chunks, ids(tok, "teddy")) == [5]
    assert concept_rows(chunks, ids(tok, "photo")) == [2]


def test_word_split_into_several_tokens(tok):
    word = ids(tok, "hugsy")
    assert len(word) >= 2
    chunks = chunked(tok, "a photo of hugsy on the moon")
    rows = word_rows(chunks, word)
    assert rows == [list(range(4, 4 + len(word)))]
    assert concept_rows(chunks, word) == [3 + len(word)]


def test_repeated_word_gives_every_occurrence(tok):
    chunks = chunked(tok, "hugsy and a dog, hugsy again")
    word = ids(tok, "hugsy")
    assert len(concept_rows(chunks, word)) == 2
    assert concept_rows(chunks, word)[0] == len(word)


def test_long_prompt_rows_continue_in_later_chunks(tok):
    filler = "a very detailed photo of a sunny meadow with flowers, " * 8
    text = filler + "and a teddy bear"
    chunks = chunked(tok, text)
    assert len(chunks) >= 2
    n_before = len(ids(tok, filler + "and a"))
    chunk, pos = divmod(n_before, 75)
    assert concept_rows(chunks, ids(tok, "teddy")) == [chunk * 77 + 1 + pos]


def test_word_straddling_a_chunk_boundary(tok):
    word = ids(tok, "hugsy")
    head = [320] * (75 - 1)  # the word's first token is the last of chunk 0
    tokens = head + word
    chunks = [[CLIP_BOS] + tokens[:75] + [CLIP_EOS], [CLIP_BOS] + tokens[75:] + [CLIP_EOS] * (76 - len(tokens[75:]))]
    assert word_rows(chunks, word) == [[75] + [77 + 1 + k for k in range(len(word) - 1)]]


def test_padding_and_missing_words_are_not_matched(tok):
    chunks = chunked(tok, "a cat")
    assert concept_rows(chunks, [CLIP_EOS]) == []
    assert concept_rows(chunks, ids(tok, "teddy")) == []
    with pytest.raises(ValueError):
        concept_rows(chunks, [])
