"""``index verify``: check that an index folder is exactly what its tables and catalog committed.

What is checked, collection by collection, at each table's newest version:

- the catalog parses and has this engine's schema version; the Delta log replays;
- every live data file exists with the size its commit logged, the sha256 its commit recorded
  (while the log holds that commit), its page checksums, row count and logged id range; outcome
  lists and FAISS files hash to their recorded sha256;
- each data file's Parquet metadata names this schema, this collection and the catalog's model
  fingerprint, whose digest is recomputed from its fields; so does the table's description;
- ids are unique across files and below the collection's ``next_id``;
- vectors have the model's dimension and are finite and unit-norm;
- the ``indexed`` count equals the live rows, and the FAISS index holds exactly the ids of the
  table version it was built from (what readers see), with the model's dimension and the
  inner-product metric.

Notes, not problems: files no longer in the newest version (kept for pinned readers until
``index vacuum``) or never committed (an interrupted build's), temporaries, and rows an
interrupted build committed before it could rebuild the index, which readers do not see until the
next build publishes them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from retrieval.ann.faiss_index import index_ids
from retrieval.ann.rerank import Rerank
from retrieval.durable import TMP_MARKER
from retrieval.errors import StoreError
from retrieval.model.fingerprint import ModelFingerprint
from retrieval.outcomes import Outcome
from retrieval.store.folder import Store
from retrieval.store.manifest import COLLECTIONS, SCHEMA_VERSION, CollectionState, FileRef, IndexRecord
from retrieval.vectors import embedding_matrix, unit_norm

__all__ = ["CollectionCheck", "VerifyReport", "verify_index"]


@dataclass
class CollectionCheck:
    """What was checked in one collection."""

    files: int = 0
    rows: int = 0
    live: int = 0
    index: str | None = None  # the FAISS index's kind, when there is one


@dataclass
class VerifyReport:
    """The outcome of ``verify_index``: ``ok`` only when ``problems`` is empty."""

    folder: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    collections: dict[str, CollectionCheck] = field(default_factory=dict)
    generation: int | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "ok": self.ok,
            "generation": self.generation,
            "problems": self.problems,
            "notes": self.notes,
            "collections": {name: vars(check) for name, check in self.collections.items()},
            "seconds": self.seconds,
        }


def verify_index(folder: str | Path) -> VerifyReport:
    """Check every promise of the index folder ``folder``; list each one that does not hold.

    Reads without the writer's lock, so it can run beside searches. Raises nothing for a damaged
    folder: damage is what the report is for.
    """
    started = time.perf_counter()
    report = VerifyReport(str(folder))
    _verify(Path(folder), report)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _verify(folder: Path, report: VerifyReport) -> None:
    try:
        store = Store.open(folder)
    except StoreError as e:
        report.problems.append(str(e))
        return
    with store:
        manifest = store.committed
        if manifest is None:  # only a writer opens a folder without a catalog
            report.problems.append(f"{folder} has no catalog")
            return
        report.generation = manifest.generation
        fingerprint, dim = _check_fingerprint(manifest.model, report)
        for name, state in sorted(manifest.collections.items()):
            if name not in COLLECTIONS:
                report.problems.append(f"catalog: unknown collection {name!r}")
                continue
            report.collections[name] = _check_collection(store, name, state, fingerprint, dim, report)
        _note_leftovers(store, report)


def _check_fingerprint(model: dict[str, Any], report: VerifyReport) -> tuple[str | None, int]:
    """The fingerprint's recomputed digest and the embedding width (None, 0 when unreadable)."""
    raw = model.get("fingerprint")
    if not isinstance(raw, dict):
        report.problems.append("catalog: no model fingerprint")
        return None, 0
    try:
        fingerprint = ModelFingerprint.from_dict(raw)
        dim = int(fingerprint.dim)
    except (TypeError, KeyError, ValueError) as e:
        report.problems.append(f"catalog: unreadable model fingerprint ({e})")
        return None, 0
    if fingerprint.digest != raw.get("digest"):
        report.problems.append("catalog: the model fingerprint's digest does not match its fields")
    return fingerprint.digest, dim


def _check_collection(
    store: Store, name: str, state: CollectionState, fingerprint: str | None, dim: int, report: VerifyReport
) -> CollectionCheck:
    check = CollectionCheck()
    problems = report.problems
    table = store.table(name)
    try:
        recorded = table.recorded_sha256(state.version or 0)
        description = table.description()
    except StoreError as e:
        problems.append(str(e).replace(f"{store.folder}/", ""))
        recorded, description = {}, {}
    if fingerprint is not None and description.get("fingerprint") != fingerprint:
        problems.append(f"{name}: the table's description names another model than the catalog")
    shard_ids: dict[str, np.ndarray] = {}
    complete = True  # every data file was readable: the id sets can be compared
    for ref in state.shards:
        check.files += 1
        data = _read_file(store, ref, report)
        if data is not None and recorded.get(ref.file) not in (None, hashlib.sha256(data).hexdigest()):
            problems.append(f"{ref.file}: does not match its sha256 recorded at commit (altered)")
            data = None
        rows = _parse(store, ref, data, report) if data is not None else None
        if rows is None:
            complete = False
            continue
        if missing := {"id", "embedding"} - set(rows.column_names):
            problems.append(f"{ref.file}: no {' or '.join(sorted(missing))} column")
            complete = False
            continue
        _check_shard_metadata(rows, ref, name, fingerprint, problems)
        ids = shard_ids[ref.file] = rows.column("id").to_numpy()
        check.rows += len(ids)
        if len(ids) and int(ids.max()) >= state.next_id:
            problems.append(f"{ref.file}: id {int(ids.max())} is not below next_id {state.next_id}")
        _check_vectors(rows, ref, dim, problems)
    every = np.concatenate(list(shard_ids.values())) if shard_ids else np.empty(0, dtype=np.int64)
    live = np.unique(every)
    if len(live) != len(every):
        problems.append(f"{name}: {len(every) - len(live)} ids appear in more than one row")
    check.live = len(live)
    if complete:
        counted = state.counts.get("indexed", 0)
        if counted != check.live:
            problems.append(
                f"{name}: the table's commit counts {counted} indexed, its files hold {check.live} rows"
            )
    if state.outcomes is not None:
        check.files += 1
        _check_outcomes(store, state.outcomes, report)
    if state.index is None:
        return check
    check.files += 1
    searchable: np.ndarray | None = live if complete else None
    if not state.index_current and state.index.version is not None:
        searchable = _ids_at(store, name, state.index.version, report)
        if searchable is not None:
            added, removed = len(np.setdiff1d(live, searchable)), len(np.setdiff1d(searchable, live))
            report.notes.append(
                f"{name}: {added} rows added and {removed} deleted are committed but not yet searchable "
                "(an interrupted build's; the next build publishes them with the index)"
            )
    check.index = _check_index(store, name, state.index, searchable, dim, report)
    return check


def _ids_at(store: Store, name: str, version: int, report: VerifyReport) -> np.ndarray | None:
    """The ids of ``name``'s table at ``version`` (what readers of its index see)."""
    try:
        snapshot = store.table(name).snapshot(version)
        ids = [store.read_table(ref, ["id"]).column("id").to_numpy() for ref in snapshot.files]
    except StoreError as e:
        report.problems.append(str(e).replace(f"{store.folder}/", ""))
        return None
    return np.unique(np.concatenate(ids)) if ids else np.empty(0, dtype=np.int64)


def _read_file(store: Store, ref: FileRef, report: VerifyReport) -> bytes | None:
    """The file's bytes once its size (and sha256, where one is recorded) match what was committed."""
    path = store.folder / ref.file
    try:
        size = path.stat().st_size
    except OSError as e:
        report.problems.append(f"{ref.file}: missing or unreadable ({e.strerror or e})")
        return None
    if size != ref.bytes:
        report.problems.append(
            f"{ref.file}: {size} bytes, its commit logged {ref.bytes} (truncated or altered)"
        )
        return None
    try:
        return store.read_file(ref)
    except StoreError as e:
        report.problems.append(str(e).replace(f"{store.folder}/", ""))
        return None


def _parse(store: Store, ref: FileRef, data: bytes, report: VerifyReport) -> pa.Table | None:
    """The file as a table, parsed the way every reader parses it (``Store.parse_table``)."""
    try:
        return store.parse_table(ref, data)
    except StoreError as e:
        report.problems.append(str(e).replace(f"{store.folder}/", ""))
        return None


def _check_shard_metadata(
    table: pa.Table, ref: FileRef, collection: str, fingerprint: str | None, problems: list[str]
) -> None:
    meta = table.schema.metadata or {}
    version = meta.get(b"retrieval.schema_version", b"").decode(errors="replace")
    if version != str(SCHEMA_VERSION):
        problems.append(f"{ref.file}: schema version {version or 'missing'}, expected {SCHEMA_VERSION}")
    if meta.get(b"retrieval.collection", b"").decode(errors="replace") != collection:
        problems.append(f"{ref.file}: its metadata names another collection")
    try:
        written = json.loads(meta.get(b"retrieval.fingerprint", b"{}"))
    except ValueError:
        written = None
    digest = written.get("digest") if isinstance(written, dict) else None
    if fingerprint is not None and digest != fingerprint:
        problems.append(f"{ref.file}: written by another model (fingerprint {str(digest)[:12]})")


def _check_vectors(table: pa.Table, ref: FileRef, dim: int, problems: list[str]) -> None:
    column = table.column("embedding")
    width = getattr(column.type, "list_size", None)
    if width != dim:
        problems.append(f"{ref.file}: vectors of width {width}, the model's is {dim}")
        return
    vectors = embedding_matrix(column, dim)
    bad = ~unit_norm(vectors)
    if bad.any():
        problems.append(f"{ref.file}: {int(bad.sum())} vectors are not finite and unit-norm")


def _check_outcomes(store: Store, ref: FileRef, report: VerifyReport) -> None:
    data = _read_file(store, ref, report)
    if data is None:
        return
    lines = [line for line in data.decode(errors="replace").splitlines() if line]
    if len(lines) != ref.rows:
        report.problems.append(f"{ref.file}: {len(lines)} outcomes, {ref.rows} were recorded")
    for number, line in enumerate(lines, 1):
        try:
            Outcome.from_dict(json.loads(line))
        except (ValueError, TypeError):
            report.problems.append(f"{ref.file}: line {number} is not an outcome")
            return


def _check_index(
    store: Store,
    collection: str,
    record: IndexRecord,
    live: np.ndarray | None,  # None: some shard was unreadable, so the live ids are not known
    dim: int,
    report: VerifyReport,
) -> str | None:
    data = _read_file(store, record.file, report)
    if data is None:
        return record.kind
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        report.problems.append(f"{record.file.file}: unreadable FAISS index ({str(e).splitlines()[0]})")
        return record.kind
    name = record.file.file
    if index.d != dim:
        report.problems.append(f"{name}: dimension {index.d}, the model's is {dim}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        report.problems.append(f"{name}: not an inner-product index")
    if index.ntotal != record.rows:
        report.problems.append(f"{name}: {index.ntotal} vectors, {record.rows} were recorded")
    ids = index_ids(index)
    if live is None:
        return record.kind
    if ids is None:
        report.notes.append(
            f"{name}: the ids of a {record.kind} index cannot be listed; only its size was checked"
        )
    elif not np.array_equal(np.sort(ids), live):
        missing, extra = np.setdiff1d(live, ids), np.setdiff1d(ids, live)
        report.problems.append(
            f"{name}: its ids differ from the live rows ({len(missing)} live rows missing, "
            f"{len(extra)} ids not live, {len(ids) - len(np.unique(ids))} repeated)"
        )
    if record.rerank is not None:
        _check_rerank(store, record, live, dim, report)
    return record.kind


def _check_rerank(
    store: Store, record: IndexRecord, live: np.ndarray, dim: int, report: VerifyReport
) -> None:
    """IVF-PQ's re-rank file: its sha256, its size, and the live ids in order."""
    assert record.rerank is not None
    name = record.rerank.file
    try:
        store.verify(record.rerank)
        rerank = Rerank(store.folder / name, record.rows, dim)
    except StoreError as e:
        report.problems.append(str(e).replace(f"{store.folder}/", ""))
        return
    if not np.array_equal(np.asarray(rerank.ids), live):
        report.problems.append(f"{name}: its ids are not the live rows in ascending order")


def _note_leftovers(store: Store, report: VerifyReport) -> None:
    manifest = store.committed
    named = {f.file for state in manifest.collections.values() for f in state.shards} if manifest else set()
    for name in COLLECTIONS:
        folder = store.folder / name
        if not folder.is_dir():
            continue
        kept = [p for p in folder.glob("shard-*.parquet") if f"{name}/{p.name}" not in named]
        if kept:
            report.notes.append(
                f"{name}: {len(kept)} data files are not in the newest version (removed by a later "
                "commit, or written by an interrupted build); `index vacuum` deletes them after "
                "their retention"
            )
    for path in sorted(store.folder.rglob(f".*{TMP_MARKER}*")):
        report.notes.append(
            f"{path.relative_to(store.folder)}: not committed (an interrupted write's; "
            "the next build removes it)"
        )
