"""One collection as a Delta Lake table: data files written here, committed through delta-rs.

Each commit is one entry of the table's transaction log (its cost does not grow with the table;
Delta writes a checkpoint every 100 commits), carrying in its commit metadata the collection's
counters (``retrieval.state``) and the sha256 of each file it adds (``retrieval.files``). A
version is read back as its live data files (path, size, rows and id range from the log's
statistics) plus those counters. Removing rows is a copy-on-write Delta delete: the file's
``remove`` and, when rows remain, the ``add`` of its rewrite, in the same commit, so that every
Delta reader sees only live rows. Files are removed from disk only by ``vacuum``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable, Schema
from deltalake.exceptions import DeltaError, TableNotFoundError
from deltalake.transaction import (
    AddAction,
    CommitProperties,
    RemoveAction,
    create_table_with_add_actions,
)

from retrieval import durable
from retrieval.errors import StoreError
from retrieval.store.manifest import FileRef

__all__ = ["LOG", "DeltaCollection", "Snapshot"]

LOG = "_delta_log"
_STATE_KEY = "retrieval.state"
_FILES_KEY = "retrieval.files"
_LOOKBACK = 1000  # commits of other writers (maintenance) skipped to find the engine's counters
# A checkpoint every 10 commits, not Delta's default 100: delta-rs reads every log entry since the
# last checkpoint to bring a table up to date, so each commit of a long run would cost more until
# the next checkpoint; a checkpoint lists the live files, which the engine keeps few and large.
_PROPERTIES = {"delta.checkpointInterval": "10"}


class Snapshot:
    """A table version: its live files (by first id) and the counters its commit recorded."""

    def __init__(self, version: int, files: tuple[FileRef, ...], counters: dict[str, Any]) -> None:
        self.version = version
        self.files = files
        self.counters = counters


class DeltaCollection:
    """The Delta table of one collection at ``folder / prefix``; file names relative to ``folder``."""

    def __init__(self, folder: Path, prefix: str, name: str) -> None:
        self.folder = folder
        self.prefix = prefix  # "images", or "_rebuild/images" during a --rebuild
        self.name = name
        self.path = folder / prefix
        self._newest: DeltaTable | None = None  # kept, and brought up to date from the log's new entries

    @property
    def exists(self) -> bool:
        return (self.path / LOG).is_dir() and any((self.path / LOG).glob("*.json"))

    def _open(self, version: int | None = None) -> DeltaTable:
        try:
            return DeltaTable(str(self.path), version=version)
        except TableNotFoundError as e:
            raise StoreError(f"{self.path} is not a Delta table: {e}") from e
        except (DeltaError, OSError, ValueError) as e:
            raise StoreError(f"{self.path}: unreadable Delta log ({_first_line(e)})") from e

    def newest(self) -> DeltaTable:
        """The table at its newest version. Kept between calls and brought up to date by reading
        only the log entries added since: a fresh open would read the last checkpoint, which
        lists every file, so each commit would cost more as the table grows."""
        if self._newest is None:
            self._newest = self._open()
        else:
            try:
                self._newest.update_incremental()
            except (DeltaError, OSError, ValueError) as e:
                raise StoreError(f"{self.path}: unreadable Delta log ({_first_line(e)})") from e
        return self._newest

    def snapshot(self, version: int | None = None) -> Snapshot:
        """The live files and counters at ``version`` (the newest when None)."""
        table = self._open(version) if version is not None else self.newest()
        at = table.version()
        adds = pa.table(table.get_add_actions(flatten=True))
        columns = set(adds.column_names)
        first = adds.column("min.id").to_pylist() if "min.id" in columns else [None] * adds.num_rows
        last = adds.column("max.id").to_pylist() if "max.id" in columns else [None] * adds.num_rows
        files = [
            FileRef(f"{self.prefix}/{path}", "", int(rows or 0), int(size), first=lo, last=hi)
            for path, size, rows, lo, hi in zip(
                adds.column("path").to_pylist(),
                adds.column("size_bytes").to_pylist(),
                adds.column("num_records").to_pylist(),
                first,
                last,
                strict=True,
            )
        ]
        files.sort(key=lambda f: (f.first if f.first is not None else -1, f.file))
        return Snapshot(at, tuple(files), self.counters(at))

    def counters(self, version: int) -> dict[str, Any]:
        """The engine's counters as of ``version``: those of the newest engine commit at or before it."""
        for v in range(version, max(-1, version - _LOOKBACK), -1):
            info = self.commit_info(v)
            if info is None:
                break
            if _STATE_KEY in info:
                return dict(json.loads(info[_STATE_KEY]))
        raise StoreError(f"{self.path}: no commit of this engine at or before version {version}")

    def commit_info(self, version: int) -> dict[str, Any] | None:
        """The ``commitInfo`` of ``version``'s log entry; None once the log no longer holds it."""
        path = self.path / LOG / f"{version:020d}.json"
        try:
            durable.before_read(path)
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{path}: unreadable ({e.strerror or e})") from e
        for line in text.splitlines():
            try:
                action = json.loads(line)
            except ValueError as e:
                raise StoreError(f"{path}: damaged Delta log entry") from e
            if "commitInfo" in action:
                return dict(action["commitInfo"])
        return {}

    def recorded_sha256(self, upto: int) -> dict[str, str]:
        """sha256 of each data file as its commit recorded it, for versions up to ``upto`` that the
        log still holds (``index verify`` checks them)."""
        out: dict[str, str] = {}
        for version in range(upto + 1):
            info = self.commit_info(version)
            if info and _FILES_KEY in info:
                out.update({f"{self.prefix}/{k}": v for k, v in json.loads(info[_FILES_KEY]).items()})
        return out

    def commit(
        self,
        adds: Sequence[FileRef],
        removes: Sequence[FileRef],
        counters: dict[str, Any],
        schema: pa.Schema,
        description: dict[str, Any],
    ) -> int:
        """One log entry: ``removes`` out, ``adds`` in, ``counters`` recorded; the new version."""
        now = int(time.time() * 1000)
        actions: list[AddAction | RemoveAction] = [
            RemoveAction(self._relative(f), True, now, size=f.bytes) for f in removes
        ]
        actions += [AddAction(self._relative(f), f.bytes, {}, now, True, json.dumps(_stats(f))) for f in adds]
        metadata = {
            _STATE_KEY: json.dumps(counters, sort_keys=True),
            _FILES_KEY: json.dumps({self._relative(f): f.sha256 for f in adds if f.sha256}, sort_keys=True),
        }
        properties = CommitProperties(custom_metadata=metadata)
        durable.before_commit()
        try:
            if not self.exists:
                self.path.mkdir(parents=True, exist_ok=True)
                create_table_with_add_actions(
                    str(self.path),
                    Schema.from_arrow(schema),
                    [a for a in actions if isinstance(a, AddAction)],
                    mode="error",
                    name=self.name,
                    description=json.dumps(description, sort_keys=True),
                    configuration=_PROPERTIES,
                    commit_properties=properties,
                )
            else:
                # The writer holds the lock and brought the table up to date after its last
                # commit; delta-rs still checks for commits of others (maintenance) as it writes.
                table = self._newest if self._newest is not None else self.newest()
                table.create_write_transaction(
                    actions, mode="append", schema=schema, commit_properties=properties
                )
        except (DeltaError, ValueError) as e:
            raise StoreError(f"{self.path}: the Delta commit failed ({_first_line(e)})") from e
        durable.fsync_dir(self.path / LOG)
        version = self.newest().version()
        self._sync_entry(version)
        return version

    def describe_as(self, description: dict[str, Any]) -> bool:
        """Record ``description`` (schema version, model fingerprint) as the table's description;
        whether that took a commit (a new version)."""
        text = json.dumps(description, sort_keys=True)
        table = self.newest()
        if table.metadata().description == text:
            return False
        durable.before_commit()
        table.alter.set_table_description(text)
        durable.fsync_dir(self.path / LOG)
        self._sync_entry(self.newest().version())
        return True

    def description(self) -> dict[str, Any]:
        raw = self.newest().metadata().description
        try:
            return dict(json.loads(raw)) if raw else {}
        except ValueError:
            return {}

    def vacuum(self, retain_hours: float, keep_versions: Sequence[int]) -> list[str]:
        """Delete the data files no version younger than ``retain_hours`` (nor ``keep_versions``)
        needs, and files no commit names (left by a crash) once older than that."""
        table = self.newest()
        removed = table.vacuum(
            retention_hours=math.ceil(retain_hours),  # delta-rs counts whole hours: never fewer
            dry_run=False,
            enforce_retention_duration=False,
            full=True,
            keep_versions=sorted(set(keep_versions)) or None,
        )
        return [f"{self.prefix}/{p}" for p in removed]

    def engine_files(self, cutoff: float, keep_versions: Sequence[int]) -> set[str]:
        """The engine's files (outcomes, plans) named by a version committed after ``cutoff`` (a
        time), by the one current at ``cutoff``, or by one of ``keep_versions``."""
        if not self.exists:
            return set()
        named: set[str] = set()
        keep = set(keep_versions)
        reached = False  # the version current at the cutoff is taken
        for version in range(self.newest().version(), -1, -1):
            info = self.commit_info(version)
            if info is None:
                break
            recent = info.get("timestamp", 0) / 1000 >= cutoff
            if recent or not reached or version in keep:
                counters = self.counters(version)
                plan = counters.get("plan") or {}
                named |= {ref["file"] for ref in (counters.get("outcomes"), plan.get("file")) if ref}
            reached = reached or not recent
            if reached and not any(v < version for v in keep):
                break
        return named

    def files_on_disk(self) -> Iterator[Path]:
        """Data files in the table's folder, committed or not (content reuse reads removed ones)."""
        if self.path.is_dir():
            yield from sorted(self.path.glob("shard-*.parquet"))

    def _relative(self, ref: FileRef) -> str:
        return ref.file.removeprefix(f"{self.prefix}/")

    def _sync_entry(self, version: int) -> None:
        entry = self.path / LOG / f"{version:020d}.json"
        if entry.is_file():
            durable.fsync_file(entry)


def _stats(ref: FileRef) -> dict[str, Any]:
    stats: dict[str, Any] = {"numRecords": ref.rows}
    if ref.first is not None and ref.last is not None:
        stats |= {"minValues": {"id": ref.first}, "maxValues": {"id": ref.last}, "nullCount": {"id": 0}}
    return stats


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
