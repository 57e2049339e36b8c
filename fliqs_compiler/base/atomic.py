"""Atomic file writes: everything fliqs writes goes through a temporary file in the destination's
folder and ``os.replace``, so a reader (or a run killed at any instant) sees either the old file
or the complete new one, never half of one. The one place this logic lives."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["replacing", "write_bytes", "write_text"]


@contextlib.contextmanager
def replacing(path, suffix: str = ".tmp", fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block finishes without error the file
    written there replaces ``path`` (mode 0644); on any error it is removed and ``path`` is left
    as it was. ``suffix`` matters to writers that pick the format from the name (``.so``).
    ``fsync``: flush the data to disk before the rename (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with replacing(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text(path, text: str, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)
