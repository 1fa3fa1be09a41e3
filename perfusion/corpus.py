"""A generated corpus of Stable Diffusion style prompts.

The prompts are used to estimate statistics of the text encoder's output, such as the covariance
C = E[e e^T] of its rows. They are built from the templates and word lists in
``data/corpus_vocab.json``: each ``{name}`` in a template is replaced by a word from the list
``name``, giving prompts like "a cat" or "portrait of an old fisherman, oil painting, highly detailed".
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from pathlib import Path

VOCAB_PATH = Path(__file__).with_name("data") / "corpus_vocab.json"
MAX_WORDS = 60

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# "a" followed by a vowel sound; "uni...", "use...", "eu..." and the like sound like "you".
_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aio]|e(?!u)|u(?!ni|ku|se|su|ti)|hour|honest|heir)")


@functools.cache
def vocabulary() -> dict[str, list[str]]:
    """The vocabulary file's lists by name: "templates", every word list, and every group.

    A group (such as "noun") is the concatenation of its member lists, without repeats.
    """
    data = json.loads(VOCAB_PATH.read_text(encoding="utf-8"))
    lists = dict(data["lists"])
    for group, members in data["groups"].items():
        lists[group] = list(dict.fromkeys(word for member in members for word in lists[member]))
    return {"templates": data["templates"], **lists}


def prompt_corpus(count: int = 25_000, seed: int = 0) -> list[str]:
    """`count` distinct prompts, deterministic for (count, seed); uses random.Random(seed) only.

    Each prompt fills a randomly chosen template and has at most MAX_WORDS words. Raises
    ValueError if the vocabulary cannot produce `count` distinct prompts.
    """
    vocab = vocabulary()
    templates = vocab["templates"]
    capacity = sum(math.prod(len(vocab[name]) for name in _PLACEHOLDER.findall(t)) for t in templates)
    if count > capacity:
        raise ValueError(f"the vocabulary yields at most {capacity} distinct prompts, {count} requested")
    rng = random.Random(seed)
    prompts: dict[str, None] = {}  # insertion-ordered set
    repeats_left = 100 * count + 1000
    while len(prompts) < count:
        prompt = _fill(rng.choice(templates), vocab, rng)
        if prompt not in prompts and len(prompt.split()) <= MAX_WORDS:
            prompts[prompt] = None
            continue
        repeats_left -= 1
        if repeats_left < 0:
            raise ValueError(f"the vocabulary did not yield {count} distinct prompts (found {len(prompts)})")
    return list(prompts)


def _fill(template: str, vocab: dict[str, list[str]], rng: random.Random) -> str:
    """The template with each placeholder replaced by a word from its list, with a/an corrected.

    A word already used in the prompt is redrawn (a few times) so that lists like "quality",
    which appear more than once in a template, rarely repeat themselves.
    """
    used: set[str] = set()

    def pick(match: re.Match[str]) -> str:
        words = vocab[match[1]]
        for _ in range(3):
            word = rng.choice(words)
            if word not in used:
                break
        used.add(word)
        return word

    return _A_BEFORE_VOWEL.sub(r"\1n ", _PLACEHOLDER.sub(pick, template))
