"""The concepts folder: which concept files exist, their hashes, and loading them once.

A concept is `<folder>/**/NAME.safetensors` (the file stem is the tag's NAME); training checkpoints
(`*.resume.safetensors`) and covariance caches are not concepts. Files are read only when asked for
and cached by (size, mtime), so a retrained concept is picked up without a restart: cards and listings
read headers only (`peek`) and show a hash only once it is known; a generation loads the whole file and
hashes it (once, cached by the host as Lora hashes are).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..concept import MAX_FILE_BYTES, Concept, ConceptError, is_concept_file, load_concept, peek_concept
from ..files import is_regular, read_regular

MAX_LOADED = 64  # concepts kept loaded (a prompt uses a few)
MAX_PEEKED = 4096  # header-only concepts kept (no tensor data: a few KB each), enough for every card of a big folder
MAX_SCANNED = 20_000  # files looked at per refresh: a concepts folder set to "/" must not walk the whole disk


@dataclass
class Entry:
    """One concept file on disk."""

    name: str
    path: Path
    stamp: tuple[int, int]  # (size, mtime_ns)
    # the host's sha256 (cached across restarts, as for Lora and embeddings): hasher(path, name, compute); with
    # compute False it answers from its cache only ("" when the file was never hashed)
    hasher: Optional[Callable[[Path, str, bool], str]] = field(default=None, repr=False)
    _hash: Optional[str] = field(default=None, repr=False)

    @property
    def known_sha256(self) -> str:
        """The file's sha256 when it is known without reading the file (hashed before, here or in the host's
        cache), else "" (what cards show: hashing a thousand files would delay the page)."""
        if self._hash is None and self.hasher is not None:
            try:
                self._hash = self.hasher(self.path, self.name, False) or None
            except OSError:
                pass
        return self._hash or ""

    @property
    def sha256(self) -> str:
        """The file's sha256, computed when not known: the host's (cached across restarts) when it has one."""
        if self._hash is None:
            self._hash = ""
            try:
                if self.hasher is not None and is_regular(self.path):
                    self._hash = self.hasher(self.path, self.name, True) or ""
                if not self._hash:
                    self._hash = hashlib.sha256(read_regular(self.path, MAX_FILE_BYTES)).hexdigest()
            except OSError:  # gone, replaced by a special file, or too large: no hash matches it
                self._hash = ""
        return self._hash

    @property
    def shorthash(self) -> str:
        """First 12 hex digits of the file's sha256 (as the WebUI shows for Lora and embeddings)."""
        return self.sha256[:12]


def _folder_stamp(folder: Path) -> Optional[int]:
    """A folder's mtime (ns), None when it is not there."""
    try:
        return folder.stat().st_mtime_ns
    except (OSError, ValueError):
        return None


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class Library:
    """Concept files under `folders` (searched recursively, first folder wins on a name clash)."""

    def __init__(self, folders: list[Path], hasher: Optional[Callable[[Path, str, bool], str]] = None):
        self.folders = [Path(f) for f in folders]
        self.hasher = hasher
        self.entries: dict[str, Entry] = {}
        self.clashes: list[str] = []
        self._loaded: OrderedDict[Path, tuple[tuple[int, int], Concept]] = OrderedDict()  # least recent first
        self._peeked: OrderedDict[Path, tuple[tuple[int, int], Concept]] = OrderedDict()
        self._cache_lock = threading.Lock()  # the API's routes read concepts on other threads than generations
        self._folder_stamps: dict[str, Optional[int]] = {}  # every folder walked: its mtime at the last scan
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders (hashes of unchanged files are kept). The new listing replaces the old one whole at
        the end: a generation that looks a concept up during a rescan (the API's refresh runs on another thread)
        sees the old listing or the new one, never a half-built one."""
        old = {e.path: e for e in self.entries.values()}
        entries: dict[str, Entry] = {}
        clashes: list[str] = []
        folder_stamps: dict[str, Optional[int]] = {}
        for folder in self.folders:
            folder_stamps[str(folder)] = _folder_stamp(folder)
            if not folder.is_dir():
                continue
            seen, scanned = set(), 0  # real paths of the folders walked: a symlink loop is walked once
            for root, dirs, files in os.walk(folder, followlinks=True):
                scanned += len(files)
                if scanned > MAX_SCANNED:
                    clashes.append(
                        f"stopped looking for concepts after {MAX_SCANNED:,} files under {folder}: "
                        "is the concepts folder (Settings > Perfusion) the right one?"
                    )
                    break
                real = os.path.realpath(root)
                if real in seen:
                    dirs[:] = []
                    continue
                seen.add(real)
                folder_stamps[root] = _folder_stamp(Path(root))
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in sorted(files):
                    if not is_concept_file(file):
                        continue
                    path = Path(root) / file
                    if not is_regular(path):  # a FIFO or device would hang whoever reads it
                        clashes.append(f"{path} is not a regular file; skipped")
                        continue
                    try:
                        stamp = _stamp(path)
                    except OSError:
                        continue
                    name = file[: -len(".safetensors")]
                    if name in entries:
                        clashes.append(
                            f"{path} has the same name as {entries[name].path}; rename one of them to use it"
                        )
                        continue
                    keep = old.get(path)
                    entries[name] = (
                        keep if keep is not None and keep.stamp == stamp else Entry(name, path, stamp, self.hasher)
                    )
        self.entries, self.clashes, self._folder_stamps = entries, clashes, folder_stamps

    def find(self, name: str) -> Optional[Entry]:
        """The entry named `name` (exact, then case-insensitive); rescans once if it is unknown and a folder
        changed since the last scan (a file added or renamed changes its folder's mtime; an unknown tag in
        every generation then costs one stat per folder, not a walk of them all)."""
        for attempt in range(2):
            if name in self.entries:
                return self.entries[name]
            folded = [e for n, e in self.entries.items() if n.lower() == name.lower()]
            if len(folded) == 1:
                return folded[0]
            if attempt == 0:
                if not self._folders_changed():
                    return None
                self.refresh()
        return None

    def refresh_if_changed(self) -> None:
        """Rescan if a folder changed since the last scan (a concept trained or copied in): one stat per folder."""
        if self._folders_changed():
            self.refresh()

    def _folders_changed(self) -> bool:
        return any(_folder_stamp(Path(f)) != stamp for f, stamp in self._folder_stamps.items())

    def by_hash(self, shorthash: str) -> Optional[Entry]:
        """The entry whose sha256 starts with `shorthash` (hashes every file once if needed)."""
        shorthash = shorthash.lower()
        return next((e for e in self.entries.values() if shorthash and e.sha256.startswith(shorthash)), None)

    def load(self, entry: Entry) -> Concept:
        """The concept in `entry`'s file (cached until the file changes); raises ConceptError."""
        return self._read(entry, self._loaded, load_concept, MAX_LOADED)

    def peek(self, entry: Entry) -> Concept:
        """The concept in `entry`'s file from its header alone (tensors on the meta device: shapes, no values;
        concept.peek_concept), cached until the file changes; raises ConceptError. For cards and fit checks."""
        return self._read(entry, self._peeked, peek_concept, MAX_PEEKED)

    def _read(self, entry: Entry, cache: OrderedDict, read: Callable[[Path], Concept], keep: int) -> Concept:
        try:
            stamp = _stamp(entry.path)
        except OSError as e:
            raise ConceptError(f"{entry.path}: cannot read ({e.strerror}); refresh the Perfusion cards") from None
        with self._cache_lock:
            cached = cache.get(entry.path)
            if cached is not None:
                cache.move_to_end(entry.path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        concept = read(entry.path)
        concept.name = entry.name
        if stamp != entry.stamp:
            entry.stamp, entry._hash = stamp, None
        with self._cache_lock:
            cache[entry.path] = (stamp, concept)
            while len(cache) > keep:  # least recently used first out: a big folder is not kept whole
                cache.popitem(last=False)
        return concept
