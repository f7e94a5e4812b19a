"""The committer: the only writer of an index folder during a build.

``begin`` commits a plan (deletions and touched files' stats as copy-on-write rewrites of the
files that hold them, outcomes known so far, the ids reserved for each planned input), ``add``
commits one item's data file as it arrives, in any order (written here, or staged by a worker
elsewhere and moved into the table), ``end`` clears the plan and the staging area once every item
is in, and ``build_indexes`` (re)builds each collection's FAISS index when its rows changed and
records it in the catalog with the table version it covers: that write publishes the rows
committed meanwhile. Each of these is one Delta commit or one catalog write. A build works on a
``Target``: the folder's tables, or during ``--rebuild`` tables beside them that readers do not see
until ``promote`` makes them the folder's in one commit per table and one catalog write.

One module: every write of a build goes through here, and keeping them side by side is what lets
a reader check that none is missing its commit; the Delta table, the staging area and the FAISS
layer it calls live in modules of their own.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval import durable
from retrieval.ann.calibration import calibrate, readable
from retrieval.ann.faiss_index import IndexConfig, build_collection_index, sample_vectors
from retrieval.build.execute import ItemResult
from retrieval.build.plan import CollectionPlan, plan_table
from retrieval.build.staging import Staging
from retrieval.errors import IndexMismatchError, StoreError
from retrieval.outcomes import Outcome
from retrieval.progress import Progress
from retrieval.store.folder import REBUILD, Store, engine_folder, new_manifest
from retrieval.store.manifest import CollectionState, FileRef, IndexRecord, PlanRecord, Rebuild
from retrieval.store.schema import schema, shard_table, stored_table, table_description
from retrieval.store.table import DeltaCollection

__all__ = ["Committer", "Target"]


class Target:
    """Which tables of the folder a build writes: the ones readers see, or a rebuild's beside them."""

    def __init__(self, store: Store, model: dict[str, Any], *, rebuild: bool) -> None:
        self.store = store
        self.model = model
        self.fingerprint: dict[str, Any] = model["fingerprint"]
        committed = store.manifest
        digest = self.fingerprint["digest"]
        if committed is None:
            self.manifest = store.commit_catalog(new_manifest(model))  # readers need a catalog first
            self.rebuilding = False
        elif rebuild:
            self.rebuilding = True
            ongoing = committed.rebuild
            same = ongoing is not None and ongoing.model.get("fingerprint", {}).get("digest") == digest
            if not same:
                store.discard_rebuild()  # another model's unfinished rebuild: its tables are of no use
            collections = ongoing.collections if ongoing is not None and same else {}
            token = ongoing.token if ongoing is not None and same else f"g{committed.generation + 1}"
            self.manifest = store.commit_catalog(
                replace(committed, rebuild=Rebuild(model, collections, token))
            )
        else:
            if committed.rebuild is not None:
                raise StoreError(
                    f"{store.folder}: a --rebuild is in progress; rerun it with --rebuild to finish it"
                )
            if committed.fingerprint not in (None, digest):
                raise IndexMismatchError(
                    f"{store.folder} was built with another model (fingerprint {committed.fingerprint[:12]}, "
                    f"this one is {digest[:12]}); use the same checkpoint and towers, or --rebuild"
                )
            # A promotion stopped before it described its tables: describe them now, and read the
            # state again, since each description is a commit (a new table version).
            described = [
                store.table(name).describe_as(table_description(name, self.fingerprint))
                for name in committed.collections
            ]
            if (store.folder / REBUILD).exists():  # a promotion stopped before removing them
                store.discard_rebuild()
            if any(described):
                store.reload()
                assert store.manifest is not None
                committed = store.manifest
            self.manifest = committed
            self.rebuilding = False

    @property
    def collections(self) -> dict[str, CollectionState]:
        if self.rebuilding:
            assert self.manifest.rebuild is not None
            return self.manifest.rebuild.collections
        return self.manifest.collections

    def state(self, collection: str) -> CollectionState:
        return self.collections.get(collection, CollectionState())

    def table(self, collection: str) -> DeltaCollection:
        return self.store.rebuild_table(collection) if self.rebuilding else self.store.table(collection)

    def file_name(self, collection: str, kind: str, first: int | None = None) -> str:
        """A new file of ``collection`` for its next commit: a data file (``kind`` "shard", named by
        its first id) or one of the engine's own ("outcomes", "plan"). Names carry the version of
        the commit that will name them, so no committed file is ever written again."""
        prefix = self.table(collection).prefix
        version = self._next_version(collection)
        if kind == "shard":
            return f"{prefix}/shard-{first:012d}-v{version:06d}.parquet"
        suffix = "jsonl" if kind == "outcomes" else "parquet"
        return f"{engine_folder(prefix)}/{kind}-v{version:06d}.{suffix}"

    def _next_version(self, collection: str) -> int:
        version = self.state(collection).version
        return 0 if version is None else version + 1

    def view(self) -> Store:
        """A reader of the folder that sees this target's state (the planner and FAISS read it)."""
        return self.store.viewing(
            replace(self.manifest, model=self.model, collections=self.collections, rebuild=None)
        )

    def commit(
        self,
        collection: str,
        state: CollectionState,
        adds: tuple[FileRef, ...] = (),
        removes: tuple[FileRef, ...] = (),
        *,
        rows_changed: bool | None = None,
    ) -> None:
        """One commit of ``collection``'s table: ``state``'s counters, ``adds`` in, ``removes`` out."""
        dim = int(self.fingerprint["dim"])
        state = self.store.commit_rows(
            self.table(collection),
            state,
            schema(collection, dim),
            table_description(collection, self.fingerprint),
            adds,
            removes,
            rows_changed=rows_changed,
        )
        self._set(collection, state)

    def commit_index(self, collection: str, record: IndexRecord | None) -> None:
        """Record ``collection``'s FAISS index in the catalog (readers see its rows from then on)."""
        self._set(collection, replace(self.state(collection), index=record))
        manifest = self.manifest if self.rebuilding else replace(self.manifest, model=self.model)
        self.manifest = self.store.commit_catalog(manifest)

    def _set(self, collection: str, state: CollectionState) -> None:
        collections = {**self.collections, collection: state}
        if self.rebuilding:
            assert self.manifest.rebuild is not None
            self.manifest = replace(
                self.manifest, rebuild=Rebuild(self.model, collections, self.manifest.rebuild.token)
            )
        else:
            self.manifest = replace(self.manifest, collections=collections)

    def settle_model(self) -> None:
        """Record where the model is now, if it moved and nothing else needed a catalog write."""
        if not self.rebuilding and self.manifest.model != self.model:
            self.manifest = self.store.commit_catalog(replace(self.manifest, model=self.model))

    def promote(self) -> None:
        """A finished rebuild becomes the folder's state: per collection one commit that replaces
        every live file with the rebuild's (linked into the table), then one catalog write. The
        old files stay for readers that pinned them, until a vacuum."""
        if not self.rebuilding:
            return
        assert self.manifest.rebuild is not None
        token = self.manifest.rebuild.token  # this rebuild's, not an earlier one's with the same model
        promoted: dict[str, CollectionState] = {}
        for name, built in self.collections.items():
            live = self.manifest.collections.get(name, CollectionState())
            table = self.store.table(name)
            if token and live.promoted == token and live.version is not None:
                promoted[name] = replace(live, index=_moved_index(built.index, live))
                continue  # committed before a crash: only the catalog was left to write
            adds = tuple(self._link(ref, table, live) for ref in built.shards)
            outcomes = self._link(built.outcomes, table, live) if built.outcomes else None
            state = replace(
                live,
                next_id=built.next_id,
                outcomes=outcomes,
                root=built.root,
                sources=built.sources,
                counts=built.counts,
                plan=None,
                promoted=token,
            )
            state = self.store.commit_rows(
                table,
                state,
                schema(name, int(self.fingerprint["dim"])),
                table_description(name, self.fingerprint),
                adds,
                live.shards,
                rows_changed=True,
            )
            promoted[name] = replace(state, index=_moved_index(built.index, state))
        for name, state in self.manifest.collections.items():
            if name not in promoted:  # a collection the rebuild did not index: its rows are gone
                promoted[name] = self._emptied(name, state)
        self.manifest = self.store.commit_catalog(
            replace(self.manifest, model=self.model, collections=promoted, rebuild=None)
        )
        for name in promoted:
            if self.store.table(name).exists:
                self.store.table(name).describe_as(table_description(name, self.fingerprint))
        self.store.discard_rebuild()
        self.rebuilding = False

    def _emptied(self, name: str, state: CollectionState) -> CollectionState:
        if not state.shards and state.index is None:
            return state
        empty = replace(state, outcomes=None, sources={}, counts={}, plan=None, index=None)
        return self.store.commit_rows(
            self.store.table(name),
            empty,
            schema(name, int(self.fingerprint["dim"])),
            table_description(name, self.fingerprint),
            (),
            state.shards,
            rows_changed=True,
        )

    def _link(self, ref: FileRef, table: DeltaCollection, live: CollectionState) -> FileRef:
        """``ref`` (a rebuild file) as a file of the live ``table``, by a hard link (a copy where
        links are not possible), named for the promoting commit so that no live name is reused."""
        version = 0 if live.version is None else live.version + 1
        source = self.store.folder / ref.file
        stem, suffix = Path(ref.file).stem, Path(ref.file).suffix
        own = f"/{Path(engine_folder('')).name}/" in ref.file  # the engine's file, or a data file
        parent = engine_folder(table.prefix) if own else table.prefix
        name = f"{parent}/{stem}-p{version:06d}{suffix}"
        target = self.store.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.exists() and target.stat().st_size == ref.bytes):
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                durable.atomic_write_bytes(target, source.read_bytes())
            durable.fsync_dir(target.parent)
        return replace(ref, file=name)

    @property
    def generation(self) -> int:
        return self.manifest.generation


def _moved_index(record: IndexRecord | None, state: CollectionState) -> IndexRecord | None:
    """A rebuild's index, now covering the live table's version that holds the same rows."""
    if record is None:
        return None
    return replace(record, version=state.version, rows_version=state.rows_version)


class Committer:
    """Commits a build's plans and results into ``target``, one table commit each."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.store = target.store
        self.fingerprint = target.model["fingerprint"]
        self.outcomes: dict[str, list[Outcome]] = {}
        self.remaining: dict[str, set[int]] = {}  # collection -> numbers of items not yet committed
        self.waiting: dict[str, dict[str, tuple[set[int], list[int]]]] = {}
        self.written = 0  # rows the collection in progress has written so far (from ``begin``)
        self.write_seconds = 0.0  # spent writing them (data and outcome files)
        self.commit_seconds = 0.0  # spent committing them to the table's log

    def begin(self, plan: CollectionPlan) -> None:
        """Commit what a plan decides before any item: deletions, stats, outcomes, reserved ids."""
        name = plan.collection
        state = self.target.state(name)
        self.written, self.write_seconds, self.commit_seconds = 0, 0.0, 0.0
        self.outcomes[name] = list(plan.outcomes)
        self.remaining[name] = set(range(len(plan.items)))  # items are numbered from 0
        self.waiting[name] = {k: (set(v[0]), v[1]) for k, v in plan.waiting.items()}
        changed = (
            plan.deleted
            or plan.restat
            or len(plan.items)
            or state.outcomes is None
            or set(plan.outcomes) != set(self.store.outcomes_of(state))
            or plan.sources != state.sources
            or (plan.root is not None and plan.root != state.root)
        )
        if not changed:
            return
        adds, removes = self._rewrite(name, state, plan.deleted, plan.restat)
        outcomes = self.store.write_outcomes(self.target.file_name(name, "outcomes"), plan.outcomes)
        record = None
        if len(plan.items):
            table = plan_table(plan)
            ref = self.store.write_table(self.target.file_name(name, "plan"), table)
            record = PlanRecord(ref, int(table.column("id").to_numpy().min()))
        indexed = state.counts.get("indexed", 0) - len(plan.deleted)
        state = replace(
            state,
            outcomes=outcomes,
            root=plan.root if plan.root is not None else state.root,
            sources=plan.sources,
            next_id=max(state.next_id, plan.next_id),
            counts=_counts(indexed, self.outcomes[name]),
            plan=record,
        )
        self.target.commit(name, state, adds, removes, rows_changed=bool(plan.deleted))

    def add(self, result: ItemResult) -> None:
        """Commit one item's rows as a data file (and the outcomes of its failed inputs)."""
        name = result.item.collection
        state = self.target.state(name)
        began = time.perf_counter()
        adds: tuple[FileRef, ...] = ()
        staging = Staging(self.store.folder, self.target.table(name).prefix)
        if result.staged is not None:
            # Moved into the table and its receipt gone before the commit: a driver killed between
            # the two leaves the item to be done again, never a receipt of a committed item.
            if result.staged.file is not None:
                first = result.staged.file.first
                moved = staging.take(result.staged, self.target.file_name(name, "shard", first))
                adds = (moved,) if moved is not None else ()
            staging.release(result.staged)
        elif result.rows:
            order = np.argsort(result.ids)
            ids = np.asarray(result.ids, dtype=np.int64)[order]
            rows = [result.rows[k] for k in order]
            vectors = result.matrix(int(self.fingerprint["dim"]))[order]
            table = shard_table(name, ids, rows, vectors, self.fingerprint)
            adds = (self.store.write_table(self.target.file_name(name, "shard", int(ids[0])), table),)
        out = state.outcomes
        if result.outcomes:
            self.outcomes[name].extend(result.outcomes)
            out = self.store.write_outcomes(self.target.file_name(name, "outcomes"), self.outcomes[name])
        sources = dict(state.sources)
        if result.complete:
            self.remaining[name].discard(result.item.number)
            for source, (items, stats) in list(self.waiting[name].items()):
                items.discard(result.item.number)
                if not items:
                    sources[source] = stats
                    del self.waiting[name][source]
        indexed = state.counts.get("indexed", 0) + result.added
        counts = _counts(indexed, self.outcomes[name])
        written = time.perf_counter()
        self.target.commit(name, replace(state, outcomes=out, sources=sources, counts=counts), adds)
        self.written += result.added
        self.write_seconds += written - began
        self.commit_seconds += time.perf_counter() - written

    def end(self, collection: str) -> bool:
        """Clear the plan once every item is committed; False while some are still to do."""
        state = self.target.state(collection)
        if self.remaining.get(collection):
            return False
        if state.plan is not None:
            self.target.commit(collection, replace(state, plan=None))
        # What workers staged for an earlier plan (a killed build's) that this one did not take.
        Staging(self.store.folder, self.target.table(collection).prefix).clear()
        return True

    def build_indexes(self, config: IndexConfig, progress: Progress) -> dict[str, IndexRecord]:
        """(Re)build the FAISS index of every collection whose rows changed since its last one."""
        built: dict[str, IndexRecord] = {}
        for name in ("images", "captions"):
            if name not in self.target.collections:
                continue
            state = self.target.state(name)
            if state.counts.get("indexed", 0) == 0:
                if state.index is not None:  # every row deleted: nothing left to search
                    self.target.commit_index(name, None)
                continue
            current = state.index
            if (
                current is not None
                and state.index_current
                and config.kind in ("auto", current.kind, current.requested)
            ):
                moved = replace(current, version=state.version)
                nulls = current.calibration or {}
                wanted = {name} | ({_other(name)} if self._queries_exist(name) else set())
                if set(nulls) != wanted or not all(map(readable, nulls.values())):
                    # Built before this calibration, or before the other collection had rows.
                    queries = self._queries(name, config)
                    others = {} if queries is None else {_other(name): queries}
                    moved = replace(
                        moved, calibration=calibrate(self.target.view(), name, others, config.seed)
                    )
                if moved != current:  # newer files, same rows: readers may move on
                    self.target.commit_index(name, moved)
                continue
            view = self.target.view()
            other = _other(name)
            queries = self._queries(name, config)
            progress.start(f"{name} index", 1)
            record = build_collection_index(view, name, config, queries, other)
            progress.advance(1)
            progress.finish()
            if record is None:
                continue
            record = replace(record, version=state.version, rows_version=state.rows_version)
            self.target.commit_index(name, record)
            built[name] = record
        return built

    def _queries_exist(self, name: str) -> bool:
        return bool(self.target.state(_other(name)).counts.get("indexed", 0))

    def _queries(self, name: str, config: IndexConfig) -> np.ndarray | None:
        """A sample of the other collection's vectors: the queries an index of ``name`` serves."""
        other = _other(name)
        if not self._queries_exist(name):
            return None
        return sample_vectors(
            self.target.view(), other, config.tuning_queries, np.random.default_rng(config.seed)
        )

    def _rewrite(
        self,
        name: str,
        state: CollectionState,
        deleted: list[int],
        restat: dict[int, tuple[int, int]],
    ) -> tuple[tuple[FileRef, ...], tuple[FileRef, ...]]:
        """Copy-on-write of the data files that hold ``deleted`` ids or ``restat`` (touched files:
        same ids and vectors, new size and mtime): each rewritten without the deleted rows and
        with the new stats, or only removed when no row is left. Returns (adds, removes)."""
        gone = np.asarray(sorted(deleted), dtype=np.int64)
        touched = np.asarray(sorted(restat), dtype=np.int64)
        wanted = np.union1d(gone, touched)
        adds: list[FileRef] = []
        removes: list[FileRef] = []
        if not len(wanted):
            return (), ()
        for ref in state.shards:
            if ref.first is not None and ref.last is not None:
                lo, hi = np.searchsorted(wanted, [ref.first, ref.last + 1])
                if lo == hi:
                    continue  # the logged id range holds none of them
            table = self.store.read_table(ref)
            ids = table.column("id").to_numpy()
            if not np.isin(ids, wanted).any():
                continue
            keep = ~np.isin(ids, gone)
            if np.isin(ids, touched).any():
                size = table.column("size").to_numpy().copy()
                mtime = table.column("mtime_ns").to_numpy().copy()
                for k in np.flatnonzero(np.isin(ids, touched)):
                    size[k], mtime[k] = restat[int(ids[k])]
                table = table.set_column(
                    table.schema.get_field_index("size"), "size", pa.array(size, pa.int64())
                )
                table = table.set_column(
                    table.schema.get_field_index("mtime_ns"), "mtime_ns", pa.array(mtime, pa.int64())
                )
            removes.append(ref)
            if keep.any():
                table = stored_table(table.filter(pa.array(keep)), name, self.fingerprint)
                first = int(table.column("id").to_numpy()[0])
                adds.append(self.store.write_table(self.target.file_name(name, "shard", first), table))
        return tuple(adds), tuple(removes)


def _other(name: str) -> str:
    return "captions" if name == "images" else "images"


def _counts(indexed: int, outcomes: list[Outcome]) -> dict[str, int]:
    return {
        "indexed": indexed,
        "skipped": sum(o.status == "skipped" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
    }
