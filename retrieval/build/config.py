"""What ``index build`` is asked to do, and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retrieval.ann.faiss_index import IndexConfig
from retrieval.ingest.reader import DEFAULT_DECODE_TIMEOUT
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.model.spec import ModelSpec
from retrieval.store.manifest import IndexRecord

__all__ = ["BuildConfig", "BuildReport", "CollectionReport"]


@dataclass(frozen=True)
class BuildConfig:
    """What ``index build`` does: inputs, output folder, model and how to run it."""

    out: Path = Path("indexes/default")
    images: Path | None = None
    captions: tuple[Path, ...] = ()
    model: ModelSpec = field(default_factory=ModelSpec)
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None  # decode processes; default: all cores but one (at least two)
    rebuild: bool = False
    replace_root: bool = False  # index ``images`` in place of the folder the index holds
    image_shard_rows: int = 4096  # inputs per work item, and so rows per shard at most
    caption_shard_rows: int = 65536  # captions are small: files of about 75 MB, few commits
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT  # seconds for one image; 0: no limit
    index: IndexConfig = field(default_factory=IndexConfig)


@dataclass(frozen=True)
class CollectionReport:
    """One collection after a build. ``indexed + skipped + failed`` is every input seen."""

    indexed: int
    skipped: int
    failed: int
    added: int  # rows written by this build
    encoded: int  # of those, how many went through the model
    reused: int  # of those, how many took the vector of identical content already indexed
    deleted: int  # rows removed from search (inputs gone or changed)
    seconds: float
    refreshed: int = 0  # rows kept with new file stats (touched, same content)
    truncated: int = 0  # of the rows written, captions cut to the tokenizer's limit


@dataclass(frozen=True)
class BuildReport:
    out: Path
    fingerprint: str
    collections: dict[str, CollectionReport]
    seconds: float
    indexes: dict[str, IndexRecord] = field(default_factory=dict)  # the indexes (re)built by this run
    interrupted: bool = False  # stopped early: what it encoded is committed, not yet searchable

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "fingerprint": self.fingerprint,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
            "collections": {
                k: vars(v) | {"seconds": round(v.seconds, 3)} for k, v in self.collections.items()
            },
        }
