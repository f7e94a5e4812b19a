"""An index folder's committed state as typed, frozen records, and their JSON.

The state lives in two places, each written in one atomic step:

- each collection's **Delta Lake table** (``retrieval.store.table``): its data files, and in the
  commit's own metadata the collection's counters (``CollectionState``: next id, outcomes, root,
  caption sources done, the plan of a build in progress);
- the **catalog** (``Catalog``, ``catalog.json``): the model, each collection's FAISS index
  (``IndexRecord``: its file with sha256, and the table version it was built from) and a
  ``--rebuild`` in progress.

``Manifest`` is the two joined, as a reader or writer of the folder sees them. ``FileRef`` names
one file: path relative to the folder, sha256 where one is recorded (FAISS indexes, outcome and
plan files; data files are checked by their logged size and Parquet page checksums), rows, bytes
and, for data files, the id range that Delta's statistics log for it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from retrieval import __version__
from retrieval.errors import StoreError

__all__ = [
    "COLLECTIONS",
    "SCHEMA_VERSION",
    "Catalog",
    "CollectionState",
    "FileRef",
    "IndexRecord",
    "Manifest",
    "PlanRecord",
    "Rebuild",
]

SCHEMA_VERSION = 2  # 1: the earlier folder format (one manifest.json), migrated by `index migrate`
COLLECTIONS = ("images", "captions")


@dataclass(frozen=True)
class FileRef:
    """A file of the store, relative to its folder, with what it must hash to or measure."""

    file: str
    sha256: str  # "" for data files: their logged size and page checksums are checked instead
    rows: int
    bytes: int
    first: int | None = None  # data files: the smallest and largest id they hold (Delta stats)
    last: int | None = None

    @classmethod
    def parse(cls, data: dict[str, Any] | None) -> FileRef | None:
        return cls(**data) if data else None


@dataclass(frozen=True)
class IndexRecord:
    """A built FAISS index: its file, kind and tuned parameter, what it measured, and the rows it
    covers: those of its table at ``version`` (``rows_version``: the last commit that changed
    them; a later commit that changed no id or vector keeps the index current)."""

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
    version: int | None = None  # the table version it was built from
    rows_version: int | None = None
    rerank: FileRef | None = None  # IVF-PQ: the re-rank copy of its vectors, a file beside it
    # Scores of random pairs, per query collection ("images", "captions"): ScoreNull.to_dict()
    calibration: dict[str, Any] | None = None

    @property
    def files(self) -> tuple[FileRef, ...]:
        return (self.file,) if self.rerank is None else (self.file, self.rerank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        rerank = FileRef(**data["rerank"]) if data.get("rerank") else None
        return cls(**known | {"file": FileRef(**data["file"]), "rerank": rerank})


@dataclass(frozen=True)
class PlanRecord:
    """The ids a build in progress reserved: ``file`` lists each planned input with its id."""

    file: FileRef
    first_id: int  # ids from first_id up to the collection's next_id were reserved by this plan


@dataclass(frozen=True)
class CollectionState:
    """One collection at one table version: its live data files and its counters."""

    shards: tuple[FileRef, ...] = ()  # the live data files, by first id
    next_id: int = 0
    outcomes: FileRef | None = None
    root: str | None = None  # images: the folder the paths are relative to
    # Caption sources (files) fully indexed: path -> [size, mtime_ns].
    sources: dict[str, list[int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # indexed, skipped, failed
    index: IndexRecord | None = None
    plan: PlanRecord | None = None
    version: int | None = None  # the table version; None: no table yet
    rows_version: int | None = None  # the last version whose commit changed ids or vectors
    promoted: str | None = None  # the token of the rebuild whose promotion made this version

    @property
    def index_current(self) -> bool:
        """The FAISS index covers exactly the committed rows."""
        return self.index is not None and self.index.rows_version == self.rows_version

    @property
    def awaiting_index(self) -> bool:
        """Rows committed that no FAISS index covers yet (a build stopped, or one in progress)."""
        return self.counts.get("indexed", 0) > 0 and not self.index_current

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.shards)

    def counters(self) -> dict[str, Any]:
        """What a commit records of this state beside its data files (the table's commit metadata)."""
        return {
            "next_id": self.next_id,
            "outcomes": dataclasses.asdict(self.outcomes) if self.outcomes else None,
            "root": self.root,
            "sources": self.sources,
            "counts": self.counts,
            "plan": dataclasses.asdict(self.plan) if self.plan else None,
            "rows_version": self.rows_version,
            "promoted": self.promoted,
        }

    @classmethod
    def from_counters(cls, raw: dict[str, Any], shards: tuple[FileRef, ...], version: int) -> CollectionState:
        plan = raw.get("plan")
        return cls(
            shards=shards,
            next_id=int(raw["next_id"]),
            outcomes=FileRef.parse(raw.get("outcomes")),
            root=raw.get("root"),
            sources={k: list(v) for k, v in raw.get("sources", {}).items()},
            counts=dict(raw.get("counts", {})),
            plan=PlanRecord(FileRef(**plan["file"]), int(plan["first_id"])) if plan else None,
            version=version,
            rows_version=raw.get("rows_version"),
            promoted=raw.get("promoted"),
        )


@dataclass(frozen=True)
class Rebuild:
    """A ``--rebuild`` in progress: its model and collections (tables beside the live ones),
    promoted when it is done."""

    model: dict[str, Any]
    collections: dict[str, CollectionState]
    token: str = ""  # names this rebuild: the mark its promotion leaves in each table


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    generation: int  # of the catalog: one more at each of its writes
    model: dict[str, Any]  # checkpoint / tower paths and the fingerprint
    collections: dict[str, CollectionState]
    engine_version: str = __version__
    updated: float = 0.0
    rebuild: Rebuild | None = None
    retired: dict[str, float] = field(default_factory=dict)  # FAISS files no longer named: since when
    # Table versions an index covered until it was replaced ("images@5"): since when. Readers that
    # opened before may still read them, so a vacuum keeps their files for the retention.
    retired_versions: dict[str, float] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str | None:
        return _digest(self.model)

    def catalog(self) -> Catalog:
        """The catalog this manifest records (its FAISS indexes, model and rebuild)."""
        indexes = {n: s.index for n, s in self.collections.items() if s.index is not None}
        rebuild = None
        if self.rebuild is not None:
            rebuild_indexes = {n: s.index for n, s in self.rebuild.collections.items() if s.index}
            rebuild = (self.rebuild.model, rebuild_indexes, self.rebuild.token)
        return Catalog(
            self.schema_version,
            self.generation,
            self.model,
            indexes,
            rebuild,
            self.updated,
            self.retired,
            self.retired_versions,
        )


@dataclass(frozen=True)
class Catalog:
    """``catalog.json``: the model, the FAISS index of each collection, a rebuild in progress."""

    schema_version: int
    generation: int
    model: dict[str, Any]
    indexes: dict[str, IndexRecord]
    rebuild: tuple[dict[str, Any], dict[str, IndexRecord], str] | None = None  # model, indexes, token
    updated: float = 0.0
    retired: dict[str, float] = field(default_factory=dict)
    retired_versions: dict[str, float] = field(default_factory=dict)
    engine_version: str = __version__

    def versions(self) -> set[str]:
        """The table versions this catalog's indexes cover, as ``collection@version``."""
        return {f"{name}@{r.version}" for name, r in self.indexes.items() if r.version is not None}

    def files(self) -> set[str]:
        """The FAISS files this catalog names (a rebuild's included)."""
        records = list(self.indexes.values()) + (list(self.rebuild[1].values()) if self.rebuild else [])
        return {f.file for r in records for f in r.files}

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "generation": self.generation,
            "engine_version": self.engine_version,
            "updated": self.updated,
            "model": self.model,
            "indexes": {n: r.to_dict() for n, r in self.indexes.items()},
            "rebuild": None,
            "retired": self.retired,
            "retired_versions": self.retired_versions,
        }
        if self.rebuild is not None:
            model, indexes, token = self.rebuild
            data["rebuild"] = {
                "model": model,
                "indexes": {n: r.to_dict() for n, r in indexes.items()},
                "token": token,
            }
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Catalog:
        data = json.loads(text)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"catalog schema version {version} is not supported (this engine reads {SCHEMA_VERSION})"
            )
        rebuild = data.get("rebuild")
        return cls(
            schema_version=version,
            generation=int(data["generation"]),
            model=dict(data["model"]),
            indexes={k: IndexRecord.from_dict(v) for k, v in data["indexes"].items()},
            rebuild=(
                dict(rebuild["model"]),
                {k: IndexRecord.from_dict(v) for k, v in rebuild["indexes"].items()},
                str(rebuild.get("token", "")),
            )
            if rebuild
            else None,
            updated=float(data.get("updated", 0.0)),
            retired={k: float(v) for k, v in data.get("retired", {}).items()},
            retired_versions={k: float(v) for k, v in data.get("retired_versions", {}).items()},
            engine_version=str(data.get("engine_version", "")),
        )


def _digest(model: dict[str, Any]) -> str | None:
    raw = model.get("fingerprint")
    value = raw.get("digest") if isinstance(raw, dict) else None
    return str(value) if value else None
