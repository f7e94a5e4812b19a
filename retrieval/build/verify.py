"""``index verify``: check that an index folder is exactly what its manifest committed.

What is checked, collection by collection:

- the manifest parses and has this engine's schema version;
- every file it names exists, with the recorded size and sha256, and is parsed only after its
  hash matched; the row counts of shards, deletion lists and outcome lists are the recorded ones;
- each shard's Parquet metadata names this schema, this collection and the manifest's model
  fingerprint, whose digest is recomputed from its fields;
- ids are unique across shards and below the collection's ``next_id``; deleted ids are shard ids;
- vectors have the model's dimension and are finite and unit-norm;
- the ``indexed`` count equals the live rows, and the FAISS index holds exactly the ids that
  readers see (``CollectionState.published``), with the model's dimension and the inner-product
  metric.

Notes, not problems: files a crashed writer left behind (temporaries, unnamed shards), which are
not committed and which the next writer removes; and rows an interrupted build committed before
it could rebuild the index, which readers do not see until the next build publishes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from retrieval.ann.faiss_index import index_ids
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
        if manifest is None:  # only a writer opens a folder without a manifest
            report.problems.append(f"{folder} has no manifest")
            return
        report.generation = manifest.generation
        fingerprint, dim = _check_fingerprint(manifest.model, report)
        for name, state in sorted(manifest.collections.items()):
            if name not in COLLECTIONS:
                report.problems.append(f"manifest: unknown collection {name!r}")
                continue
            report.collections[name] = _check_collection(store, name, state, fingerprint, dim, report)
        _note_leftovers(store, report)


def _check_fingerprint(model: dict[str, Any], report: VerifyReport) -> tuple[str | None, int]:
    """The fingerprint's recomputed digest and the embedding width (None, 0 when unreadable)."""
    raw = model.get("fingerprint")
    if not isinstance(raw, dict):
        report.problems.append("manifest: no model fingerprint")
        return None, 0
    try:
        fingerprint = ModelFingerprint.from_dict(raw)
        dim = int(fingerprint.dim)
    except (TypeError, KeyError, ValueError) as e:
        report.problems.append(f"manifest: unreadable model fingerprint ({e})")
        return None, 0
    if fingerprint.digest != raw.get("digest"):
        report.problems.append("manifest: the model fingerprint's digest does not match its fields")
    return fingerprint.digest, dim


def _check_collection(
    store: Store, name: str, state: CollectionState, fingerprint: str | None, dim: int, report: VerifyReport
) -> CollectionCheck:
    check = CollectionCheck()
    problems = report.problems
    shard_ids: dict[str, np.ndarray] = {}
    complete = True  # every shard and deletion list was readable: the id sets can be compared
    for ref in state.shards:
        table = _read_table(store, ref, report)
        check.files += 1
        if table is None:
            complete = False
            continue
        if missing := {"id", "embedding"} - set(table.column_names):
            problems.append(f"{ref.file}: no {' or '.join(sorted(missing))} column")
            complete = False
            continue
        _check_shard_metadata(table, ref, name, fingerprint, problems)
        ids = shard_ids[ref.file] = table.column("id").to_numpy()
        check.rows += len(ids)
        if len(ids) and int(ids.max()) >= state.next_id:
            problems.append(f"{ref.file}: id {int(ids.max())} is not below next_id {state.next_id}")
        _check_vectors(table, ref, dim, problems)
    every = np.concatenate(list(shard_ids.values())) if shard_ids else np.empty(0, dtype=np.int64)
    if len(np.unique(every)) != len(every):
        problems.append(f"{name}: {len(every) - len(np.unique(every))} ids appear in more than one row")

    published = state.published()
    deleted: dict[str, np.ndarray] = {}
    for ref in {f.file: f for f in (state.deleted, published.deleted) if f is not None}.values():
        check.files += 1
        table = _read_table(store, ref, report)
        if table is None or "id" not in table.column_names:
            if table is not None:
                problems.append(f"{ref.file}: no id column")
            complete = False
        else:
            deleted[ref.file] = table.column("id").to_numpy()

    def live_of(view: CollectionState) -> np.ndarray:
        ids = [shard_ids[f.file] for f in view.shards if f.file in shard_ids]
        gone = deleted.get(view.deleted.file) if view.deleted else None
        rows = np.unique(np.concatenate(ids)) if ids else np.empty(0, dtype=np.int64)
        return rows if gone is None else np.setdiff1d(rows, gone)

    live = live_of(state)
    check.live = len(live)
    if complete:
        strays = np.setdiff1d(deleted[state.deleted.file], every) if state.deleted else every[:0]
        if len(strays):
            problems.append(f"{name}: {len(strays)} deleted ids are in no shard")
        counted = state.counts.get("indexed", 0)
        if counted != check.live:
            problems.append(
                f"{name}: the manifest counts {counted} indexed, the shards hold {check.live} live rows"
            )

    if state.outcomes is not None:
        check.files += 1
        _check_outcomes(store, state.outcomes, report)
    searchable = live_of(published) if complete else None
    if state.index is not None:
        check.files += 1
        check.index = _check_index(store, name, state.index, searchable, dim, report)
    if searchable is not None and not np.array_equal(searchable, live):
        added, removed = len(np.setdiff1d(live, searchable)), len(np.setdiff1d(searchable, live))
        report.notes.append(
            f"{name}: {added} rows added and {removed} deleted are committed but not yet searchable "
            "(an interrupted build's; the next build publishes them with the index)"
        )
    return check


def _read_file(store: Store, ref: FileRef, report: VerifyReport) -> bytes | None:
    """The file's bytes once its size and hash match the manifest (never parsed before that)."""
    path = store.folder / ref.file
    try:
        size = path.stat().st_size
    except OSError as e:
        report.problems.append(f"{ref.file}: missing or unreadable ({e.strerror or e})")
        return None
    if size != ref.bytes:
        report.problems.append(
            f"{ref.file}: {size} bytes, the manifest says {ref.bytes} (truncated or altered)"
        )
        return None
    try:
        return store.read_file(ref)
    except StoreError as e:
        report.problems.append(str(e).replace(f"{store.folder}/", ""))
        return None


def _read_table(store: Store, ref: FileRef, report: VerifyReport) -> pa.Table | None:
    """The file as a table, parsed the way every reader parses it (``Store.parse_table``)."""
    data = _read_file(store, ref, report)
    if data is None:
        return None
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
        report.problems.append(f"{ref.file}: {len(lines)} outcomes, the manifest says {ref.rows}")
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
        report.problems.append(f"{name}: {index.ntotal} vectors, the manifest says {record.rows}")
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
    return record.kind


def _note_leftovers(store: Store, report: VerifyReport) -> None:
    manifest = store.committed
    named = {f.file for state in manifest.collections.values() for f in state.files()} if manifest else set()
    candidates = [
        f"{name}/{path.name}"
        for name in COLLECTIONS
        if (store.folder / name).is_dir()
        for path in sorted((store.folder / name).iterdir())
        if TMP_MARKER in path.name or path.name.endswith((".parquet", ".faiss"))
    ]
    candidates += [path.name for path in sorted(store.folder.glob(f".*{TMP_MARKER}*"))]
    for name in candidates:
        if name not in named:
            report.notes.append(f"{name}: not committed (an interrupted write's; the next build removes it)")
