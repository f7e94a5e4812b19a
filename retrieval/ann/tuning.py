"""Tuning an index's search parameter against exact search (``build_collection_index``'s 4th step).

``tune`` raises ``nprobe`` or ``efSearch`` (and the compressed kinds' re-rank depth) until
recall@10 against the exact neighbours (``exact_truth``) reaches the target.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from retrieval.ann.exact import exact_search, recall_within_ties
from retrieval.ann.sampling import live_vectors
from retrieval.store.folder import Store

if TYPE_CHECKING:
    from retrieval.ann.faiss_index import SearchIndex

__all__ = ["HNSW_STEPS", "TIE_DEPTH", "exact_truth", "latency_ms", "tune"]

_IVF_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
HNSW_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
# The compressed kinds re-rank k * factor candidates; the factor is tuned with nprobe. IVF-SQ's 8-bit
# codes rank nearly as the vectors do; IVF-PQ's 4-bit codes need many more candidates.
_REFINE_FACTORS = {"ivfsq": (1, 2, 4, 8), "ivfpq": (4, 16, 64, 256)}
TIE_DEPTH = 10  # exact neighbours kept past k, so that a found one tied with the k-th counts


def exact_truth(store: Store, collection: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and scores of the exact top-k of ``queries``, streamed block by block over the shards."""
    return exact_search(queries, live_vectors(store, collection, block=8192), k)


def tune(
    index: SearchIndex,
    queries: np.ndarray,
    truth: tuple[np.ndarray, np.ndarray],
    k: int,
    target: float,
    limit: int,
    skip: int = 0,
    ties: Mapping[int, np.ndarray] | None = None,
) -> tuple[int | None, int | None, float]:
    """The cheapest (value, refine) whose recall@k reaches ``target`` (else the most thorough).

    The measured recall must clear the target by two standard errors of its own estimate, so that
    the choice holds on queries other than the ones it was tuned with. ``skip``: leading columns
    of both lists not scored (1: the queries are rows of the index, and find themselves first).
    ``ties``: the ties that run past the exact list (``exact.tie_groups``).
    """
    margin = 2 * np.sqrt(target * (1 - target) / max(len(queries) * k, 1))
    steps = [s for s in (HNSW_STEPS if index.kind == "hnsw" else _IVF_STEPS) if s <= limit] or [limit]
    factors: tuple[int | None, ...] = _REFINE_FACTORS.get(index.kind, (None,))
    # Cost grows with both: the lists scanned, and the candidates re-ranked.
    trials = sorted(((v, f) for v in steps for f in factors), key=lambda t: t[0] * (t[1] or 1) ** 0.5)
    best = (trials[-1][0], trials[-1][1], -1.0)
    for value, factor in trials:
        index.refine = factor
        ids, _ = index.search(queries, k + skip, value=value)
        recall = recall_within_ties(ids[:, skip:], truth[0][:, skip:], truth[1][:, skip:], ties=ties)
        if recall >= min(target + margin, 1.0):
            return value, factor, recall
        if recall > best[2]:
            best = (value, factor, recall)
    return best


def latency_ms(index: SearchIndex, queries: np.ndarray, k: int) -> float:
    """The median time of one query alone, over up to 100 of ``queries``, in milliseconds."""
    times = []
    for q in queries[:100]:
        start = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)
