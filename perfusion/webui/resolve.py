"""Tags to concepts: which requested concepts apply to a batch, with which gate, and why the others do not.

A pure function of the requests, the library, the defaults and what the loaded model is (its cross-attention
layers, the width its text encoder takes, its CLIP skip): no WebUI import, tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from torch import nn

from .. import hooks as engine
from ..concept import Concept, ConceptError
from ..hooks import ConceptMismatch
from ..options import BETA, COMPOSITION, TAU, Composition, LockChoice, Projection, activation_lock
from ..tokens import MAX_EMBEDDING_ROWS, whole_word
from .library import Entry, Library
from .state import Applied
from .tags import Request


@dataclass
class Defaults:
    """What applies when a tag gives no value (the gate sliders, or the settings)."""

    enabled: bool = True
    beta: float = BETA
    tau: float = TAU
    lock: LockChoice = "auto"
    projection: Projection = "approximate"
    composition: Composition = COMPOSITION


@dataclass(frozen=True)
class ModelFacts:
    """What a concept must fit: the U-Net's cross-attention layers, the width of the text encoder's word
    vectors (None where the host does not say) and the CLIP skip in use."""

    layers: dict[str, nn.Module]
    embedding_width: Optional[int] = None
    clip_skip: int = 1


def check_embedding(concept: Concept, width: Optional[int]) -> None:
    """Raise ConceptMismatch unless the concept's word vectors fit a text encoder taking `width`-wide ones."""
    first = next(iter(concept.embedding.values()))
    rows, total = int(first.shape[0]), sum(int(v.shape[-1]) for v in concept.embedding.values())
    src = concept.name or concept.token
    if not 1 <= rows <= MAX_EMBEDDING_ROWS:
        raise ConceptMismatch(
            f"{src}: its word has {rows} vectors; the text encoder takes 1 to {MAX_EMBEDDING_ROWS} per word"
        )
    if width is not None and total != width:
        raise ConceptMismatch(
            f"{src}: its word vectors are {total} wide, this model's text encoder takes {width} "
            f"(made for another architecture: {concept.arch})"
        )


def check_fit(concept: Concept, facts: ModelFacts) -> None:
    """Raise ConceptMismatch unless the concept fits the model (layers, context width, word vectors)."""
    engine.check_fit(concept, facts.layers)
    check_embedding(concept, facts.embedding_width)


def resolve(
    requests: list[Request],
    lib: Library,
    defaults: Defaults,
    facts: ModelFacts,
    prompts: list[str],
    preferences: Callable[[Entry], dict],
) -> tuple[list[Applied], list[str]]:
    """(applied, warnings): the concepts of `requests` that apply to a batch of `prompts`, each with its gate
    (the tag's values, else the card's preferences, else the defaults); every skipped one has a warning."""
    applied, warnings, seen = [], [], set()
    for req in requests:
        if req.name.lower() in seen:
            warnings.append(f"{req.name} is tagged twice; the first tag is used")
            continue
        seen.add(req.name.lower())
        entry = lib.find(req.name)
        if entry is None:
            known = ", ".join(sorted(lib.entries)[:8]) or "none"
            warnings.append(f"no concept named {req.name!r} in {lib.folders[0]} (known: {known}); skipped")
            continue
        try:
            concept = lib.load(entry)
            check_fit(concept, facts)
        except ConceptError as e:
            warnings.append(f"{e}; skipped")
            continue
        except Exception as e:  # never let one file take the prompt's other concepts (or the image) down
            warnings.append(f"{entry.path}: unusable ({type(e).__name__}: {e}); skipped")
            continue
        if concept.clip_skip != facts.clip_skip and concept.arch in ("sd1", "other"):
            warnings.append(
                f"{entry.name} was trained with CLIP skip {concept.clip_skip}, this generation uses "
                f"{facts.clip_skip}; its gate may open less (set Clip skip to match for best likeness)"
            )
        clash = next(
            (a.entry.name for a in applied if a.activation.concept.token.lower() == concept.token.lower()), None
        )
        if clash is not None:
            warnings.append(f"{entry.name} and {clash} share the word {concept.token!r}; {entry.name} skipped")
            continue
        if not any(whole_word(concept.token).search(text or "") for text in prompts):
            warnings.append(
                f"{entry.name}: its word {concept.token!r} is not in the prompt, so the concept is "
                f"skipped; write e.g. 'a photo of {concept.token}'"
            )
            continue
        user = preferences(entry)
        lock = req.lock or defaults.lock
        if lock == "global" and concept.method != "perfusion":
            warnings.append(f"{entry.name} is an Infusion concept (no keys to lock globally); using lock=local")
            lock = "local"
        activation = engine.Activation(
            concept,
            beta=_first(req.beta, user.get("beta"), defaults.beta),
            tau=_first(req.tau, user.get("tau"), defaults.tau),
            lock=activation_lock(lock),
        )
        applied.append(Applied(entry, activation))
    return applied, warnings


def _first(*values: Optional[float]) -> float:
    return next(float(v) for v in values if v is not None)
