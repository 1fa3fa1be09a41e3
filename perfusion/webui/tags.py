"""Prompt tags `<perfusion:NAME[:TAU[:BETA]][:tau=..][:beta=..][:lock=local|global]>` as requests.

Pure functions over the tag's items (the WebUI hands them over already split on ':'); nothing here
imports the WebUI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from ..options import BETA_RANGE, LOCK_CHOICES, TAU_RANGE


@dataclass(frozen=True)
class Request:
    """One concept asked for by a tag; None fields fall back to the defaults (sliders)."""

    name: str
    tau: Optional[float] = None
    beta: Optional[float] = None
    lock: Optional[str] = None


def _number(text: str, field: str, name: str, allowed: tuple[float, float]) -> tuple[Optional[float], list[str]]:
    try:
        value = float(text)
    except ValueError:
        return None, [f"<perfusion:{name}>: {field} {text!r} is not a number; using the default"]
    if value != value or not allowed[0] <= value <= allowed[1]:
        return None, [f"<perfusion:{name}>: {field} {text} is outside {allowed[0]}..{allowed[1]}; using the default"]
    return value, []


def parse_request(positional: Sequence[str], named: dict[str, str]) -> tuple[Optional[Request], list[str]]:
    """(request, warnings) from one tag's positional and named items; request None when it names nothing."""
    if not positional or not str(positional[0]).strip():
        return None, ["<perfusion:...> without a concept name ignored"]
    name = str(positional[0]).strip()
    warnings: list[str] = []
    values: dict[str, Optional[float]] = {"tau": None, "beta": None}
    given = dict(zip(("tau", "beta"), positional[1:3]))
    if len(positional) > 3:
        warnings.append(
            f"<perfusion:{name}>: extra arguments {list(positional[3:])} ignored "
            "(use NAME:TAU:BETA or tau=, beta=, lock=)"
        )
    for key, text in named.items():
        key = key.strip().lower()
        if key in values:
            given[key] = text
        elif key != "lock":
            warnings.append(f"<perfusion:{name}>: unknown argument {key}= ignored (tau, beta, lock)")
    for key, text in given.items():
        values[key], problems = _number(str(text).strip(), key, name, TAU_RANGE if key == "tau" else BETA_RANGE)
        warnings += problems
    lock = None
    if "lock" in {k.strip().lower() for k in named}:
        text = next(v for k, v in named.items() if k.strip().lower() == "lock").strip().lower()
        if text in LOCK_CHOICES:
            lock = text
        else:
            warnings.append(
                f"<perfusion:{name}>: lock={text} is not one of {'/'.join(LOCK_CHOICES)}; using the default"
            )
    return Request(name, values["tau"], values["beta"], lock), warnings


def format_tag(name: str, tau: float, beta: Optional[float] = None, lock: Optional[str] = None) -> str:
    """The tag text for a concept (TAU stays the last positional number: the WebUI's card toggling and
    Ctrl+Up/Down edit it)."""
    extra = "".join(f":{k}={v}" for k, v in (("beta", beta), ("lock", lock)) if v is not None)
    return f"<perfusion:{name}{extra}:{tau:g}>"


NO_CONCEPT = "none"  # the concept axis value that shows the prompt without its concept (its superclass word)
TAG = re.compile(r"<perfusion:([^:>]+)((?::[^>]*)?)>")
ANY_TAG = re.compile(r"(<[^>]*>)")

WordOf = Callable[[str], tuple[str, str]]  # concept name -> (its word, its superclass word)


def swap_concept(prompt: str, name: str, word_of: WordOf) -> str:
    """`prompt` with its first Perfusion concept replaced by concept `name`: the tag's name (its gate values
    kept) and the old concept's word outside tags; NO_CONCEPT drops the tag and writes the superclass word
    instead (the base model's picture of the same prompt). Raises ValueError when there is no tag."""
    tag = TAG.search(prompt)
    if tag is None:
        raise ValueError("[Perfusion] concept: the prompt has no <perfusion:NAME> tag to swap")
    old_word, superclass = word_of(tag.group(1))
    if name == NO_CONCEPT:
        new_tag, new_word = "", superclass
    else:
        new_tag, new_word = f"<perfusion:{name}{tag.group(2)}>", word_of(name)[0]
    prompt = prompt[: tag.start()] + new_tag + prompt[tag.end() :]
    word = re.compile(rf"(?<!\w){re.escape(old_word)}(?!\w)")
    return "".join(part if ANY_TAG.fullmatch(part) else word.sub(new_word, part) for part in ANY_TAG.split(prompt))
