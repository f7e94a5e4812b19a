"""The committer: the only writer of an index folder's manifest during a build.

``begin`` commits a plan (deletions, touched files' stats, outcomes known so far, the ids reserved
for each planned input), ``add`` commits one item's shard as it arrives, in any order, ``end``
clears the plan once every item is in, and ``build_indexes`` (re)builds each collection's FAISS
index when its rows changed, publishing the rows committed meanwhile in the same write. A build
works on a ``Target``: the folder's state, or during ``--rebuild`` a second state beside it that
readers do not see until ``promote``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval.ann.faiss_index import IndexConfig, build_collection_index, sample_vectors
from retrieval.build.execute import ItemResult
from retrieval.build.plan import CollectionPlan, plan_table
from retrieval.errors import IndexMismatchError, StoreError
from retrieval.outcomes import Outcome
from retrieval.progress import Progress
from retrieval.store.folder import Store
from retrieval.store.manifest import (
    SCHEMA_VERSION,
    CollectionState,
    IndexRecord,
    Manifest,
    PlanRecord,
    Rebuild,
    index_source,
    shard_stem,
)
from retrieval.store.schema import shard_table

__all__ = ["Committer", "Target"]


class Target:
    """Which state of the folder a build writes: the one readers see, or a rebuild beside it."""

    def __init__(self, store: Store, model: dict[str, Any], *, rebuild: bool) -> None:
        self.store = store
        self.model = model
        committed = store.manifest
        digest = model["fingerprint"]["digest"]
        if committed is None:
            self.manifest = Manifest(SCHEMA_VERSION, 0, model, {})
            self.rebuilding = False
        elif rebuild:
            self.rebuilding = True
            ongoing = committed.rebuild
            same = ongoing is not None and ongoing.model.get("fingerprint", {}).get("digest") == digest
            collections = ongoing.collections if ongoing is not None and same else {}
            self.manifest = store.commit(
                replace(committed, generation=committed.generation + 1, rebuild=Rebuild(model, collections))
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

    def view(self) -> Store:
        """A reader of the folder that sees this target's state (the planner and FAISS read it)."""
        return self.store.viewing(
            replace(self.manifest, model=self.model, collections=self.collections, rebuild=None)
        )

    def commit(self, collection: str, state: CollectionState) -> None:
        collections = {**self.collections, collection: state}
        if self.rebuilding:
            manifest = replace(self.manifest, rebuild=Rebuild(self.model, collections))
        else:
            manifest = replace(self.manifest, model=self.model, collections=collections)
        self.manifest = self.store.commit(replace(manifest, generation=manifest.generation + 1))

    def settle_model(self) -> None:
        """Record where the model is now, if it moved and nothing else needed a commit."""
        if not self.rebuilding and self.manifest.model != self.model:
            self.manifest = self.store.commit(replace(self.manifest, model=self.model))

    def promote(self) -> None:
        """A finished rebuild becomes the folder's state; the old files go with the next clean-up."""
        if self.rebuilding:
            self.manifest = self.store.commit(
                replace(
                    self.manifest,
                    generation=self.manifest.generation + 1,
                    model=self.model,
                    collections=self.collections,
                    rebuild=None,
                )
            )
            self.rebuilding = False

    @property
    def generation(self) -> int:
        return self.manifest.generation


class Committer:
    """Commits a build's plans and results into ``target``, one manifest write each."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.store = target.store
        self.fingerprint = target.model["fingerprint"]
        self.outcomes: dict[str, list[Outcome]] = {}
        self.remaining: dict[str, set[int]] = {}  # collection -> numbers of items not yet committed
        self.waiting: dict[str, dict[str, tuple[set[int], list[int]]]] = {}

    def begin(self, plan: CollectionPlan) -> None:
        """Commit what a plan decides before any item: deletions, stats, outcomes, reserved ids."""
        name = plan.collection
        state = self.target.state(name)
        generation = self.target.generation + 1
        self.outcomes[name] = list(plan.outcomes)
        self.remaining[name] = {item.number for item in plan.items}
        self.waiting[name] = {k: (set(v[0]), v[1]) for k, v in plan.waiting.items()}
        changed = (
            plan.deleted
            or plan.restat
            or plan.items
            or state.outcomes is None
            or set(plan.outcomes) != set(self.store.outcomes_of(state))
            or plan.sources != state.sources
            or (plan.root is not None and plan.root != state.root)
        )
        if not changed:
            return
        if plan.restat:
            state = replace(state, shards=self._restat(state, plan.restat, generation))
        deleted = state.deleted
        if plan.deleted:
            ids = np.union1d(self.store.read_ids(state.deleted), np.asarray(plan.deleted, dtype=np.int64))
            deleted = self.store.write_table(
                f"{name}/deleted-g{generation:06d}.parquet", pa.table({"id": ids})
            )
        outcomes = self.store.write_outcomes(f"{name}/outcomes-g{generation:06d}.jsonl", plan.outcomes)
        record = None
        if plan.items:
            table = plan_table(plan)
            ref = self.store.write_table(f"{name}/plan-g{generation:06d}.parquet", table)
            record = PlanRecord(ref, int(table.column("id").to_numpy().min()))
        indexed = state.counts.get("indexed", 0) - len(plan.deleted)
        state = replace(
            state,
            deleted=deleted,
            outcomes=outcomes,
            root=plan.root if plan.root is not None else state.root,
            sources=plan.sources,
            next_id=max(state.next_id, plan.next_id),
            counts=_counts(indexed, self.outcomes[name]),
            plan=record,
        )
        self.target.commit(name, state)

    def add(self, result: ItemResult) -> None:
        """Commit one item's rows as a shard (and the outcomes of its failed inputs)."""
        name = result.item.collection
        state = self.target.state(name)
        generation = self.target.generation + 1
        shards = state.shards
        if result.rows:
            order = np.argsort(result.ids)
            ids = np.asarray(result.ids, dtype=np.int64)[order]
            rows = [result.rows[k] for k in order]
            vectors = result.matrix(int(self.fingerprint["dim"]))[order]
            table = shard_table(name, ids, rows, vectors, self.fingerprint)
            # Named by first id and generation: a rebuild's shards never reuse a live file's name.
            file = f"{name}/shard-{int(ids[0]):012d}-g{generation:06d}.parquet"
            shards = (*shards, self.store.write_table(file, table))
        out = state.outcomes
        if result.outcomes:
            self.outcomes[name].extend(result.outcomes)
            out = self.store.write_outcomes(f"{name}/outcomes-g{generation:06d}.jsonl", self.outcomes[name])
        sources = dict(state.sources)
        if result.complete:
            self.remaining[name].discard(result.item.number)
            for source, (items, stats) in list(self.waiting[name].items()):
                items.discard(result.item.number)
                if not items:
                    sources[source] = stats
                    del self.waiting[name][source]
        indexed = state.counts.get("indexed", 0) + len(result.rows)
        counts = _counts(indexed, self.outcomes[name])
        self.target.commit(name, replace(state, shards=shards, outcomes=out, sources=sources, counts=counts))

    def end(self, collection: str) -> bool:
        """Clear the plan once every item is committed; False while some are still to do."""
        state = self.target.state(collection)
        if self.remaining.get(collection):
            return False
        if state.plan is not None:
            self.target.commit(collection, replace(state, plan=None))
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
                    self.target.commit(name, replace(state, index=None))
                continue
            source = index_source(state)
            current = state.index
            if (
                current is not None
                and state.index_current
                and config.kind in ("auto", current.kind, current.requested)
            ):
                continue
            view = self.target.view()
            other = "captions" if name == "images" else "images"
            queries = None
            if self.target.state(other).counts.get("indexed", 0):
                queries = sample_vectors(
                    view, other, config.tuning_queries, np.random.default_rng(config.seed)
                )
            progress.start(f"{name} index", 1)
            record = build_collection_index(view, name, config, queries, other)
            progress.advance(1)
            progress.finish()
            if record is None:
                continue
            # The rows it covers (shards are only appended), so that readers see exactly those.
            record = replace(record, source=source, shards=len(state.shards), deleted=state.deleted)
            self.target.commit(name, replace(state, index=record))
            built[name] = record
        return built

    def _restat(
        self, state: CollectionState, updates: dict[int, tuple[int, int]], generation: int
    ) -> tuple[Any, ...]:
        """Shards holding rows whose file was touched but not changed, rewritten with the new
        (size, mtime_ns): same ids and vectors, copy on write; the old files go with the next
        clean-up."""
        wanted = np.fromiter(updates, dtype=np.int64)
        shards = list(state.shards)
        for position, ref in enumerate(shards):
            if not np.isin(self.store.read_ids(ref), wanted).any():
                continue  # only the ids read: most shards hold no touched file
            table = self.store.read_table(ref)
            ids = table.column("id").to_numpy()
            hit = np.isin(ids, wanted)
            size = table.column("size").to_numpy().copy()
            mtime = table.column("mtime_ns").to_numpy().copy()
            for k in np.flatnonzero(hit):
                size[k], mtime[k] = updates[int(ids[k])]
            table = table.set_column(table.schema.get_field_index("size"), "size", pa.array(size, pa.int64()))
            table = table.set_column(
                table.schema.get_field_index("mtime_ns"), "mtime_ns", pa.array(mtime, pa.int64())
            )
            shards[position] = self.store.write_table(
                f"{shard_stem(ref.file)}-r{generation:06d}.parquet", table
            )
        return tuple(shards)


def _counts(indexed: int, outcomes: list[Outcome]) -> dict[str, int]:
    return {
        "indexed": indexed,
        "skipped": sum(o.status == "skipped" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
    }
