"""The index folder: Parquet shards per collection, committed by one manifest.

Layout::

    DIR/manifest.json                 the commit point: lists every file with sha256 and rows
    DIR/images/shard-<first id>.parquet
    DIR/images/deleted-g<gen>.parquet ids removed from search (files deleted or changed)
    DIR/images/outcomes-g<gen>.jsonl  inputs skipped or failed, with the reason
    DIR/captions/...                  the same for captions
    DIR/.lock                         one writer at a time

Shards are immutable. Every file is written atomically and the manifest last, so a crash leaves
the previous commit or the new one. Files the manifest does not name (left by a crash) are removed
when the next writer opens the folder. Every file's sha256 is checked before it is parsed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval import __version__
from retrieval.durable import TMP_MARKER, atomic_write, atomic_write_bytes, before_read, file_sha256
from retrieval.errors import IndexMismatchError, StoreError
from retrieval.outcomes import Outcome

__all__ = ["COLLECTIONS", "SCHEMA_VERSION", "CollectionState", "FileRef", "Manifest", "Store"]

SCHEMA_VERSION = 1
COLLECTIONS = ("images", "captions")
MANIFEST = "manifest.json"
# The only names a store writes in a collection folder: anything else there is not ours to delete.
_OWN_FILE = re.compile(
    r"(shard-\d+(-r\d+)?\.parquet|deleted-g\d+\.parquet|outcomes-g\d+\.jsonl|index-\w+-g\d+\.faiss)"
)


@dataclass(frozen=True)
class FileRef:
    """A file of the store, relative to its folder, with what it must hash to."""

    file: str
    sha256: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class CollectionState:
    """One collection's committed files and counters."""

    shards: tuple[FileRef, ...] = ()
    next_id: int = 0
    deleted: FileRef | None = None
    outcomes: FileRef | None = None
    root: str | None = None  # images: the folder the paths are relative to
    # Caption files fully indexed: path -> [size, mtime_ns].
    sources: dict[str, list[int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # indexed, skipped, failed
    index: dict[str, Any] | None = None  # the FAISS index record (retrieval.index.IndexRecord)

    def files(self) -> list[FileRef]:
        index = FileRef(**self.index["file"]) if self.index else None
        published = self.published().deleted  # the deletion list the index was built with
        extra = (self.deleted, self.outcomes, index, published if published != self.deleted else None)
        return [*self.shards, *(f for f in extra if f is not None)]

    def published(self) -> CollectionState:
        """What readers see: the rows the FAISS index was built from, and nothing without one.

        A build commits shard by shard, so that a crash costs at most one shard, and rebuilds the
        index last; the rows it committed meanwhile are published with the new index, in the
        same manifest write.
        """
        if not self.index:
            return dataclasses.replace(self, shards=(), deleted=None)
        if "shards" not in self.index:  # recorded before snapshots: the index covered every row
            return self
        deleted = self.index.get("deleted")
        return dataclasses.replace(
            self, shards=self.shards[: self.index["shards"]], deleted=FileRef(**deleted) if deleted else None
        )


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    generation: int
    model: dict[str, Any]  # checkpoint / tower paths and the fingerprint
    collections: dict[str, CollectionState]
    engine_version: str = __version__
    updated: float = 0.0

    def published(self) -> Manifest:
        """The manifest as readers see it (``CollectionState.published`` for each collection)."""
        collections = {name: state.published() for name, state in self.collections.items()}
        return dataclasses.replace(self, collections=collections)

    @property
    def fingerprint(self) -> str | None:
        raw = self.model.get("fingerprint")
        value = raw.get("digest") if isinstance(raw, dict) else None
        return str(value) if value else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"manifest schema version {version} is not supported (this engine reads {SCHEMA_VERSION})"
            )
        collections = {}
        for name, raw in data["collections"].items():
            collections[name] = CollectionState(
                shards=tuple(FileRef(**f) for f in raw["shards"]),
                next_id=int(raw["next_id"]),
                deleted=FileRef(**raw["deleted"]) if raw.get("deleted") else None,
                outcomes=FileRef(**raw["outcomes"]) if raw.get("outcomes") else None,
                root=raw.get("root"),
                sources={k: list(v) for k, v in raw.get("sources", {}).items()},
                index=raw.get("index"),
                counts=dict(raw.get("counts", {})),
            )
        return cls(
            schema_version=version,
            generation=int(data["generation"]),
            model=dict(data["model"]),
            collections=collections,
            engine_version=str(data.get("engine_version", "")),
            updated=float(data.get("updated", 0.0)),
        )


class Store:
    """An index folder. ``Store.open(dir)`` to read; ``Store.open(dir, write=True)`` to change it.

    ``committed`` is the manifest as written. ``manifest`` is what this store works on: for a
    writer the same, for a reader its published view (rows that are in a FAISS index), so a
    search beside a build never sees rows its index does not hold.
    """

    def __init__(self, folder: Path, manifest: Manifest | None, lock_fd: int | None) -> None:
        self.folder = folder
        self.committed = manifest
        self.manifest = manifest if lock_fd is not None or manifest is None else manifest.published()
        self._lock_fd = lock_fd

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, *, write: bool = False) -> Store:
        """Open ``folder``. Writers take the folder's lock (or fail at once) and clean up after crashes."""
        folder = Path(folder)
        if not write and not (folder / MANIFEST).is_file():
            raise StoreError(f"{folder} is not an index folder (no {MANIFEST})")
        lock_fd = None
        if write:
            folder.mkdir(parents=True, exist_ok=True)
            lock_fd = _take_lock(folder)
        try:
            manifest = _read_manifest(folder)
            store = cls(folder, manifest, lock_fd)
            if write:
                store.collect_garbage()
        except BaseException:
            if lock_fd is not None:
                _release_lock(folder, lock_fd)
            raise
        return store

    def close(self) -> None:
        if self._lock_fd is not None:
            _release_lock(self.folder, self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------

    def _require_writer(self) -> None:
        if self._lock_fd is None:
            raise StoreError(f"{self.folder} was opened read-only")

    def write_table(self, name: str, table: pa.Table) -> FileRef:
        """Write ``table`` as Parquet at ``name`` (relative), atomically; return its reference."""
        self._require_writer()
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", write_statistics=True)
        return self._write_bytes(name, buffer.getvalue(), table.num_rows)

    def write_outcomes(self, name: str, outcomes: Sequence[Outcome]) -> FileRef:
        """Write the skipped and failed inputs as JSON lines, sorted by source."""
        ordered = sorted(outcomes, key=lambda o: (o.source, o.stage, o.reason))
        lines = [json.dumps(o.to_dict(), sort_keys=True, ensure_ascii=False) for o in ordered]
        data = ("\n".join(lines) + "\n" if lines else "").encode()
        return self._write_bytes(name, data, len(lines))

    def _write_bytes(self, name: str, data: bytes, rows: int) -> FileRef:
        self._require_writer()
        atomic_write_bytes(self.folder / name, data)
        return FileRef(name, hashlib.sha256(data).hexdigest(), rows, len(data))

    def commit(self, manifest: Manifest) -> Manifest:
        """Make ``manifest`` the folder's state (the last write of every change)."""
        self._require_writer()
        committed = dataclasses.replace(manifest, updated=time.time())
        atomic_write(self.folder / MANIFEST, lambda tmp: tmp.write_text(committed.to_json()))
        self.manifest = self.committed = committed
        return committed

    def collect_garbage(self) -> None:
        """Remove files the manifest does not name: temporaries, files of earlier generations and
        shards of a build that crashed. Writers call it when they open the folder and when done."""
        self._require_writer()
        named = {
            f.file
            for state in (self.manifest.collections.values() if self.manifest else [])
            for f in state.files()
        }
        for name in COLLECTIONS:
            folder = self.folder / name
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                ours = _OWN_FILE.fullmatch(path.name) or TMP_MARKER in path.name
                if ours and f"{name}/{path.name}" not in named and path.is_file():
                    path.unlink()
        for path in self.folder.glob(f".*{TMP_MARKER}*"):
            path.unlink()

    # -- reading ---------------------------------------------------------------------------------

    def file_ref(self, name: str, rows: int) -> FileRef:
        """A reference to a file already written in the folder (hashed as a stream)."""
        path = self.folder / name
        return FileRef(name, file_sha256(path), rows, path.stat().st_size)

    def verify(self, ref: FileRef) -> None:
        """Refuse a file whose bytes no longer hash to the manifest's sha256 (hashed as a stream)."""
        path = self.folder / ref.file
        try:
            before_read(path)
            digest = file_sha256(path)
        except OSError as e:
            raise StoreError(f"{path}: missing or unreadable ({e.strerror or e})") from e
        if digest != ref.sha256:
            raise StoreError(f"{path} does not match its sha256 in the manifest (truncated or altered)")

    def read_file(self, ref: FileRef) -> bytes:
        """The bytes of ``ref``, refused unless they hash to what the manifest recorded."""
        path = self.folder / ref.file
        try:
            before_read(path)
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"{path}: missing or unreadable ({e.strerror or e})") from e
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise StoreError(f"{path} does not match its sha256 in the manifest (truncated or altered)")
        return data

    def read_table(self, ref: FileRef, columns: Sequence[str] | None = None) -> pa.Table:
        data = self.read_file(ref)
        try:
            table = pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)
        except Exception as e:
            raise StoreError(f"{self.folder / ref.file}: unreadable Parquet: {e}") from e
        if table.num_rows != ref.rows:
            raise StoreError(
                f"{self.folder / ref.file} has {table.num_rows} rows, the manifest says {ref.rows}"
            )
        return table

    def deleted_ids(self, collection: str) -> np.ndarray:
        state = self.state(collection)
        if state.deleted is None:
            return np.empty(0, dtype=np.int64)
        return self.read_table(state.deleted, ["id"]).column("id").to_numpy()

    def outcomes(self, collection: str) -> list[Outcome]:
        state = self.state(collection)
        if state.outcomes is None:
            return []
        text = self.read_file(state.outcomes).decode()
        return [Outcome.from_dict(json.loads(line)) for line in text.splitlines() if line]

    def state(self, collection: str) -> CollectionState:
        if self.manifest is None:
            return CollectionState()
        return self.manifest.collections.get(collection, CollectionState())

    def iter_shards(
        self, collection: str, columns: Sequence[str] | None = None
    ) -> Iterator[tuple[FileRef, pa.Table]]:
        """Each committed shard of ``collection`` (hash-checked), with deleted rows still in it."""
        for ref in self.state(collection).shards:
            yield ref, self.read_table(ref, columns)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: model, generation, and per collection counts, files and outcomes."""
        if self.manifest is None:
            raise StoreError(f"{self.folder} has no committed state")
        collections = {}
        for name, state in self.manifest.collections.items():
            outcomes = self.outcomes(name)
            collections[name] = {
                **{k: state.counts.get(k, 0) for k in ("indexed", "skipped", "failed")},
                "shards": len(state.shards),
                "rows": sum(f.rows for f in state.shards),
                "deleted": state.deleted.rows if state.deleted else 0,
                "next_id": state.next_id,
                "root": state.root,
                "index": state.index,
                **_searchable(state),
                "failures": [
                    {"source": o.source, "stage": o.stage, "reason": o.reason}
                    for o in outcomes
                    if o.status == "failed"
                ],
                "skipped_inputs": [
                    {"source": o.source, "stage": o.stage, "reason": o.reason}
                    for o in outcomes
                    if o.status == "skipped"
                ],
            }
        return {
            "folder": str(self.folder),
            "schema_version": self.manifest.schema_version,
            "generation": self.manifest.generation,
            "engine_version": self.manifest.engine_version,
            "updated": self.manifest.updated,
            "model": self.manifest.model,
            "collections": collections,
        }

    def check_model(self, fingerprint: str) -> None:
        if self.manifest is not None and self.manifest.fingerprint not in (None, fingerprint):
            raise IndexMismatchError(
                f"{self.folder} was built with another model (fingerprint {self.manifest.fingerprint[:12]}, "
                f"this one is {fingerprint[:12]}); use the same checkpoint and towers, or --rebuild"
            )


def index_source(state: CollectionState) -> str:
    """Which rows an index covers: its shards (by first id and rows) and the deletion file.

    A shard rewritten only to refresh file stats (the indexer's ``_restat``) keeps its ids and vectors, so it
    keeps its place in this key and the index is not rebuilt for it.
    """
    names = [f"{shard_stem(f.file)}:{f.rows}" for f in state.shards]
    names.append(state.deleted.sha256 if state.deleted else "")
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def shard_stem(name: str) -> str:
    """``images/shard-000000000004`` for that shard and for each rewrite of it (``-r<gen>``)."""
    return name.removesuffix(".parquet").split("-r")[0]


def _searchable(state: CollectionState) -> dict[str, Any]:
    """How much of a collection search sees: its index's rows, and whether rows await one."""
    index = state.index
    searchable = int(index["rows"]) if index else 0
    behind = state.counts.get("indexed", 0) > 0 and (
        index is None or index.get("source") != index_source(state)
    )
    return {"searchable": searchable, "awaiting_index": behind}


def _read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        before_read(path)
        return Manifest.from_json(path.read_text())
    except StoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is unreadable or damaged: {e}") from e


# Folders this process holds the lock of. A POSIX record lock does not exclude its own process,
# and closing any descriptor of the file would release it, so the process keeps its own table.
_HELD: set[Path] = set()
_HELD_GUARD = threading.Lock()


def _take_lock(folder: Path) -> int:
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


def _release_lock(folder: Path, fd: int) -> None:
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
