import re

import pytest

from perfusion import corpus


@pytest.fixture(scope="module")
def prompts():
    return corpus.prompt_corpus()


def test_default_corpus_has_25000_distinct_prompts(prompts):
    assert len(prompts) == 25_000
    assert len(set(prompts)) == len(prompts)


def test_same_seed_gives_the_same_corpus_and_another_seed_a_different_one(prompts):
    assert corpus.prompt_corpus(seed=0) == prompts
    other = corpus.prompt_corpus(seed=1)
    assert len(other) == len(prompts)
    assert other != prompts
    assert len(set(other) & set(prompts)) < len(prompts) // 2


def test_count_gives_a_prefix_of_the_same_draw(prompts):
    assert corpus.prompt_corpus(count=100) == prompts[:100]


def test_lengths_vary_and_stay_bounded(prompts):
    words = [len(p.split()) for p in prompts]
    assert sum(n <= 4 for n in words) > 0.02 * len(prompts)
    assert sum(n >= 20 for n in words) > 0.05 * len(prompts)
    assert max(words) <= corpus.MAX_WORDS


def test_prompts_are_fully_filled_and_well_formed(prompts):
    for prompt in prompts:
        assert "{" not in prompt and "}" not in prompt
        assert prompt == prompt.strip() and "  " not in prompt
    text = "\n".join(prompts)
    assert not re.search(r"\ba (?:[aio]|e(?!u))", text)  # "a owl" must read "an owl"
    assert "an owl" in text


def test_most_nouns_appear(prompts):
    text = "\n".join(prompts)
    nouns = corpus.vocabulary()["noun"]
    assert len(nouns) >= 500
    assert sum(noun in text for noun in nouns) >= 0.95 * len(nouns)


def test_vocabulary_has_templates_and_variety():
    vocab = corpus.vocabulary()
    assert len(vocab["templates"]) >= 40
    for name in ("animal", "person", "object", "vehicle", "food", "building", "place", "style", "quality"):
        assert len(vocab[name]) >= 20, name
    names = {name for t in vocab["templates"] for name in re.findall(r"\{(\w+)\}", t)}
    assert names <= vocab.keys()


def test_too_many_prompts_for_the_vocabulary_raise(monkeypatch):
    tiny = {"templates": ["a {noun}", "{noun}"], "noun": ["cat", "dog"]}
    monkeypatch.setattr(corpus, "vocabulary", lambda: tiny)
    assert sorted(corpus.prompt_corpus(count=4)) == ["a cat", "a dog", "cat", "dog"]
    with pytest.raises(ValueError, match="distinct prompts"):
        corpus.prompt_corpus(count=5)


def test_overlapping_templates_that_fall_short_raise(monkeypatch):
    tiny = {"templates": ["a {noun}", "a {noun}"], "noun": ["cat", "dog"]}
    monkeypatch.setattr(corpus, "vocabulary", lambda: tiny)
    with pytest.raises(ValueError, match="distinct prompts"):
        corpus.prompt_corpus(count=3)
