"""FAISS indexes over a store's shards: exact, IVF, HNSW and IVF-PQ with an exact re-rank.

``build_collection_index`` streams the live vectors of one collection from its shards, trains on
a bounded sample, adds in bounded batches with the shard ids (never row positions), then tunes the
search parameter (``nprobe`` or ``efSearch``) upward until recall@10 against exact search reaches
the target. The queries for that measurement come from the *other* collection when it exists
(captions against the image index and the reverse), since that is how the index is used;
otherwise from a sample of the collection itself. Exact search, streamed over the shards, is the
oracle. Scores are inner products of unit vectors: cosine similarities.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from retrieval.ann.exact import exact_search
from retrieval.durable import atomic_write
from retrieval.errors import ConfigError, StoreError
from retrieval.store.folder import Store
from retrieval.store.manifest import IndexRecord
from retrieval.vectors import embedding_matrix

__all__ = [
    "IndexConfig",
    "IndexKind",
    "IndexRecord",
    "SearchIndex",
    "build_collection_index",
    "index_ids",
    "live_vectors",
    "sample_vectors",
]

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq", "auto"]
_TRAIN_PER_CENTROID = 39  # FAISS's minimum training points per centroid
_MIN_PQ_BITS = 4  # below 16 centroids per sub-quantizer, product quantization is not worth it
_AUTO_EXACT_MAX = 50_000  # below this, exact search is fast enough that approximation buys nothing
_BLOCK = 65_536
_IVF_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_HNSW_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
# IVF-PQ re-ranks k * factor candidates exactly; the factor is tuned with nprobe.
_REFINE_FACTORS = (4, 16, 64)


@dataclass(frozen=True)
class IndexConfig:
    kind: IndexKind = "auto"
    target_recall: float = 0.95
    memory_budget: int | None = None  # bytes the index may take; None: no limit
    tuning_queries: int = 1000
    train_sample: int = 200_000
    seed: int = 0


def live_vectors(
    store: Store, collection: str, block: int = _BLOCK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids (n,) int64, vectors (n, D) float32)`` blocks of the rows still in search."""
    dim = int(store.manifest.model["fingerprint"]["dim"]) if store.manifest else 0
    for _, table in store.live_rows(collection, ["id", "embedding"]):
        ids = table.column("id").to_numpy()
        vectors = embedding_matrix(table.column("embedding"), dim)
        for start in range(0, len(ids), block):
            yield ids[start : start + block], vectors[start : start + block]


def live_count(store: Store, collection: str) -> int:
    """How many rows of ``collection`` are in search, from the id column alone."""
    return sum(t.num_rows for _, t in store.live_rows(collection, ["id"]))


def _choose(kind: IndexKind, n: int, dim: int, budget: int | None) -> tuple[str, str | None]:
    """The index kind to build, and why when it is not simply the one asked for."""
    if kind == "ivfpq" and _pq_bits(n) < _MIN_PQ_BITS:
        needed = _TRAIN_PER_CENTROID * 2**_MIN_PQ_BITS
        return "flat", f"ivfpq needs at least {needed:,} vectors to train its quantizers, {n:,} here"
    if kind != "auto":
        return kind, None
    if n <= _AUTO_EXACT_MAX:
        return "flat", f"auto: {n:,} vectors, exact search is fast enough"
    if budget is None or n * dim * 4 * 1.1 <= budget:
        return "ivf", f"auto: {n:,} vectors fit the memory budget uncompressed"
    return "ivfpq", f"auto: {n:,} vectors exceed the memory budget uncompressed"


def _pq_bits(n: int) -> int:
    """Bits per product-quantizer code: 8 (256 centroids), fewer when there are not enough vectors
    to give each centroid FAISS's minimum of training points (otherwise FAISS warns per quantizer)."""
    return int(min(8, np.floor(np.log2(max(n // _TRAIN_PER_CENTROID, 1)))))


def _nlist(n: int) -> int:
    # About 4 sqrt(n) lists, and at least 39 training points per list (FAISS's own floor).
    return int(max(1, min(4 * np.sqrt(n), n // 39)))


def _make(kind: str, n: int, dim: int) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, 32, ip)
        inner.hnsw.efConstruction = 80
        return faiss.IndexIDMap2(inner)
    nlist = _nlist(n)
    if kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, ip)
    if kind == "ivfpq":
        m = next(m for m in (dim // 4, dim // 2, dim) if m and dim % m == 0)  # 4 dims a code byte
        pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, _pq_bits(n), ip)
        return faiss.IndexIDMap2(faiss.IndexRefineFlat(pq))
    raise ConfigError(f"unknown index type {kind!r}; use flat, ivf, hnsw, ivfpq or auto")


def sample_vectors(store: Store, collection: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``size`` live vectors, chosen uniformly, read one block at a time."""
    total = live_count(store, collection)
    if total == 0:
        return np.empty((0, 0), dtype=np.float32)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    picked, offset = [], 0
    for ids, vectors in live_vectors(store, collection):
        local = chosen[(chosen >= offset) & (chosen < offset + len(ids))] - offset
        picked.append(vectors[local])
        offset += len(ids)
    return np.ascontiguousarray(np.concatenate(picked))


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
        self, index: faiss.Index, kind: str, param: str | None, value: int | None, refine: int | None = None
    ) -> None:
        self.index = index
        self.kind = kind
        self.param = param
        self.value = value
        self.refine = refine

    def search(
        self, queries: np.ndarray, k: int, allow_ids: np.ndarray | None = None, value: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) float32 -> ids (n, k) int64 (-1 where fewer hits), scores (n, k) float32."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = self._params(allow_ids, self.value if value is None else value)
        with batched_blas():
            scores, ids = self.index.search(queries, k, params=params)
        return ids.astype(np.int64, copy=False), scores

    def _params(self, allow_ids: np.ndarray | None, value: int | None) -> faiss.SearchParameters | None:
        selector = None
        if allow_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allow_ids, dtype=np.int64))
        if self.kind == "ivf":
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


def _exact(store: Store, collection: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and scores of the exact top-k of ``queries``, streamed block by block over the shards."""
    return exact_search(queries, live_vectors(store, collection, block=8192), k)


def recall_at(
    found: np.ndarray,
    truth: np.ndarray,
    found_scores: np.ndarray | None = None,
    truth_scores: np.ndarray | None = None,
    tolerance: float = 1e-5,
) -> float:
    """Mean fraction of each row of ``truth`` (valid ids only) that ``found`` recovers.

    With scores, a found item also counts when it ties the k-th exact score (within
    ``tolerance``): among near-equal scores, which one ranks first is float rounding, not recall.
    """
    hits = total = 0
    for row, (f, t) in enumerate(zip(found, truth, strict=True)):
        valid = t >= 0
        total += int(valid.sum())
        if found_scores is not None and truth_scores is not None and valid.any():
            kth = truth_scores[row][valid].min()
            good = (f >= 0) & (found_scores[row] >= kth - tolerance)
            hits += min(int(good.sum()), int(valid.sum()))
        else:
            hits += len(np.intersect1d(f, t[valid]))
    return hits / total if total else 1.0


def _tune(
    index: SearchIndex, queries: np.ndarray, truth: tuple[np.ndarray, np.ndarray], target: float, limit: int
) -> tuple[int | None, int | None, float]:
    """The cheapest (value, refine) whose recall@k reaches ``target`` (else the most thorough).

    The measured recall must clear the target by two standard errors of its own estimate, so that
    the choice holds on queries other than the ones it was tuned with.
    """
    hits = truth[0].size
    margin = 2 * np.sqrt(target * (1 - target) / max(hits, 1))
    steps = [s for s in (_HNSW_STEPS if index.kind == "hnsw" else _IVF_STEPS) if s <= limit] or [limit]
    factors: tuple[int | None, ...] = _REFINE_FACTORS if index.kind == "ivfpq" else (None,)
    # Cost grows with both: the lists scanned, and the candidates re-ranked.
    trials = sorted(((v, f) for v in steps for f in factors), key=lambda t: t[0] * (t[1] or 1) ** 0.5)
    best = (trials[-1][0], trials[-1][1], -1.0)
    for value, factor in trials:
        index.refine = factor
        ids, scores = index.search(queries, truth[0].shape[1], value=value)
        recall = recall_at(ids, truth[0], scores, truth[1])
        if recall >= min(target + margin, 1.0):
            return value, factor, recall
        if recall > best[2]:
            best = (value, factor, recall)
    return best


def _latency_ms(index: SearchIndex, queries: np.ndarray, k: int) -> float:
    times = []
    for q in queries[:100]:
        start = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


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
    dim = int(store.manifest.model["fingerprint"]["dim"]) if store.manifest else 0
    kind, reason = _choose(config.kind, n, dim, config.memory_budget)
    index = _make(kind, n, dim)
    if not index.is_trained:
        index.train(sample_vectors(store, collection, min(config.train_sample, n), rng))
    for ids, vectors in live_vectors(store, collection):
        index.add_with_ids(np.ascontiguousarray(vectors), ids)

    param = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}.get(kind)
    search_index = SearchIndex(index, kind, param, None)
    if queries is None or len(queries) == 0:
        queries, queries_from = sample_vectors(store, collection, config.tuning_queries, rng), "self"
    else:
        queries = queries[rng.permutation(len(queries))[: config.tuning_queries]]
    k = min(10, n)
    truth = _exact(store, collection, queries, k)
    value: int | None = None
    refine: int | None = None
    if param is None:
        found, found_scores = search_index.search(queries, k)
        recall = recall_at(found, truth[0], found_scores, truth[1])
    else:
        limit = _nlist(n) if kind in ("ivf", "ivfpq") else max(_HNSW_STEPS)
        value, refine, recall = _tune(search_index, queries, truth, config.target_recall, limit)
        search_index.value, search_index.refine = value, refine
    latency = _latency_ms(search_index, queries, k)

    # Named by the catalog write that will record it: a file a reader may hold is never rewritten.
    name = f"faiss/{collection}-{kind}-g{(store.manifest.generation if store.manifest else 0) + 1:06d}.faiss"
    atomic_write(store.folder / name, lambda tmp: faiss.write_index(index, str(tmp)))
    ref = store.file_ref(name, n)
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
    flags = faiss.IO_FLAG_MMAP if record.kind in ("ivf", "ivfpq") and record.file.bytes > 1 << 30 else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise StoreError(f"{path}: unreadable FAISS index: {str(e).splitlines()[0]}") from e
    if index.ntotal != record.rows:
        raise StoreError(f"{path} holds {index.ntotal} vectors, the manifest says {record.rows}")
    return SearchIndex(index, record.kind, record.param, record.value, record.refine)
