"""The indexes a service answers from, and their hot swap to a newer version.

Each served folder is a ``LiveIndex``: the ``Snapshot`` requests use now (a ``Retriever`` pinned
to one published version, its FAISS indexes loaded), and ``check()``, which a background task calls
every few seconds. When the folder's catalog has changed, ``check()`` opens the new version aside,
loads everything a search needs, and only then swaps it in, under a lock, in one assignment.
Requests hold a lease on the snapshot they started with: an in-flight request finishes on the old
version, and the old one is closed when its last lease ends. A failed load keeps the old snapshot
and is reported (``error``) until a later version loads.

Models are shared: indexes built with the same model (the same fingerprint) use one ``Encoder``,
loaded once, and released when no snapshot uses it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import StoreError
from retrieval.model.encoder import Encoder
from retrieval.search.filters import matching_ids, needed_columns, parse_where
from retrieval.search.modelref import load_index_encoder
from retrieval.search.retriever import Retriever, Target
from retrieval.store.folder import CATALOG, Store
from retrieval.store.location import ModelPaths
from retrieval.store.manifest import Manifest

__all__ = ["EncoderPool", "LiveIndex", "Snapshot"]

log = logging.getLogger("retrieval.service")
_FILTERS_KEPT = 64  # where-filters kept per snapshot, as id arrays


class EncoderPool:
    """One ``Encoder`` per model fingerprint, shared by every snapshot built with that model."""

    def __init__(self, paths: ModelPaths, device: str) -> None:
        self.paths, self.device = paths, device
        self._encoders: dict[str, tuple[Encoder, int]] = {}
        self._lock = threading.Lock()

    def acquire(self, folder: Path, manifest: Manifest) -> Encoder:
        digest = str(manifest.fingerprint)
        with self._lock:
            if digest in self._encoders:
                encoder, users = self._encoders[digest]
                self._encoders[digest] = (encoder, users + 1)
                return encoder
            # Loading holds the lock: two indexes of one new model load it once.
            encoder = load_index_encoder(folder, manifest, self.paths, device=self.device)
            self._encoders[digest] = (encoder, 1)
            return encoder

    def release(self, encoder: Encoder) -> None:
        with self._lock:
            for digest, (held, users) in list(self._encoders.items()):
                if held is encoder:
                    if users > 1:
                        self._encoders[digest] = (held, users - 1)
                    else:
                        del self._encoders[digest]
                        held.close()
                    return

    def close(self) -> None:
        with self._lock:
            for encoder, _ in self._encoders.values():
                encoder.close()
            self._encoders.clear()


@dataclass(eq=False)
class Snapshot:
    """One published version of an index folder, ready to search."""

    retriever: Retriever
    encoder: Encoder
    loaded_at: float
    load_seconds: float
    _users: int = 0
    _retired: bool = False
    _filters: OrderedDict[tuple[str, tuple[str, ...]], np.ndarray] = field(default_factory=OrderedDict)
    _filters_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def manifest(self) -> Manifest:
        return self.retriever.manifest

    @functools.cached_property
    def collections(self) -> list[Target]:
        """The collections with a FAISS index in this version."""
        return [c for c in ("images", "captions") if self.retriever.store.state(c).index is not None]

    @functools.cached_property
    def version(self) -> dict[str, Any]:
        """What a response names as the version it used: the catalog generation, each table's version."""
        states = self.manifest.collections
        return {
            "generation": self.manifest.generation,
            "tables": {c: states[c].version for c in self.collections},
        }

    def allowed(self, target: Target, where: Sequence[str]) -> np.ndarray:
        """Ids of ``target`` matching every ``where`` expression, kept for the next request."""
        key = (target, tuple(where))
        with self._filters_lock:
            if key in self._filters:
                self._filters.move_to_end(key)
                return self._filters[key]
        parsed = parse_where(list(where))
        files = self.retriever.source(target).scan(needed_columns(target, parsed))
        ids = matching_ids(target, files, parsed, self.retriever.store.state("images").root)
        with self._filters_lock:
            self._filters[key] = ids
            while len(self._filters) > _FILTERS_KEPT:
                self._filters.popitem(last=False)
        return ids


def _open_snapshot(folder: Path, store: Store, encoders: EncoderPool) -> Snapshot:
    """A snapshot of ``store``'s published version with everything a search needs loaded."""
    started = time.perf_counter()
    if store.manifest is None:
        raise StoreError(f"{folder} has no committed state")
    encoder = encoders.acquire(folder, store.manifest)
    try:
        retriever = Retriever(store, encoder=encoder)
        snapshot = Snapshot(retriever, encoder, time.time(), 0.0)
        for collection in snapshot.collections:
            retriever.index(collection)  # reads and checks the FAISS file
            retriever.source(collection)
        snapshot.load_seconds = time.perf_counter() - started
        return snapshot
    except BaseException:
        encoders.release(encoder)
        raise


def _catalog_stamp(folder: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(folder / CATALOG)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class LiveIndex:
    """A served index folder: ``lease()`` the current snapshot; ``check()`` swaps in a newer one."""

    def __init__(self, name: str, folder: Path, encoders: EncoderPool) -> None:
        self.name, self.folder, self.encoders = name, folder, encoders
        self.current: Snapshot | None = None
        self.error: str | None = None  # why the newest version could not be loaded
        self.swaps = 0
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """The first load; errors propagate (a service that cannot load its index does not start)."""
        self._stamp = _catalog_stamp(self.folder)
        store = Store.open(self.folder)
        try:
            self.current = _open_snapshot(self.folder, store, self.encoders)
        except BaseException:
            store.close()
            raise

    def check(self) -> bool:
        """Swap in the folder's newest published version if it changed; whether it swapped.

        Never raises: a version that fails to load is logged and kept in ``error``, the old
        snapshot keeps serving, and the next change of the catalog is tried again.
        """
        stamp = _catalog_stamp(self.folder)
        if stamp == self._stamp or self.current is None:
            return False
        self._stamp = stamp
        try:
            store = Store.open(self.folder)
        except Exception as e:
            return self._failed(e)
        if store.manifest == self.current.manifest:
            store.close()
            return False
        try:
            fresh = _open_snapshot(self.folder, store, self.encoders)
        except Exception as e:
            store.close()
            return self._failed(e)
        with self._lock:
            old, self.current = self.current, fresh
            old._retired = True
            idle = old._users == 0
        self.error = None
        self.swaps += 1
        log.info(
            "%s: now serving generation %s (%s), loaded in %.2f s",
            self.name,
            fresh.manifest.generation,
            fresh.version["tables"],
            fresh.load_seconds,
        )
        if idle:
            self._close(old)
        return True

    def _failed(self, e: Exception) -> bool:
        self.error = f"{type(e).__name__}: {e}"
        log.error(
            "%s: the new version of %s was not loaded, still serving the old one: %s",
            self.name,
            self.folder,
            self.error,
        )
        return False

    @contextlib.contextmanager
    def lease(self) -> Iterator[Snapshot]:
        """The current snapshot, kept open until the block ends, whatever swaps meanwhile."""
        with self._lock:
            snapshot = self.current
            if snapshot is None:
                raise RuntimeError(f"{self.name} is not loaded")
            snapshot._users += 1
        try:
            yield snapshot
        finally:
            with self._lock:
                snapshot._users -= 1
                done = snapshot._retired and snapshot._users == 0
            if done:
                self._close(snapshot)

    def _close(self, snapshot: Snapshot) -> None:
        snapshot.retriever.close()
        self.encoders.release(snapshot.encoder)

    def describe(self) -> dict[str, Any]:
        snapshot = self.current
        out: dict[str, Any] = {"name": self.name, "folder": str(self.folder), "error": self.error}
        if snapshot is None:
            return out | {"loaded": False}
        manifest, store = snapshot.manifest, snapshot.retriever.store
        collections = {}
        for c in snapshot.collections:
            state = store.state(c)
            record = state.index
            if record is None:  # never: a snapshot's collections are those with an index
                continue
            collections[c] = {
                "rows": snapshot.retriever.size(c),
                "table_version": state.version,
                "kind": record.kind,
                "param": record.param,
                "value": record.value,
                "recall_at_10": record.recall_at_10,
                "queries": record.queries,
            }
        return out | {
            "loaded": True,
            "version": snapshot.version,
            "fingerprint": manifest.fingerprint,
            "loaded_at": snapshot.loaded_at,
            "load_seconds": round(snapshot.load_seconds, 3),
            "swaps": self.swaps,
            "collections": collections,
        }

    def close(self) -> None:
        with self._lock:
            snapshot, self.current = self.current, None
        if snapshot is not None:
            snapshot._retired = True
            if snapshot._users == 0:
                self._close(snapshot)
