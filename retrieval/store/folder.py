"""The index folder: one Delta Lake table per collection and a catalog of FAISS indexes.

Layout::

    DIR/catalog.json                     model, FAISS index files (sha256, table version), rebuild
    DIR/images/                          a Delta table: shard-<first id>-v<version>.parquet files
    DIR/images/_delta_log/               its transaction log (the commit point of every row change)
    DIR/images/_retrieval/               the engine's own files: outcomes, build plans
    DIR/faiss/                           the FAISS index files (and re-rank files) the catalog names
    DIR/captions/...                     the same for captions
    DIR/_rebuild/images/, ...            the tables of a --rebuild in progress
    DIR/.lock                            one writer at a time

Data files are immutable and written atomically before the commit that names them; the catalog
is written atomically. A reader pins what it opened: the table versions its FAISS indexes were
built from (or a newer one that changed no row) and the files they name stay on disk until
``vacuum`` removes them, after their retention. Every file is checked before its bytes are
trusted: data files by the size their commit logged, their id range and their Parquet page
checksums; other files by their sha256.

The module is long because ``Store`` is one object with one job (what a reader or writer of the
folder sees, and every check on the way in and out); the table, the lock, the records and the
schema live in modules of their own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
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
from retrieval.store.lock import release_lock, take_lock
from retrieval.store.manifest import (
    COLLECTIONS,
    SCHEMA_VERSION,
    Catalog,
    CollectionState,
    FileRef,
    IndexRecord,
    Manifest,
    Rebuild,
)
from retrieval.store.table import DeltaCollection

__all__ = [
    "CATALOG",
    "LEGACY_MANIFEST",
    "REBUILD",
    "Store",
    "engine_folder",
    "new_manifest",
    "parquet_bytes",
    "removed_file",
    "table_ref",
]

CATALOG = "catalog.json"
LEGACY_MANIFEST = "manifest.json"  # the earlier format's commit point (index migrate reads it)
REBUILD = "_rebuild"
ENGINE = "_retrieval"  # in each table's folder: Delta's own vacuum leaves folders named _* alone


def engine_folder(prefix: str) -> str:
    """Where the engine's own files of the table at ``prefix`` go (relative to the index folder)."""
    return f"{prefix}/{ENGINE}"


class Store:
    """An index folder. ``Store.open(dir)`` to read; ``Store.open(dir, write=True)`` to change it.

    ``committed`` is the newest state (every table's newest version). ``manifest`` is what this
    store works on: for a writer the same, for a reader its published view, pinned when it was
    opened: each collection at the version its FAISS index covers, so that a search beside a build
    never sees rows its index does not hold.
    """

    def __init__(self, folder: Path, manifest: Manifest | None, lock_fd: int | None) -> None:
        self.folder = folder
        self.committed = manifest
        self.manifest = manifest
        self._lock_fd = lock_fd
        self._tables: dict[str, DeltaCollection] = {}  # kept open: see DeltaCollection.newest

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, *, write: bool = False) -> Store:
        """Open ``folder``. Writers take the folder's lock (or fail at once)."""
        folder = Path(folder)
        if (folder / LEGACY_MANIFEST).is_file() and not (folder / CATALOG).is_file():
            raise StoreError(
                f"{folder} is an index folder of the earlier format: run `index migrate {folder}` "
                "to convert it to Delta tables"
            )
        if not write and not (folder / CATALOG).is_file():
            raise StoreError(f"{folder} is not an index folder (no {CATALOG})")
        lock_fd = None
        if write:
            folder.mkdir(parents=True, exist_ok=True)
            lock_fd = take_lock(folder)
        try:
            store = cls(folder, None, lock_fd)
            store._load(pinned=not write)
            if write:
                store._remove_temporaries()
        except BaseException:
            if lock_fd is not None:
                release_lock(folder, lock_fd)
            raise
        return store

    def _load(self, *, pinned: bool) -> None:
        catalog = _read_catalog(self.folder)
        if catalog is None:
            if any(self.table(c).exists for c in COLLECTIONS):
                raise StoreError(f"{self.folder / CATALOG} is missing: the folder's catalog was removed")
            self.committed = self.manifest = None
            return
        newest: dict[str, CollectionState] = {}
        for c in COLLECTIONS:
            state = self._state(self.table(c), catalog.indexes.get(c), pinned=False)
            if state is not None:
                newest[c] = state
        rebuild = None
        if catalog.rebuild is not None:
            model, indexes, token = catalog.rebuild
            states = {
                c: self._state(self.rebuild_table(c), indexes.get(c), pinned=False) for c in COLLECTIONS
            }
            rebuild = Rebuild(model, {c: s for c, s in states.items() if s is not None}, token)
        self.committed = Manifest(
            catalog.schema_version,
            catalog.generation,
            catalog.model,
            newest,
            catalog.engine_version,
            catalog.updated,
            rebuild,
            catalog.retired,
            catalog.retired_versions,
        )
        if not pinned:
            self.manifest = self.committed
            return
        published = {}
        for c in COLLECTIONS:
            state = self._state(self.table(c), catalog.indexes.get(c), pinned=True, newest=newest.get(c))
            if state is not None:
                published[c] = state
        self.manifest = dataclasses.replace(self.committed, collections=published, rebuild=None)

    def _state(
        self,
        table: DeltaCollection,
        index: IndexRecord | None,
        *,
        pinned: bool,
        newest: CollectionState | None = None,
    ) -> CollectionState | None:
        """A collection's state: its newest version, or (``pinned``) the one its index covers."""
        if not table.exists:
            return None
        if pinned:
            if index is None or index.version is None:
                return None  # nothing is searchable before its index is built
            if newest is not None and newest.rows_version == index.rows_version:
                return dataclasses.replace(newest, index=index)
            version: int | None = index.version
        else:
            version = None
        snap = table.snapshot(version)
        state = CollectionState.from_counters(snap.counters, snap.files, snap.version)
        return dataclasses.replace(state, index=index)

    def reload(self) -> None:
        """Read the folder's state again (after a commit made outside ``commit_rows``)."""
        self._load(pinned=self._lock_fd is None)

    def table(self, collection: str) -> DeltaCollection:
        return self._table(collection, collection)

    def rebuild_table(self, collection: str) -> DeltaCollection:
        return self._table(f"{REBUILD}/{collection}", collection)

    def _table(self, prefix: str, collection: str) -> DeltaCollection:
        if prefix not in self._tables:
            self._tables[prefix] = DeltaCollection(self.folder, prefix, collection)
        return self._tables[prefix]

    def viewing(self, manifest: Manifest) -> Store:
        """A reader of this folder that sees ``manifest`` as it is (a build's state in progress)."""
        view = Store(self.folder, manifest, None)
        view.manifest = manifest
        view._tables = self._tables
        return view

    def close(self) -> None:
        if self._lock_fd is not None:
            release_lock(self.folder, self._lock_fd)
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
        """Write ``table`` as Parquet at ``name`` (relative), atomically; return its reference.

        Page checksums are written so that a reader detects damage without a hash of the whole
        file.
        """
        self._require_writer()
        return table_ref(name, table, self.write_bytes(name, parquet_bytes(table), table.num_rows))

    def write_outcomes(self, name: str, outcomes: Sequence[Outcome]) -> FileRef:
        """Write the skipped and failed inputs as JSON lines, sorted by source."""
        ordered = sorted(outcomes, key=lambda o: (o.source, o.stage, o.reason))
        lines = [json.dumps(o.to_dict(), sort_keys=True, ensure_ascii=False) for o in ordered]
        data = ("\n".join(lines) + "\n" if lines else "").encode()
        return self.write_bytes(name, data, len(lines))

    def write_bytes(self, name: str, data: bytes, rows: int) -> FileRef:
        self._require_writer()
        atomic_write_bytes(self.folder / name, data)
        return FileRef(name, hashlib.sha256(data).hexdigest(), rows, len(data))

    def commit_rows(
        self,
        table: DeltaCollection,
        state: CollectionState,
        schema: pa.Schema,
        description: dict[str, Any],
        adds: Sequence[FileRef] = (),
        removes: Sequence[FileRef] = (),
        *,
        rows_changed: bool | None = None,
    ) -> CollectionState:
        """Commit ``state``'s counters with ``adds`` in and ``removes`` out: one table commit.

        ``rows_changed`` (default: whether files come or go) says whether ids or vectors changed:
        a rewrite that only refreshes file stats keeps the FAISS index current."""
        self._require_writer()
        gone = {f.file for f in removes}
        shards = [f for f in state.shards if f.file not in gone]
        shards += list(adds)
        shards.sort(key=lambda f: (f.first if f.first is not None else -1, f.file))
        version = (state.version + 1) if state.version is not None else 0
        if rows_changed is None:
            rows_changed = bool(adds or removes)
        if rows_changed or state.rows_version is None:
            state = dataclasses.replace(state, rows_version=version)
        version_done = table.commit(adds, removes, state.counters(), schema, description)
        if version_done != version:
            raise StoreError(f"{table.path}: committed version {version_done}, expected {version}")
        return dataclasses.replace(state, shards=tuple(shards), version=version)

    def commit_catalog(self, manifest: Manifest) -> Manifest:
        """Write ``manifest``'s catalog (model, FAISS indexes, rebuild): one atomic write."""
        self._require_writer()
        now = time.time()
        old = self.committed.catalog() if self.committed else None
        new = manifest.catalog()
        retired = dict(manifest.retired)
        versions = dict(manifest.retired_versions)
        if old is not None:
            retired.update({f: now for f in old.files() - new.files() if f not in retired})
            versions.update({v: now for v in old.versions() - new.versions()})
        committed = dataclasses.replace(
            manifest,
            generation=manifest.generation + 1,
            updated=now,
            retired=retired,
            retired_versions=versions,
        )
        text = committed.catalog().to_json()
        atomic_write(self.folder / CATALOG, lambda tmp: tmp.write_text(text))
        self.manifest = self.committed = committed
        return committed

    def _remove_temporaries(self) -> None:
        """Temporaries of a write that crashed (never a committed file or one a reader may hold)."""
        for path in self.folder.rglob(f".*{TMP_MARKER}*"):
            if path.is_file():
                path.unlink()

    def vacuum(self, retain_hours: float = 24.0) -> list[str]:
        """Delete the files no reader within ``retain_hours`` can need; the relative paths deleted.

        Kept: every file of a table version younger than that, of the versions the FAISS indexes
        cover and of those they covered until less than that ago (readers pinned them); the
        engine's own files those versions name; FAISS files the catalog names or retired less than
        that ago. Files no commit names (an interrupted build's) go once
        older than the retention.
        """
        self._require_writer()
        manifest = self.committed
        if manifest is None:
            return []
        cutoff = time.time() - retain_hours * 3600
        removed: list[str] = []
        recent = {k for k, since in manifest.retired_versions.items() if since >= cutoff}
        for name, state in manifest.collections.items():
            table = self.table(name)
            keep = (
                [state.index.version] if state.index is not None and state.index.version is not None else []
            )
            keep += [int(k.rsplit("@", 1)[1]) for k in recent if k.rsplit("@", 1)[0] == name]
            removed += table.vacuum(retain_hours, keep)
            needed = table.engine_files(cutoff, keep)
            folder = self.folder / engine_folder(table.prefix)
            for path in sorted(folder.glob("*")) if folder.is_dir() else []:
                if not path.is_file():
                    continue  # the staging folder: its files go when their collection's build ends
                relative = str(path.relative_to(self.folder))
                if relative not in needed and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(relative)
        named = manifest.catalog().files()
        retired = dict(manifest.retired)
        for path in sorted((self.folder / "faiss").glob("*.faiss")):
            relative = str(path.relative_to(self.folder))
            since = retired.get(relative, path.stat().st_mtime)
            if relative not in named and since < cutoff:
                path.unlink()
                removed.append(relative)
                retired.pop(relative, None)
        versions = {k: v for k, v in manifest.retired_versions.items() if k in recent}
        if retired != manifest.retired or versions != manifest.retired_versions:
            self.commit_catalog(dataclasses.replace(manifest, retired=retired, retired_versions=versions))
        return removed

    def discard_rebuild(self) -> None:
        """Remove the tables of a rebuild that is promoted or abandoned (readers never use them)."""
        shutil.rmtree(self.folder / REBUILD, ignore_errors=True)
        for prefix in [p for p in self._tables if p.startswith(f"{REBUILD}/")]:
            del self._tables[prefix]

    # -- reading ---------------------------------------------------------------------------------

    def file_ref(self, name: str, rows: int) -> FileRef:
        """A reference to a file already written in the folder (hashed as a stream)."""
        path = self.folder / name
        return FileRef(name, file_sha256(path), rows, path.stat().st_size)

    def verify(self, ref: FileRef) -> None:
        """Refuse a file whose bytes fail their check: the recorded sha256, or for data files the
        logged size and every page checksum (the file is parsed whole)."""
        if not ref.sha256:
            self.read_table(ref)
            return
        path = self.folder / ref.file
        try:
            before_read(path)
            digest = file_sha256(path)
        except OSError as e:
            raise StoreError(f"{path}: missing or unreadable ({e.strerror or e})") from e
        if digest != ref.sha256:
            raise StoreError(f"{path} does not match its sha256 (truncated or altered)")

    def read_file(self, ref: FileRef) -> bytes:
        """The bytes of ``ref``, refused unless they hash (or measure) to what was recorded."""
        path = self.folder / ref.file
        try:
            before_read(path)
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"{path}: missing or unreadable ({e.strerror or e})") from e
        if len(data) != ref.bytes:
            raise StoreError(
                f"{path} has {len(data)} bytes, its commit logged {ref.bytes} (truncated or altered)"
            )
        if ref.sha256 and hashlib.sha256(data).hexdigest() != ref.sha256:
            raise StoreError(f"{path} does not match its sha256 (truncated or altered)")
        return data

    def read_table(self, ref: FileRef, columns: Sequence[str] | None = None) -> pa.Table:
        """A Parquet file of the store, checked before it is trusted, its rows counted."""
        return self.parse_table(ref, self.read_file(ref), columns)

    def parse_table(self, ref: FileRef, data: bytes, columns: Sequence[str] | None = None) -> pa.Table:
        """``data``, the size-checked bytes of ``ref``, as a table of the recorded rows and ids.

        Every page's checksum is verified as it is read; ``embedding`` comes back as
        ``fixed_size_list<float32>[D]`` (the files store it as a list, which every Delta reader
        takes), refused unless each row holds exactly D values.
        """
        path = self.folder / ref.file
        wanted = list(columns) if columns else None
        if wanted is not None and ref.first is not None and "id" not in wanted:
            wanted = ["id", *wanted]
        try:
            table = pq.read_table(pa.BufferReader(data), columns=wanted, page_checksum_verification=True)
        except Exception as e:
            raise StoreError(f"{path}: damaged or unreadable Parquet ({_first_line(e)})") from e
        if table.num_rows != ref.rows:
            raise StoreError(f"{path} has {table.num_rows} rows, its commit logged {ref.rows}")
        if ref.first is not None and table.num_rows and "id" in table.column_names:
            ids = table.column("id").to_numpy()
            if int(ids.min()) != ref.first or int(ids.max()) != ref.last:
                raise StoreError(
                    f"{path} holds ids {int(ids.min())}-{int(ids.max())}, its commit logged "
                    f"{ref.first}-{ref.last} (truncated or altered)"
                )
        if "embedding" in table.column_names:
            table = _fixed_embedding(table, self._dim(), path)
        if columns:
            table = table.select(list(columns))
        return table

    def _dim(self) -> int | None:
        fingerprint = self.manifest.model.get("fingerprint") if self.manifest else None
        return int(fingerprint["dim"]) if isinstance(fingerprint, dict) and "dim" in fingerprint else None

    def live_rows(self, collection: str, columns: Sequence[str]) -> Iterator[tuple[FileRef, pa.Table]]:
        """Each data file's rows, ``columns`` only, with ``_row``: the row's place in its file."""
        for ref, table in self.iter_shards(collection, columns):
            positions = pa.array(np.arange(table.num_rows, dtype=np.int64))
            yield ref, table.append_column("_row", positions)

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
        """Each live data file of ``collection`` (checked as it is read)."""
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
                "rows": state.rows,
                "table_version": state.version,
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


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the store writes every Parquet file: zstd, statistics, page checksums.

    No statistics for the embedding column: nothing filters on a vector's smallest element, and
    computing them took most of writing a data file (2,000 image rows: 118 ms with them, 46 without).
    """
    buffer = io.BytesIO()
    stats = [name for name in table.column_names if name != "embedding"]
    pq.write_table(table, buffer, compression="zstd", write_statistics=stats, write_page_checksum=True)
    return buffer.getvalue()


def table_ref(name: str, table: pa.Table, ref: FileRef) -> FileRef:
    """``ref`` of a written ``table``, with the id range it holds (data files log it)."""
    if "id" in table.column_names and table.num_rows:
        ids = table.column("id").to_numpy()
        ref = dataclasses.replace(ref, first=int(ids.min()), last=int(ids.max()))
    return ref


def new_manifest(model: dict[str, Any]) -> Manifest:
    return Manifest(SCHEMA_VERSION, 0, model, {})


def removed_file(folder: Path, path: Path, digest: str) -> FileRef | None:
    """A data file on disk as a reference to read it by (its rows and size as they are now), if
    its metadata names the model ``digest``; None for another model's or an unreadable file."""
    try:
        meta = pq.read_metadata(path)
        fingerprint = json.loads((meta.metadata or {}).get(b"retrieval.fingerprint", b"{}"))
        size = path.stat().st_size
    except (OSError, ValueError, pa.ArrowException):
        return None
    if not isinstance(fingerprint, dict) or fingerprint.get("digest") != digest:
        return None
    return FileRef(str(path.relative_to(folder)), "", meta.num_rows, size)


def _fixed_embedding(table: pa.Table, dim: int | None, path: Path) -> pa.Table:
    column = table.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        return table
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        raise StoreError(f"{path}: embedding is {column.type}, not a list of float32")
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    width = dim if dim is not None else (int(lengths[0]) if len(lengths) else 0)
    if column.null_count or (len(lengths) and not (lengths == width).all()):
        raise StoreError(f"{path}: embeddings are not all {width} wide")
    values = column.flatten()
    if not pa.types.is_float32(values.type):
        raise StoreError(f"{path}: embedding values are {values.type}, not float32")
    fixed = pa.FixedSizeListArray.from_arrays(values, width)
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", fixed)


def _read_catalog(folder: Path) -> Catalog | None:
    path = folder / CATALOG
    if not path.is_file():
        return None
    try:
        before_read(path)
        return Catalog.from_json(path.read_text())
    except StoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is unreadable or damaged: {e}") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
