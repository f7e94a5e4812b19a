"""Retrieval metrics over blocks of candidate vectors: exact top-k, gold ranks, recall@K.

The standard image-text protocol: every query (a caption, or an image) has a set of *gold*
candidates (its image, or its captions), and its rank is where the first gold one lands. Ties
count against the query: the rank is one plus the number of non-gold candidates that score at
least as high as the best gold one (within ``TIE_TOLERANCE``), so a model that maps everything to
one point scores the worst possible ranks rather than the best. Candidates arrive in blocks, as
``(ids (b,), vectors (b, D))``, so a collection of any size is scanned in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.ann.exact import SCORE_CELLS, TopK

__all__ = [
    "TIE_TOLERANCE",
    "RankSummary",
    "exact_scan",
    "gold_matrix",
    "ranks_in_results",
    "summarize",
]

# Scores closer than this are a tie: float rounding differs between BLAS block shapes.
TIE_TOLERANCE = 1e-6


def gold_matrix(groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Ragged gold ids per query -> (Q, G) int64, padded with -1."""
    width = max((len(g) for g in groups), default=0)
    out = np.full((len(groups), max(width, 1)), -1, dtype=np.int64)
    for row, group in enumerate(groups):
        out[row, : len(group)] = group
    return out


def exact_scan(
    queries: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    gold: np.ndarray | None = None,
    best_gold: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One pass over the candidates: exact top-k, and the gold ranks when gold is given.

    ``queries`` (Q, D) float32; ``gold`` (Q, G) int64 candidate ids padded with -1; ``best_gold``
    (Q,) the best gold score of each query. Returns ``ids (Q, k)``, ``scores (Q, k)`` and
    ``ranks (Q,)`` int64 (``None`` without gold): 1 + the non-gold candidates scoring at least
    ``best_gold - TIE_TOLERANCE``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    top = TopK(len(queries), k)
    ahead = np.zeros(len(queries), dtype=np.int64) if gold is not None else None
    threshold = None if best_gold is None else (best_gold - TIE_TOLERANCE)[:, None]
    for ids, vectors in blocks:
        step = max(1, SCORE_CELLS // max(len(ids), 1))
        order = np.argsort(ids, kind="stable")
        for start in range(0, len(queries), step):
            rows = slice(start, start + step)
            scores = queries[rows] @ vectors.T  # (q, b)
            top.add(ids, scores, rows)
            if ahead is not None and gold is not None and threshold is not None:
                at_least = scores >= threshold[rows]
                at_least[_gold_cells(gold[rows], ids, order)] = False
                ahead[rows] += at_least.sum(axis=1)
    ranks = None if ahead is None else ahead + 1
    return top.ids, top.scores, ranks


def _gold_cells(gold: np.ndarray, ids: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) cells of a (q, b) score block whose candidate is one of the row's gold ids."""
    sorted_ids = ids[order]
    position = np.clip(np.searchsorted(sorted_ids, gold), 0, max(len(ids) - 1, 0))
    present = (gold >= 0) & (sorted_ids[position] == gold) if len(ids) else np.zeros_like(gold, bool)
    rows, slots = np.nonzero(present)
    return rows, order[position[rows, slots]]


def ranks_in_results(ids: np.ndarray, scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Gold ranks inside search results ``ids``/``scores`` (Q, depth); 0 where no gold was found.

    The same tie rule as ``exact_scan``, applied to the returned list.
    """
    is_gold = (ids[:, :, None] == gold[:, None, :]).any(axis=2) & (ids >= 0)  # (Q, depth)
    found = is_gold.any(axis=1)
    best = np.where(is_gold, scores, -np.inf).max(axis=1, initial=-np.inf)  # (Q,)
    ahead = ((scores >= (best - TIE_TOLERANCE)[:, None]) & ~is_gold & (ids >= 0)).sum(axis=1)
    return np.where(found, ahead + 1, 0).astype(np.int64)


@dataclass(frozen=True)
class RankSummary:
    """Recall@K, median and mean rank of one set of queries.

    ``ranks`` of 0 mean "not found within ``depth``" (a search that returns only ``depth``
    results): they count as misses, and the median or mean is ``None`` when it would depend on them.
    """

    queries: int
    recall: dict[int, float]
    median_rank: float | None
    mean_rank: float | None


def summarize(ranks: np.ndarray, ks: Sequence[int], depth: int | None = None) -> RankSummary:
    """``ranks`` (Q,) int64, 1-based, 0 = beyond ``depth`` (``depth=None``: every rank is known)."""
    n = len(ranks)
    found = ranks > 0
    recall = {int(k): float(((ranks <= k) & found).mean()) if n else 0.0 for k in ks}
    if n == 0:
        return RankSummary(0, recall, None, None)
    if depth is None or found.all():
        known = ranks.astype(np.float64)
        return RankSummary(n, recall, float(np.median(known)), float(known.mean()))
    # Misses rank after every found one, so the median is known while fewer than half missed.
    ordered = np.sort(np.where(found, ranks, np.iinfo(np.int64).max))
    middle = ordered[(n - 1) // 2], ordered[n // 2]
    median = float(np.mean(middle)) if max(middle) != np.iinfo(np.int64).max else None
    return RankSummary(n, recall, median, None)
