"""Durable, atomic file writes: temporary file, fsync, rename, fsync of the folder.

A reader (or a process restarted after a crash) sees either the old file or the new one, never a
partial one. ``RETRIEVAL_CRASH_AT_WRITE=k`` makes the process exit abruptly (``os._exit``) at the
k-th durable write, after the temporary file is written and before it is renamed: the crash tests
use it to stop a build at every write point in turn.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["CRASH_ENV", "atomic_write", "atomic_write_bytes", "file_sha256", "fsync_dir", "write_count"]

CRASH_ENV = "RETRIEVAL_CRASH_AT_WRITE"
TMP_MARKER = ".tmp-"
_writes = 0
_HASH_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in bounded chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_count() -> int:
    """Durable writes this process has made so far."""
    return _writes


def _count_and_maybe_crash() -> None:
    global _writes
    _writes += 1
    target = os.environ.get(CRASH_ENV)
    if target and _writes == int(target):
        os._exit(137)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to fill a temporary sibling of ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _count_and_maybe_crash()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
