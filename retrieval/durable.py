"""Durable, atomic file writes: temporary file, fsync, rename, fsync of the folder.

A reader (or a process restarted after a crash) sees either the old file or the new one, never a
partial one. ``RETRIEVAL_CRASH_AT_WRITE=k`` makes the process exit abruptly (``os._exit``) at the
k-th durable write, after the temporary file is written and before it is renamed: the crash tests
use it to stop a build at every write point in turn. ``RETRIEVAL_FAULT=write:k:ENOSPC`` (or
``read:k:EIO``, any errno name) makes the k-th durable write, or the k-th read of a committed store
file, fail with that error instead: the fault-injection tests use it to check that a full disk or a
failing one gives a clean error and leaves the store as it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CRASH_ENV",
    "FAULT_ENV",
    "atomic_write",
    "atomic_write_bytes",
    "before_commit",
    "before_read",
    "file_sha256",
    "fsync_dir",
    "fsync_file",
    "read_count",
    "stat_key",
    "write_count",
]

CRASH_ENV = "RETRIEVAL_CRASH_AT_WRITE"
FAULT_ENV = "RETRIEVAL_FAULT"
TMP_MARKER = ".tmp-"
_writes = 0
_reads = 0
_HASH_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in bounded chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stat_key(path: Path) -> list[int] | None:
    """(size, mtime_ns, ctime_ns, inode) of ``path``, None if it cannot be stat'ed. While equal, the
    file has not been written, replaced or touched (a rename or a copy changes the ctime or inode)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def fsync_file(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file  # a folder is flushed the same way: its entries (renames, new files)


def before_commit() -> None:
    """Count a table commit as a durable write (the crash and fault hooks' write points)."""
    _count_and_maybe_crash()


def write_count() -> int:
    """Durable writes this process has made so far."""
    return _writes


def read_count() -> int:
    """Reads of committed store files this process has made so far."""
    return _reads


def _count_and_maybe_crash() -> None:
    global _writes
    _writes += 1
    target = os.environ.get(CRASH_ENV)
    if target and _writes == int(target):
        os._exit(137)
    _maybe_fail("write", _writes)


def before_read(path: Path) -> None:
    """Count a read of a committed store file (the fault-injection hook's read points)."""
    global _reads
    _reads += 1
    _maybe_fail("read", _reads, path)


def _maybe_fail(kind: str, count: int, path: Path | None = None) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, at, name = spec.split(":")
    if want == kind and count == int(at):
        code = getattr(errno, name)
        raise OSError(code, os.strerror(code), str(path) if path else None)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to fill a temporary sibling of ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        _count_and_maybe_crash()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
