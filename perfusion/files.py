"""Small file helpers shared by the engine."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path


class FileRefused(OSError):
    """A path that is not a regular file (FIFO, device, socket, folder) or is larger than allowed."""


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Never blocks on a FIFO (opened non-blocking,
    checked with fstat before any read) and never reads past `limit` (a device such as /dev/zero behind a
    symlink, or a file that grows while read, is refused)."""
    return _read(path, limit, None)[0]


def read_prefix(path: str | os.PathLike, limit: int, nbytes: int) -> tuple[bytes, int]:
    """(its first `nbytes` bytes, its size) of a regular file of at most `limit` bytes; refused as read_regular
    refuses."""
    return _read(path, limit, nbytes)


def _read(path: str | os.PathLike, limit: int, nbytes: int | None) -> tuple[bytes, int]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"{path} is not a regular file")
        if info.st_size > limit:
            raise FileRefused(f"{path} is {info.st_size:,} bytes, more than the {limit:,}-byte limit")
        chunks, left = [], limit + 1 if nbytes is None else min(nbytes, limit)
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if nbytes is not None:
            return data, info.st_size
        if len(data) > limit:
            raise FileRefused(f"{path} grew past the {limit:,}-byte limit while it was read")
        return data, len(data)
    finally:
        os.close(fd)


def is_regular(path: str | os.PathLike) -> bool:
    """A regular file (after symlinks), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a saved file should read like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def short_hash(data: bytes, length: int = 12) -> str:
    """Leading hex digits of the sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()[:length]
