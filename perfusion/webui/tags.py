"""Prompt tags `<perfusion:NAME[:TAU[:BETA]][:tau=..][:beta=..][:lock=local|global]>` as requests.

Pure functions over the tag's items (the WebUI hands them over already split on ':'); nothing here
imports the WebUI.
"""

from __future__ import annotations

from collections.abc import Sequence
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
