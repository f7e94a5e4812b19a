"""Exact k-nearest neighbours of many queries over a matrix too big to score at once: FAISS's BLAS
block search over a chunk of the targets at a time, merged into a running top-k kept in FAISS's
own heaps, with the query's own row left out when queries and targets are the same rows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss
import numpy as np

__all__ = ["CHUNK_ROWS", "drop_self", "faiss_threads", "knn_exact"]

CHUNK_ROWS = 1 << 18  # target rows scored per FAISS call: 256 MB of float32 at 256-d


@contextlib.contextmanager
def faiss_threads(threads: int | None) -> Iterator[None]:
    """FAISS's OpenMP threads set to ``threads`` inside the block, restored after (None: unchanged)."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def knn_exact(
    queries: np.ndarray, targets: np.ndarray, k: int, chunk: int = CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product of ``queries`` (Q, D) among the rows of ``targets`` (N, D).

    ``targets`` may be a memory map: it is read ``chunk`` rows at a time. -> positions (Q, k)
    int64 into ``targets``, best first (-1 where N < k), and scores (Q, k) float32.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, k)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(targets), chunk):
        block = np.ascontiguousarray(targets[start : start + chunk], dtype=np.float32)
        scores, positions = faiss.knn(queries, block, min(k, len(block)), faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(positions >= 0, positions + start, -1))
    heap.finalize()
    return heap.I, heap.D


def drop_self(
    positions: np.ndarray, scores: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """A top-(k+1) of rows searched among themselves -> their top-``k`` without the row itself.

    ``own`` (Q,) is each query's own position. A row whose own position is not in its list (a
    tie of identical vectors pushed it out) loses its last entry instead.
    """
    mine = positions == own[:, None]  # (Q, k+1)
    mine[~mine.any(axis=1), -1] = True
    order = np.argsort(mine, axis=1, kind="stable")[:, :k]  # the others first, in their order
    return np.take_along_axis(positions, order, 1), np.take_along_axis(scores, order, 1)
