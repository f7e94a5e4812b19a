"""Every item's nearest items: the top-k of each live row of one collection among the rows of
another (or the same one, itself left out), for item-to-item candidates and duplicate finding.

Exact by default: FAISS's BLAS block search over the target vectors, read from a memory-mapped
copy (``VectorFile``), a block of source rows at a time. Or through the collection's FAISS index,
with its recall against exact search measured on a sample of the sources and reported.

``write_neighbors`` is the resumable job behind ``retrieval neighbors``: each block of source rows
is written as its own Parquet file in a folder beside the output (``<out>.parts/``) as soon as it
is done, so a run stopped at any point redoes at most the blocks in flight; the blocks are joined
into the output at the end, which names the table versions it was computed from in its metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.ann.exact import recall_at
from retrieval.ann.faiss_index import SearchIndex
from retrieval.ann.knn import drop_self, faiss_threads, knn_exact
from retrieval.durable import atomic_write
from retrieval.errors import ConfigError, StoreError
from retrieval.progress import Progress, Silent
from retrieval.search.vectorfile import VectorFile
from retrieval.store.folder import Store

if TYPE_CHECKING:
    from retrieval.search.retriever import Retriever

__all__ = [
    "NEIGHBORS_SCHEMA",
    "Method",
    "NeighborBlock",
    "NeighborSearch",
    "NeighborsConfig",
    "NeighborsReport",
    "read_neighbors_metadata",
    "write_neighbors",
]

Method = Literal["exact", "index"]
METADATA_KEY = b"retrieval.neighbors"
NEIGHBORS_SCHEMA = pa.schema(
    [("id", pa.int64()), ("neighbor_ids", pa.list_(pa.int64())), ("scores", pa.list_(pa.float32()))]
)


@dataclass(frozen=True)
class NeighborsConfig:
    """What to compute: each ``source`` row's top ``k`` in ``target``, by ``method``.

    ``block_rows`` source rows are searched (and, by ``write_neighbors``, checkpointed) at a
    time; ``recall_sample`` sources measure an index's recall; ``distinct``: one row per content
    (files of identical bytes count once, as their smallest id), as duplicate finding wants.
    """

    source: str = "images"
    target: str = "images"
    k: int = 50
    method: Method = "exact"
    block_rows: int = 16_384
    recall_sample: int = 1_000
    threads: int | None = None
    distinct: bool = False
    seed: int = 0

    def check(self) -> None:
        for name in (self.source, self.target):
            if name not in ("images", "captions"):
                raise ConfigError(f"collections are images or captions, got {name!r}")
        if self.k < 1:
            raise ConfigError("k must be at least 1")
        if self.method not in ("exact", "index"):
            raise ConfigError(f"method must be exact or index, got {self.method!r}")
        if self.block_rows < 1:
            raise ConfigError("block rows must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True)
class NeighborBlock:
    """Block ``number``: ``ids`` (b,) int64 of its source rows, ascending; ``neighbor_ids`` (b, k)
    int64 best first, -1 where the target has fewer; ``scores`` (b, k) float32 cosines."""

    number: int
    ids: np.ndarray
    neighbor_ids: np.ndarray
    scores: np.ndarray

    def table(self) -> pa.Table:
        """The block as rows of ``NEIGHBORS_SCHEMA`` (padding left out of the lists)."""
        valid = self.neighbor_ids >= 0
        offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
        return pa.Table.from_arrays(
            [
                pa.array(self.ids, pa.int64()),
                pa.ListArray.from_arrays(offsets, pa.array(self.neighbor_ids[valid], pa.int64())),
                pa.ListArray.from_arrays(offsets, pa.array(self.scores[valid], pa.float32())),
            ],
            schema=NEIGHBORS_SCHEMA,
        )


@dataclass(frozen=True)
class NeighborsReport:
    """What ``write_neighbors`` did."""

    out: Path
    rows: int
    k: int
    source: str
    target: str
    method: Method
    versions: dict[str, int]
    recall: float | None  # method "index": recall@k against exact search on a sample
    blocks: int
    resumed_blocks: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"out": str(self.out)}


class NeighborSearch:
    """The top-k of every row of ``config.source`` in ``config.target``, a block at a time.

    ``scratch`` holds the memory-mapped vectors (reused by a later search of the same versions);
    ``index`` is the target's FAISS index, needed for method ``index``.
    """

    def __init__(
        self,
        store: Store,
        config: NeighborsConfig,
        scratch: Path,
        index: SearchIndex | None = None,
        progress: Progress | None = None,
    ) -> None:
        config.check()
        if config.method == "index" and index is None:
            raise ConfigError("method index needs the target collection's FAISS index")
        self.config = config
        self.index = index
        self.targets = VectorFile.of(
            store, config.target, scratch, distinct=config.distinct, progress=progress
        )
        self.same = config.source == config.target
        self.sources = (
            self.targets
            if self.same
            else VectorFile.of(store, config.source, scratch, distinct=config.distinct, progress=progress)
        )
        self.versions = {config.source: self.sources.version, config.target: self.targets.version}

    @property
    def rows(self) -> int:
        return len(self.sources)

    @property
    def block_count(self) -> int:
        return -(-self.rows // self.block_rows)

    @property
    def block_rows(self) -> int:
        """Source rows a block: as configured, fewer where k is so large that a block's lists
        would pass 16M entries."""
        return max(1, min(self.config.block_rows, (1 << 24) // (self.config.k + 1)))

    def block_ids(self, number: int) -> np.ndarray:
        return self.sources.ids[number * self.block_rows : (number + 1) * self.block_rows]

    def block(self, number: int) -> NeighborBlock:
        """Block ``number`` of the source rows, searched."""
        size = self.block_rows
        start = number * size
        ids = self.sources.ids[start : start + size]
        queries = np.ascontiguousarray(self.sources.vectors[start : start + size], dtype=np.float32)
        found, scores = self.search(queries, ids, self.config.method)
        return NeighborBlock(number, ids, found, scores)

    def blocks(self, skip: frozenset[int] = frozenset()) -> Iterator[NeighborBlock]:
        for number in range(self.block_count):
            if number not in skip:
                yield self.block(number)

    def search(self, queries: np.ndarray, ids: np.ndarray, method: Method) -> tuple[np.ndarray, np.ndarray]:
        """Queries (b, D) that are the source rows ``ids`` -> neighbour ids (b, k), scores (b, k)."""
        k = self.config.k
        wanted = min(k + self.same, len(self.targets))
        if wanted <= 0:
            return np.full((len(ids), k), -1, np.int64), np.full((len(ids), k), -np.inf, np.float32)
        with faiss_threads(self.config.threads):
            if method == "exact":
                positions, scores = knn_exact(queries, self.targets.vectors, wanted)
                found = np.where(positions >= 0, self.targets.ids[np.maximum(positions, 0)], -1)
            else:
                assert self.index is not None
                allow = self.targets.ids if self.config.distinct else None
                found, scores = self.index.search(queries, wanted, allow)
        if self.same:
            found, scores = drop_self(found, scores, ids, wanted - 1)
        pad = k - found.shape[1]
        if pad > 0:
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        scores = np.where(found >= 0, scores, -np.inf).astype(np.float32, copy=False)
        return found, scores

    def recall(self) -> float | None:
        """Method ``index``: recall@k of the index against exact search on a seeded sample of the
        sources (a tie at the k-th exact score counts either way); exact search: None."""
        if self.config.method == "exact" or not self.rows:
            return None
        rng = np.random.default_rng(self.config.seed)
        rows = np.sort(rng.choice(self.rows, min(self.config.recall_sample, self.rows), replace=False))
        queries = np.ascontiguousarray(self.sources.vectors[rows], dtype=np.float32)
        ids = self.sources.ids[rows]
        found, found_scores = self.search(queries, ids, "index")
        truth, truth_scores = self.search(queries, ids, "exact")
        return recall_at(found, truth, found_scores, truth_scores)


def write_neighbors(
    retriever: Retriever,
    out: str | Path,
    config: NeighborsConfig | None = None,
    progress: Progress | None = None,
) -> NeighborsReport:
    """Every live ``config.source`` item's top-k in ``config.target`` -> Parquet at ``out``.

    One row per source item: ``id`` int64, ``neighbor_ids`` list<int64> best first, ``scores``
    list<float32>; the file's metadata (``read_neighbors_metadata``) names the table versions, the
    model and, for method ``index``, the index and its measured recall. Resumable: run again with
    the same arguments after a stop and only the blocks not yet written (or found damaged) are
    computed; a run over other table versions, another index or other arguments starts over. Two
    runs writing the same ``out`` at once: the second is refused.
    """
    config = config or NeighborsConfig()
    config.check()
    progress = progress or Silent()
    started = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder: --out names the Parquet file to write")
    parts = out.with_name(out.name + ".parts")
    index = retriever.index(config.target) if config.method == "index" else None  # type: ignore[arg-type]
    record = retriever.store.state(config.target).index if index is not None else None
    versions = {c: retriever.store.state(c).version for c in {config.source, config.target}}
    # What the results depend on: threads and the recall sample do not change a list.
    what = dataclasses.asdict(config) | {"threads": None, "recall_sample": None}
    job = what | {
        "versions": versions,
        "fingerprint": retriever.manifest.fingerprint,
        "index": None if record is None else [record.file.file, record.kind, record.value, record.refine],
    }
    parts.mkdir(parents=True, exist_ok=True)
    with _job_lock(parts, out):
        if _read_job(parts) != job:
            _clear(parts)  # other versions, index or arguments: nothing of it can be reused
        atomic_write(parts / "job.json", lambda tmp: tmp.write_text(json.dumps(job, sort_keys=True)))
        search = NeighborSearch(retriever.store, config, parts, index, progress)
        done = frozenset(n for n in range(search.block_count) if _block_done(search, parts, n))
        progress.start("neighbors", search.rows)
        progress.advance(min(search.rows, sum(len(search.block_ids(n)) for n in done)))
        for block in search.blocks(skip=done):
            _write_block(parts, block)
            progress.advance(len(block.ids))
        progress.finish()
        recall = search.recall()
        metadata = {
            "source": config.source,
            "target": config.target,
            "k": config.k,
            "method": config.method,
            "distinct": config.distinct,
            "versions": search.versions,
            "fingerprint": retriever.manifest.fingerprint,
            "recall_at_k": recall,
            "index": None if index is None else {"kind": index.kind, index.param or "param": index.value},
        }
        schema = NEIGHBORS_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})

        def join(tmp: Path) -> None:
            with pq.ParquetWriter(tmp, schema) as writer:
                for number in range(search.block_count):
                    writer.write_table(pq.read_table(_block_file(parts, number)).cast(schema))

        atomic_write(out, join)
        _clear(parts)
    shutil.rmtree(parts, ignore_errors=True)
    return NeighborsReport(
        out,
        search.rows,
        config.k,
        config.source,
        config.target,
        config.method,
        search.versions,
        recall,
        search.block_count,
        len(done),
        time.perf_counter() - started,
    )


def read_neighbors_metadata(path: str | Path) -> dict[str, Any]:
    """What a ``write_neighbors`` file was computed from (versions, k, method, recall)."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}


def neighbor_blocks(
    retriever: Retriever, config: NeighborsConfig, scratch: Path | None = None
) -> Iterator[NeighborBlock]:
    """``Retriever.neighbors``: the blocks, the vectors copied into a temporary folder (under
    ``scratch``, default the system's) removed at the end."""
    index = retriever.index(config.target) if config.method == "index" else None  # type: ignore[arg-type]
    scratch = Path(tempfile.mkdtemp(prefix="neighbors-", dir=scratch))
    try:
        yield from NeighborSearch(retriever.store, config, scratch, index).blocks()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _job_lock(parts: Path, out: Path) -> Iterator[None]:
    """The checkpoint folder, held by this run alone (a lock the system drops if the run dies)."""
    fd = os.open(parts / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError(f"{out} is being written by another run (its checkpoints: {parts})") from None
        yield
    finally:
        os.close(fd)


def _read_job(parts: Path) -> Any:
    try:
        return json.loads((parts / "job.json").read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: started over


def _clear(parts: Path) -> None:
    """Everything in the checkpoint folder but its lock."""
    for path in parts.iterdir():
        if path.name != ".lock":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _block_done(search: NeighborSearch, parts: Path, number: int) -> bool:
    """Block ``number`` is checkpointed whole: readable, its ids the ones it must hold. A file that
    is not is removed, and the block is computed again."""
    path = _block_file(parts, number)
    if not path.is_file():
        return False
    try:
        ids = pq.read_table(path, columns=["id"]).column("id").to_numpy()
        if np.array_equal(ids, search.block_ids(number)):
            return True
    except (OSError, pa.ArrowException):
        pass
    path.unlink()
    return False


def _write_block(parts: Path, block: NeighborBlock) -> None:
    table = block.table()
    atomic_write(_block_file(parts, block.number), lambda tmp: pq.write_table(table, tmp))


def _block_file(parts: Path, number: int) -> Path:
    return parts / f"block-{number:06d}.parquet"
