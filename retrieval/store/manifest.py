"""The manifest: an index folder's whole committed state as typed, frozen records, and its JSON.

``Manifest`` names every file of every collection (``FileRef``: path, sha256, rows, bytes), the
model (``model``: where it lives and its fingerprint), each collection's counters, the FAISS index
built for it (``IndexRecord``, with the rows it covers), and the plan of a build in progress
(``PlanRecord``: the ids reserved for each input, so that items may commit in any order and a
rerun after a crash gives every input the id it was planned with). A ``--rebuild`` in progress is
a second state beside the first (``Rebuild``): readers keep seeing the first until it is promoted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from retrieval import __version__
from retrieval.errors import StoreError

__all__ = [
    "COLLECTIONS",
    "SCHEMA_VERSION",
    "CollectionState",
    "FileRef",
    "IndexRecord",
    "Manifest",
    "PlanRecord",
    "Rebuild",
    "index_source",
    "shard_stem",
]

SCHEMA_VERSION = 1
COLLECTIONS = ("images", "captions")


@dataclass(frozen=True)
class FileRef:
    """A file of the store, relative to its folder, with what it must hash to."""

    file: str
    sha256: str
    rows: int
    bytes: int

    @classmethod
    def parse(cls, data: dict[str, Any] | None) -> FileRef | None:
        return cls(**data) if data else None


@dataclass(frozen=True)
class IndexRecord:
    """A built FAISS index: its file, kind and tuned parameter, what it measured, and the rows it
    covers (``source``, the ``shards`` prefix and the deletion list it was built with)."""

    file: FileRef
    kind: str
    rows: int
    param: str | None  # "nprobe" or "efSearch"
    value: int | None
    refine: int | None  # IVF-PQ: candidates re-ranked exactly, as a multiple of k
    recall_at_10: float | None
    latency_ms: float | None  # one query at a time, median
    queries: str  # "captions", "images" or "self"
    build_seconds: float
    reason: str | None = None  # why this kind (auto's choice, or a kind the collection is too small for)
    requested: str = "auto"  # the kind asked for
    source: str | None = None  # index_source() of the collection it was built from
    shards: int | None = None  # readers see this many shards ...
    deleted: FileRef | None = None  # ... less the ids in this deletion list

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {"refine": None, "reason": None} | {k: v for k, v in data.items() if k in names}
        return cls(**known | {"file": FileRef(**data["file"]), "deleted": FileRef.parse(data.get("deleted"))})


@dataclass(frozen=True)
class PlanRecord:
    """The ids a build in progress reserved: ``file`` lists each planned input with its id."""

    file: FileRef
    first_id: int  # ids from first_id up to the collection's next_id were reserved by this plan


@dataclass(frozen=True)
class CollectionState:
    """One collection's committed files and counters."""

    shards: tuple[FileRef, ...] = ()
    next_id: int = 0
    deleted: FileRef | None = None
    outcomes: FileRef | None = None
    root: str | None = None  # images: the folder the paths are relative to
    # Caption sources (files, sidecars) fully indexed: path -> [size, mtime_ns].
    sources: dict[str, list[int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # indexed, skipped, failed
    index: IndexRecord | None = None
    plan: PlanRecord | None = None

    def files(self) -> list[FileRef]:
        extra = [self.deleted, self.outcomes]
        if self.index is not None:
            extra += [self.index.file, self.index.deleted]
        if self.plan is not None:
            extra.append(self.plan.file)
        unique = {f.file: f for f in extra if f is not None}
        return [*self.shards, *unique.values()]

    def published(self) -> CollectionState:
        """What readers see: the rows the FAISS index was built from, and nothing without one.

        A build commits item by item, so that a crash costs at most the work in flight, and
        rebuilds the index last; the rows it committed meanwhile are published with the new
        index, in the same manifest write.
        """
        if self.index is None:
            return dataclasses.replace(self, shards=(), deleted=None)
        if self.index.shards is None:  # recorded before snapshots: the index covered every row
            return self
        return dataclasses.replace(self, shards=self.shards[: self.index.shards], deleted=self.index.deleted)

    @property
    def index_current(self) -> bool:
        """The FAISS index covers exactly the committed rows."""
        if self.index is None:
            return False
        return self.index.source in (index_source(self), _sha_source(self))

    @property
    def awaiting_index(self) -> bool:
        """Rows committed that no FAISS index covers yet (a build stopped, or one in progress)."""
        return self.counts.get("indexed", 0) > 0 and not self.index_current

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["index"] = self.index.to_dict() if self.index else None
        return data

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CollectionState:
        plan = raw.get("plan")
        return cls(
            shards=tuple(FileRef(**f) for f in raw["shards"]),
            next_id=int(raw["next_id"]),
            deleted=FileRef.parse(raw.get("deleted")),
            outcomes=FileRef.parse(raw.get("outcomes")),
            root=raw.get("root"),
            sources={k: list(v) for k, v in raw.get("sources", {}).items()},
            index=IndexRecord.from_dict(raw["index"]) if raw.get("index") else None,
            counts=dict(raw.get("counts", {})),
            plan=PlanRecord(FileRef(**plan["file"]), int(plan["first_id"])) if plan else None,
        )


@dataclass(frozen=True)
class Rebuild:
    """A ``--rebuild`` in progress: its model and collections, promoted when it is done."""

    model: dict[str, Any]
    collections: dict[str, CollectionState]


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    generation: int
    model: dict[str, Any]  # checkpoint / tower paths and the fingerprint
    collections: dict[str, CollectionState]
    engine_version: str = __version__
    updated: float = 0.0
    rebuild: Rebuild | None = None

    def published(self) -> Manifest:
        """The manifest as readers see it (``CollectionState.published`` for each collection)."""
        collections = {name: state.published() for name, state in self.collections.items()}
        return dataclasses.replace(self, collections=collections, rebuild=None)

    @property
    def fingerprint(self) -> str | None:
        return _digest(self.model)

    def files(self) -> list[FileRef]:
        """Every file this manifest names, a rebuild in progress included."""
        states = list(self.collections.values())
        if self.rebuild is not None:
            states += list(self.rebuild.collections.values())
        return [f for state in states for f in state.files()]

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["collections"] = {name: state.to_dict() for name, state in self.collections.items()}
        if self.rebuild is not None:
            data["rebuild"] = {
                "model": self.rebuild.model,
                "collections": {name: s.to_dict() for name, s in self.rebuild.collections.items()},
            }
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"manifest schema version {version} is not supported (this engine reads {SCHEMA_VERSION})"
            )
        rebuild = data.get("rebuild")
        return cls(
            schema_version=version,
            generation=int(data["generation"]),
            model=dict(data["model"]),
            collections={k: CollectionState.from_dict(v) for k, v in data["collections"].items()},
            engine_version=str(data.get("engine_version", "")),
            updated=float(data.get("updated", 0.0)),
            rebuild=Rebuild(
                dict(rebuild["model"]),
                {k: CollectionState.from_dict(v) for k, v in rebuild["collections"].items()},
            )
            if rebuild
            else None,
        )


def _digest(model: dict[str, Any]) -> str | None:
    raw = model.get("fingerprint")
    value = raw.get("digest") if isinstance(raw, dict) else None
    return str(value) if value else None


def index_source(state: CollectionState) -> str:
    """Which rows an index covers: its shards (by first id and rows) and the deletion file.

    A shard rewritten only to refresh file stats (same ids and vectors, ``-r<gen>`` in its name)
    keeps its place in this key, so the index is not rebuilt for it.
    """
    names = [f"{shard_stem(f.file)}:{f.rows}" for f in state.shards]
    names.append(state.deleted.sha256 if state.deleted else "")
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _sha_source(state: CollectionState) -> str:
    """The key indexes recorded before shards were keyed by name: their sha256s and the deletions'.
    Folders built then keep their indexes until their rows change."""
    names = [f.sha256 for f in state.shards] + [state.deleted.sha256 if state.deleted else ""]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def shard_stem(name: str) -> str:
    """``images/shard-000000000004`` for that shard and for each rewrite of it (``-r<gen>``)."""
    return name.removesuffix(".parquet").split("-r")[0]
