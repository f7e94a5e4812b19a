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
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.durable import TMP_MARKER, atomic_write, atomic_write_bytes, before_read, file_sha256
from retrieval.errors import IndexMismatchError, StoreError
from retrieval.outcomes import Outcome
from retrieval.store.manifest import COLLECTIONS, CollectionState, FileRef, Manifest

__all__ = ["MANIFEST", "Store"]

MANIFEST = "manifest.json"
# The only names a store writes in a collection folder: anything else there is not ours to delete.
_OWN_FILE = re.compile(
    r"(shard-\d+(-g\d+)?(-r\d+)?\.parquet|(deleted|plan)-g\d+\.parquet|outcomes-g\d+\.jsonl|index-\w+-g\d+\.faiss)"
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

    def viewing(self, manifest: Manifest) -> Store:
        """A reader of this folder that sees ``manifest`` as it is (a build's state in progress)."""
        view = Store(self.folder, manifest, None)
        view.manifest = manifest
        return view

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
        named = {f.file for f in self.manifest.files()} if self.manifest else set()
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
        """A Parquet file of the store, hash-checked before it is parsed, its rows counted."""
        return self.parse_table(ref, self.read_file(ref), columns)

    def parse_table(self, ref: FileRef, data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
        """``data``, the checked bytes of ``ref``, as a table of the recorded number of rows."""
        try:
            table = pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)
        except Exception as e:
            raise StoreError(f"{self.folder / ref.file}: unreadable Parquet: {e}") from e
        if table.num_rows != ref.rows:
            raise StoreError(
                f"{self.folder / ref.file} has {table.num_rows} rows, the manifest says {ref.rows}"
            )
        return table

    def live_rows(self, collection: str, columns: Sequence[str]) -> Iterator[tuple[FileRef, pa.Table]]:
        """Each shard's rows still in search (deleted ones dropped), ``columns`` only.

        The one place deletions are applied; every reader of rows goes through it. Each table
        also has ``_row``, the row's position in its shard (to find its vector again).
        """
        deleted = self.deleted_ids(collection)
        wanted = ["id", *(c for c in columns if c != "id")]
        for ref, table in self.iter_shards(collection, wanted):
            positions = np.arange(table.num_rows, dtype=np.int64)
            keep = pa.array(~np.isin(table.column("id").to_numpy(), deleted))
            live = table.append_column("_row", pa.array(positions)).filter(keep)
            yield ref, live.select([*columns, "_row"])

    def deleted_ids(self, collection: str) -> np.ndarray:
        return self.read_ids(self.state(collection).deleted)

    def read_ids(self, ref: FileRef | None) -> np.ndarray:
        """The ``id`` column of a file (a deletion list), (n,) int64; empty for None."""
        if ref is None:
            return np.empty(0, dtype=np.int64)
        return self.read_table(ref, ["id"]).column("id").to_numpy()

    def outcomes(self, collection: str) -> list[Outcome]:
        return self.outcomes_of(self.state(collection))

    def outcomes_of(self, state: CollectionState) -> list[Outcome]:
        """The skipped and failed inputs a collection state records."""
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
        """A JSON-ready summary: model, generation, and per collection counts, files and outcomes.

        Counts are what is committed; ``searchable`` is how many rows its FAISS index covers, and
        ``awaiting_index`` whether committed rows wait for the next build to publish them.
        """
        committed = self.committed
        if committed is None:
            raise StoreError(f"{self.folder} has no committed state")
        collections = {}
        for name, state in committed.collections.items():
            outcomes = self.outcomes_of(state)
            collections[name] = {
                **{k: state.counts.get(k, 0) for k in ("indexed", "skipped", "failed")},
                "shards": len(state.shards),
                "rows": sum(f.rows for f in state.shards),
                "deleted": state.deleted.rows if state.deleted else 0,
                "next_id": state.next_id,
                "root": state.root,
                "index": state.index.to_dict() if state.index else None,
                "searchable": state.index.rows if state.index else 0,
                "awaiting_index": state.awaiting_index,
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
            "schema_version": committed.schema_version,
            "generation": committed.generation,
            "engine_version": committed.engine_version,
            "updated": committed.updated,
            "model": committed.model,
            "rebuilding": committed.rebuild is not None,
            "collections": collections,
        }

    def check_model(self, fingerprint: str) -> None:
        if self.manifest is not None and self.manifest.fingerprint not in (None, fingerprint):
            raise IndexMismatchError(
                f"{self.folder} was built with another model (fingerprint {self.manifest.fingerprint[:12]}, "
                f"this one is {fingerprint[:12]}); use the same checkpoint and towers, or --rebuild"
            )


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
