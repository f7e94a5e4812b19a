"""FAISS indexes over a store's vectors: exact, IVF, HNSW, and IVF-SQ and IVF-PQ with a re-rank.

``build_collection_index`` does one collection's whole job in four steps:

1. **plan** (``plan_index``, a pure function of the row count, the dimension and the memory budget):
   the kind (``auto`` keeps exact search up to 50,000 vectors, then IVF-Flat while it fits the
   budget, then IVF-SQ's 8-bit codes, else IVF-PQ's 4-bit ones, both re-ranked on the exact vectors
   in a file), IVF's list count and training sample (100 vectors a list, never fewer than FAISS's
   39: fewer lists when the budget cannot hold that many), and the reason ``index info`` shows.
   The default budget is half the memory available when the build starts (``resolve_budget``).
2. **train** on a uniform sample drawn in one pass over the blocks (``sample_vectors``); the
   compressed kinds first find the sample's principal axes (``axes.principal_axes``) and code
   only those;
3. **add** the live vectors block by block with their ids (never row positions); IVF-Flat and
   IVF-SQ first assign every vector to its list, so that each list is allocated once at its final
   size;
4. **tune** the search parameter (``nprobe`` or ``efSearch``, and the compressed kinds' re-rank
   depth) upward until recall@10 against exact search reaches the target. The queries come from
   the *other* collection when it exists (captions against the image index and the reverse), since
   that is how the index is used; otherwise from a sample of the collection itself, each query's
   own row left out of both lists (a query from outside never finds itself).

Memory is the index, the training sample and a block or two of vectors, never the collection.
Exact search, streamed over the blocks, is the oracle. Scores are inner products of unit vectors:
cosine similarities.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from retrieval.ann.axes import PrincipalAxes, principal_axes
from retrieval.ann.calibration import SAMPLE as CALIBRATION_SAMPLE
from retrieval.ann.calibration import calibrate
from retrieval.ann.exact import recall_at, recall_within_ties, tie_groups
from retrieval.ann.rerank import Rerank, RerankWriter
from retrieval.ann.sampling import live_count, live_vectors, sample_vectors, store_dim
from retrieval.ann.sizing import (
    HNSW_LINKS,
    Budget,
    IndexPlan,
    available_memory,
    plan_index,
    pq_m,
    resolve_budget,
)
from retrieval.ann.tuning import HNSW_STEPS, TIE_DEPTH, exact_truth, latency_ms, tune
from retrieval.durable import atomic_write
from retrieval.errors import ConfigError, StoreError
from retrieval.store.folder import Store
from retrieval.store.manifest import IndexRecord

__all__ = [
    "Budget",
    "IndexConfig",
    "IndexKind",
    "IndexPlan",
    "IndexRecord",
    "Rerank",
    "SearchIndex",
    "available_memory",
    "build_collection_index",
    "index_ids",
    "live_vectors",
    "plan_index",
    "recall_at",
    "resolve_budget",
    "sample_vectors",
]

IndexKind = Literal["flat", "ivf", "hnsw", "ivfsq", "ivfpq", "auto"]
_RERANKED = ("ivfsq", "ivfpq")  # kinds whose codes find candidates for an exact re-rank from a file


@dataclass(frozen=True)
class IndexConfig:
    """How ``build_collection_index`` builds and tunes an index.

    ``memory_budget``: bytes the build may hold for the index, its training sample and its blocks
    of vectors; None: half the memory available when the build starts. ``train_sample``: IVF
    training vectors in place of 100 a list (still at most the collection and what the budget
    holds; the list count shrinks so that each list keeps 39); None: sized from the list count.
    """

    kind: IndexKind = "auto"
    target_recall: float = 0.95
    memory_budget: int | None = None
    tuning_queries: int = 1000
    train_sample: int | None = None
    seed: int = 0


def _make(plan: IndexPlan, axes: PrincipalAxes | None = None) -> faiss.Index:
    dim, ip = plan.dim, faiss.METRIC_INNER_PRODUCT
    # Outer id maps are IndexIDMap: IndexIDMap2's reverse map would cost ~50 bytes a vector.
    if plan.kind == "flat":
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    if plan.kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, HNSW_LINKS, ip)
        graph.hnsw.efConstruction = 80
        return faiss.IndexIDMap(graph)
    if plan.kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, plan.nlist, ip)
    # The compressed kinds code the principal axes, keep the row ids in their lists, and re-rank on
    # a file beside them (``Rerank``); the rotation is part of the saved index.
    assert axes is not None
    kept = axes.kept
    quantizer = faiss.IndexFlatIP(kept)
    inner: faiss.Index
    if plan.kind == "ivfsq":
        inner = faiss.IndexIVFScalarQuantizer(quantizer, kept, plan.nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    else:
        inner = faiss.IndexIVFPQFastScan(quantizer, kept, plan.nlist, pq_m(kept), plan.pq_bits, ip)
    return faiss.IndexPreTransform(axes.transform(), inner)


Blocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
BlockSink = Callable[[np.ndarray, np.ndarray], None]


def _add(
    index: faiss.Index,
    kind: str,
    blocks: Blocks,
    n: int,
    sink: BlockSink | None = None,
    axes: PrincipalAxes | None = None,
) -> None:
    """Add every vector that ``blocks()`` yields, with its id, one block at a time (and hand each
    block to ``sink``: the compressed kinds' re-rank file)."""
    if kind in ("ivf", "ivfsq"):
        _add_ivf(index, blocks, n, sink, axes)
        return
    for ids, vectors in blocks():
        index.add_with_ids(vectors, ids)
        if sink is not None:
            sink(ids, vectors)


def _add_ivf(
    index: faiss.Index,
    blocks: Blocks,
    n: int,
    sink: BlockSink | None = None,
    axes: PrincipalAxes | None = None,
) -> None:
    """Add to an IVF-Flat or IVF-SQ in two passes over the blocks. The first assigns each vector to
    its list (4 bytes a vector kept); every list is then allocated once at its final size, sparing
    the ~40% that lists grown block by block hold in spare capacity. The second adds each block to
    the lists already assigned, without assigning it again. ``axes``: the rotation the lists'
    vectors are coded in (IVF-SQ), applied here since the lists are filled below it."""

    def coded(vectors: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(vectors if axes is None else axes.apply(vectors), dtype=np.float32)

    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    assert invlists is not None  # a new IVF index owns its (empty) lists
    lists = np.empty(n, dtype=np.int32)
    start = 0
    for _, vectors in blocks():
        if start + len(vectors) > n:
            raise StoreError(f"more than the {n:,} rows counted were read: the rows changed during the build")
        lists[start : start + len(vectors)] = ivf.quantizer.assign(coded(vectors), 1).ravel()
        start += len(vectors)
    sizes = np.bincount(lists[:start], minlength=ivf.nlist)
    for number in np.flatnonzero(sizes):
        # Grown to its final size and emptied again, a list keeps that capacity (std::vector).
        invlists.resize(int(number), int(sizes[number]))
        invlists.resize(int(number), 0)
    start = 0
    for ids, vectors in blocks():
        assigned = lists[start : start + len(ids)].astype(np.int64)
        if len(assigned) != len(ids):
            raise StoreError(f"more than the {n:,} rows counted were read: the rows changed during the build")
        ivf.add_core(
            len(ids),
            faiss.swig_ptr(coded(vectors)),
            faiss.swig_ptr(np.ascontiguousarray(ids, dtype=np.int64)),
            faiss.swig_ptr(assigned),
        )
        if sink is not None:
            sink(ids, vectors)
        start += len(ids)
    index.ntotal = ivf.ntotal  # filled below a rotation: the outer index counts them too


class _BatchedBlas:
    """FAISS switches exact search to BLAS only from ``distance_compute_blas_threshold`` queries
    (500 at d=256 by default); batched queries from a pipeline are usually fewer, and BLAS is several
    times faster for them. The threshold is one value for the whole process, so it is lowered only
    while an engine search runs (counted across threads) and restored when the last one ends."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.lock = threading.Lock()
        self.active = 0
        self.saved = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.active == 0:
                self.saved = faiss.cvar.distance_compute_blas_threshold
                faiss.cvar.distance_compute_blas_threshold = min(self.saved, self.threshold)
            self.active += 1
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1
                if self.active == 0:
                    faiss.cvar.distance_compute_blas_threshold = self.saved


batched_blas = _BatchedBlas(16)


class SearchIndex:
    """A loaded FAISS index with its tuned parameter; ``search`` takes an optional id allow-list."""

    def __init__(
        self,
        index: faiss.Index,
        kind: str,
        param: str | None,
        value: int | None,
        refine: int | None = None,
        rerank: Rerank | None = None,
    ) -> None:
        self.index = index
        self.kind = kind
        self.param = param
        self.value = value
        self.refine = refine
        self.rerank = rerank  # IVF-SQ, IVF-PQ: the re-rank file (None: one that re-ranks inside FAISS)

    def search(
        self, queries: np.ndarray, k: int, allow_ids: np.ndarray | None = None, value: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) float32 -> ids (n, k) int64 (-1 where fewer hits), scores (n, k) float32."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = self._params(allow_ids, self.value if value is None else value)
        if self.rerank is not None:
            with batched_blas():
                _, candidates = self.index.search(queries, k * (self.refine or 1), params=params)
            return self.rerank(queries, candidates.astype(np.int64, copy=False), k)
        with batched_blas():
            scores, ids = self.index.search(queries, k, params=params)
        return ids.astype(np.int64, copy=False), scores

    def _params(self, allow_ids: np.ndarray | None, value: int | None) -> faiss.SearchParameters | None:
        selector = None
        if allow_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allow_ids, dtype=np.int64))
        if self.kind in ("ivf", "ivfsq") or (self.kind == "ivfpq" and self.rerank is not None):
            return faiss.SearchParametersIVF(sel=selector, nprobe=value or 1)
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=value or 16)
        if self.kind == "ivfpq":
            # The refine stage passes only base_index_params down, so the selector must speak the
            # inner index's positions rather than the ids the outer IDMap translates.
            if allow_ids is not None:
                positions = np.flatnonzero(np.isin(faiss.vector_to_array(self.index.id_map), allow_ids))
                selector = faiss.IDSelectorBatch(positions.astype(np.int64))
            base = faiss.SearchParametersIVF(sel=selector, nprobe=value or 1)
            return faiss.IndexRefineSearchParameters(k_factor=self.refine or 1, base_index_params=base)
        return faiss.SearchParameters(sel=selector) if selector is not None else None


def build_collection_index(
    store: Store, collection: str, config: IndexConfig, queries: np.ndarray | None, queries_from: str
) -> IndexRecord | None:
    """Build, tune and write the index of ``collection``; ``None`` if it has no live rows.

    ``queries`` are the other collection's vectors (or None: a sample of this one is used).
    The caller commits the returned record through the manifest.
    """
    if not 0 < config.target_recall <= 1:
        raise ConfigError("target recall must be in (0, 1]")
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    n = live_count(store, collection)
    if n == 0:
        return None
    plan = plan_index(
        config.kind, n, store_dim(store), resolve_budget(config.memory_budget), config.train_sample
    )
    kind, reason = plan.kind, plan.reason
    # Named by the catalog write that will record them: a file a reader may hold is never rewritten.
    stem = f"faiss/{collection}-{kind}-g{(store.manifest.generation if store.manifest else 0) + 1:06d}"
    axes: PrincipalAxes | None = None
    kept: np.ndarray | None = None  # a few thousand of the training sample, for the calibration
    if kind in ("flat", "hnsw"):
        index = _make(plan)
    else:
        sample = sample_vectors(store, collection, plan.train, rng)
        if kind in _RERANKED:
            axes = principal_axes(sample)
            reason = f"{reason}; coded {axes.describe()}" if reason else f"coded {axes.describe()}"
        index = _make(plan, axes)
        index.train(sample)
        kept = sample[np.random.default_rng([config.seed, 1]).permutation(len(sample))[:CALIBRATION_SAMPLE]]
        del sample
    rerank: Rerank | None = None
    if kind in _RERANKED:
        dim = store_dim(store)

        def fill(tmp: Path) -> None:
            writer = RerankWriter(tmp, n, dim)
            try:
                _add(index, kind, lambda: live_vectors(store, collection), n, writer, axes)
            finally:
                writer.close()

        atomic_write(store.folder / f"{stem}.rerank", fill)
        rerank = Rerank(store.folder / f"{stem}.rerank", n, dim, release=True)
    else:
        _add(index, kind, lambda: live_vectors(store, collection), n)
    if index.ntotal != n:
        raise StoreError(f"{collection}: {index.ntotal:,} vectors read, {n:,} counted: the rows changed")

    others = {} if queries is None or queries_from == "self" else {queries_from: queries}
    calibration = calibrate(store, collection, others, config.seed, kept)
    del kept
    param = {"ivf": "nprobe", "ivfsq": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(kind)
    search_index = SearchIndex(index, kind, param, None, rerank=rerank)
    if queries is None or len(queries) == 0:
        queries, queries_from = sample_vectors(store, collection, config.tuning_queries, rng), "self"
    else:
        queries = queries[rng.permutation(len(queries))[: config.tuning_queries]]
    skip = 1 if queries_from == "self" and n > 1 else 0
    k = min(10, n - skip)
    truth = exact_truth(store, collection, queries, min(k + skip + TIE_DEPTH, n))
    ties = tie_groups(queries, lambda: live_vectors(store, collection, block=8192), truth, k + skip)
    value: int | None = None
    refine: int | None = None
    if param is None:
        found, _ = search_index.search(queries, k + skip)
        recall = recall_within_ties(found[:, skip:], truth[0][:, skip:], truth[1][:, skip:], ties=ties)
    else:
        limit = plan.nlist if kind in ("ivf", *_RERANKED) else max(HNSW_STEPS)
        value, refine, recall = tune(search_index, queries, truth, k, config.target_recall, limit, skip, ties)
        search_index.value, search_index.refine = value, refine
    latency = latency_ms(search_index, queries, k)

    name = f"{stem}.faiss"
    atomic_write(store.folder / name, lambda tmp: faiss.write_index(index, str(tmp)))
    ref = store.file_ref(name, n)
    rerank_ref = store.file_ref(f"{stem}.rerank", n) if rerank is not None else None
    seconds = round(time.perf_counter() - started, 3)
    return IndexRecord(
        ref,
        kind,
        n,
        param,
        value,
        refine,
        round(recall, 4),
        round(latency, 3),
        queries_from,
        seconds,
        reason=reason,
        requested=config.kind,
        rerank=rerank_ref,
        calibration=calibration,
    )


def index_ids(index: faiss.Index) -> np.ndarray | None:
    """The ids ``index`` holds, (n,) int64 in its own order; None for a kind that cannot list them."""
    if hasattr(index, "id_map"):  # IndexIDMap2 (flat, HNSW, IVF-PQ with re-rank)
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    lists = ivf.invlists if ivf is not None else None
    if ivf is None or lists is None:
        return None
    parts = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def load_index(store: Store, record: IndexRecord) -> SearchIndex:
    """Read an index after checking its sha256 (memory-mapped when large and IVF)."""
    path: Path = store.folder / record.file.file
    store.verify(record.file)
    flags = faiss.IO_FLAG_MMAP if record.kind in ("ivf", *_RERANKED) and record.file.bytes > 1 << 30 else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise StoreError(f"{path}: unreadable FAISS index: {str(e).splitlines()[0]}") from e
    if index.ntotal != record.rows:
        raise StoreError(f"{path} holds {index.ntotal} vectors, the catalog says {record.rows}")
    rerank = None
    if record.rerank is not None:
        store.verify(record.rerank)
        rerank = Rerank(store.folder / record.rerank.file, record.rows, index.d)
    return SearchIndex(index, record.kind, record.param, record.value, record.refine, rerank)
