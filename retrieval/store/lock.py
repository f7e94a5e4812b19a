"""One writer per index folder: a POSIX record lock on ``DIR/.lock`` holding the writer's pid,
refused at once (in one line naming the holder) while another process or this one holds it."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from retrieval.errors import StoreError

__all__ = ["release_lock", "take_lock"]

# Folders this process holds the lock of. A POSIX record lock does not exclude its own process,
# and closing any descriptor of the file would release it, so the process keeps its own table.
_HELD: set[Path] = set()
_HELD_GUARD = threading.Lock()


def take_lock(folder: Path) -> int:
    key = folder.resolve()
    with _HELD_GUARD:
        if key in _HELD:
            raise StoreError(f"{folder} is locked by another build (pid {os.getpid()}, this process)")
        _HELD.add(key)
    try:
        return _lock_file(folder)
    except BaseException:
        with _HELD_GUARD:
            _HELD.discard(key)
        raise


def release_lock(folder: Path, fd: int) -> None:
    os.close(fd)  # closing the descriptor releases the record lock
    with _HELD_GUARD:
        _HELD.discard(folder.resolve())


def _lock_file(folder: Path) -> int:
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # A POSIX record lock, not flock: forked decoding workers must not inherit it, or it would
        # outlive a killed build until its workers exit.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StoreError(
            f"{folder} is locked by another build (pid {holder}); wait for it to finish"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
