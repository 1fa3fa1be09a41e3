"""The extension's process-wide state, in one place: the concepts library, the hooks on the loaded U-Net,
what the current batch applies and the word embeddings registered for it. Everything else is functions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .. import hooks as engine
from ..regional import RegionalComposition
from . import host
from .library import Entry, Library


@dataclass
class Applied:
    """One concept as applied to a batch."""

    entry: Entry
    activation: engine.Activation

    def describe(self) -> str:
        beta, tau = self.activation.gate
        return f"{self.entry.name} tau={tau:g} beta={beta:g} lock={self.activation.lock}"


@dataclass
class Runtime:
    """The extension's live state: the library, which U-Net carries hooks, what is on."""

    library: Optional[Library] = None
    hooks: Optional[engine.Hooks] = None
    applied: list[Applied] = field(default_factory=list)
    key_contexts: Optional[engine.KeyContexts] = None
    regional: Optional[RegionalComposition] = None  # several concepts composed region by region (composition.py)
    registered: list[tuple[Any, str, Any]] = field(default_factory=list)  # (db, word, embedding it replaced)
    words: tuple = ()  # (name, token, file stamp) of the embeddings the last conditioning was made with
    layers: Optional[tuple[Any, dict]] = None  # (U-Net, its cross-attention layers) for checks without hooks
    width: Optional[tuple[Any, Optional[int]]] = None  # (model, the width its text encoder's word vectors take)


runtime = Runtime()


def library() -> Library:
    """The library of the concepts folder the settings name now (a new one when the setting changed)."""
    folder = host.concepts_folder()
    if runtime.library is None or runtime.library.folders != [folder]:
        runtime.library = Library([folder], host.file_sha256)
    return runtime.library
