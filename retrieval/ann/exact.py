"""Exact search by blocks: a running top-k over candidates that arrive as ``(ids, vectors)`` blocks,
the oracle every approximate index is measured against, and recall against it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

__all__ = ["SCORE_CELLS", "TopK", "exact_search", "recall_at", "recall_within_ties", "tie_groups"]

SCORE_CELLS = 1 << 24  # query rows x block columns scored at a time (64 MB of float32)


class TopK:
    """The running exact top-``k`` of ``n`` queries, merged block by block."""

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.scores = np.full((n, k), -np.inf, dtype=np.float32)
        self.ids = np.full((n, k), -1, dtype=np.int64)

    def add(self, ids: np.ndarray, scores: np.ndarray, rows: slice = slice(None)) -> None:
        """Merge ``scores`` (q, b) of candidates ``ids`` (b,) into the query rows ``rows``."""
        top = min(self.k, scores.shape[1])
        if top == 0:
            return
        part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        merged_scores = np.concatenate([self.scores[rows], np.take_along_axis(scores, part, 1)], axis=1)
        merged_ids = np.concatenate([self.ids[rows], ids[part]], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, : self.k]
        self.scores[rows] = np.take_along_axis(merged_scores, order, 1)
        self.ids[rows] = np.take_along_axis(merged_ids, order, 1)


def exact_search(
    queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries`` (Q, D) float32 over the blocks -> ids (Q, k) int64, scores (Q, k)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    top = TopK(len(queries), k)
    for ids, vectors in blocks:
        step = max(1, SCORE_CELLS // max(len(ids), 1))
        for start in range(0, len(queries), step):
            rows = slice(start, start + step)
            top.add(ids, queries[rows] @ vectors.T, rows)  # (q, b) scores
    return top.ids, top.scores


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


def recall_within_ties(
    found: np.ndarray,
    truth: np.ndarray,
    truth_scores: np.ndarray,
    tolerance: float = 1e-5,
    ties: Mapping[int, np.ndarray] | None = None,
) -> float:
    """Recall@k of ``found`` (Q, k) ids against an exact list that runs past k (Q, k' >= k).

    A found id counts when the exact list scores it within ``tolerance`` of its k-th score, so
    that ties (duplicate vectors) count either way. Unlike ``recall_at``, the found scores are not
    used: an index that re-ranks on quantized vectors returns approximate scores, and those must
    not let a near miss pass for a hit. ``ties``: for the queries whose tie at the k-th score runs
    past the list, every id in it (``tie_groups``), used in place of the list.
    """
    k = found.shape[1]
    hits = total = 0
    for row, (f, t, s) in enumerate(zip(found, truth, truth_scores, strict=True)):
        valid = t[:k] >= 0
        wanted = int(valid.sum())
        total += wanted
        if wanted:
            if ties is not None and row in ties:
                tied = ties[row]
            else:
                tied = t[(t >= 0) & (s >= s[:k][valid].min() - tolerance)]
            hits += min(len(np.intersect1d(f[f >= 0], tied)), wanted)
    return hits / total if total else 1.0


def tie_groups(
    queries: np.ndarray,
    blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    truth: tuple[np.ndarray, np.ndarray],
    k: int,
    tolerance: float = 1e-5,
    cap: int = 4096,
) -> dict[int, np.ndarray]:
    """The whole tie at the k-th exact score, for the queries whose exact list ends inside it.

    A collection with more identical vectors than the list holds (a caption repeated a thousand
    times) ties the k-th score far past the list's end, and an index may rightly return any of
    them. For those queries (row -> sorted ids, at most ``cap``), one more pass over ``blocks``
    collects every id scored within ``tolerance`` of the k-th; the others need nothing more.
    """
    ids, scores = truth
    if ids.shape[1] <= k:
        return {}
    kth = scores[:, k - 1]
    rows = np.flatnonzero((ids[:, -1] >= 0) & (ids[:, k - 1] >= 0) & (scores[:, -1] >= kth - tolerance))
    if not len(rows):
        return {}
    parts: dict[int, list[np.ndarray]] = {int(r): [] for r in rows}
    chosen = np.ascontiguousarray(queries[rows], dtype=np.float32)
    for block_ids, vectors in blocks():
        tied = chosen @ vectors.T >= (kth[rows] - tolerance)[:, None]  # (r, b)
        for j, found in enumerate(parts.values()):
            room = cap - sum(map(len, found))
            if room > 0 and tied[j].any():
                found.append(block_ids[tied[j]][:room])
    return {row: np.unique(np.concatenate(p)) for row, p in parts.items() if p}
