"""Exact search by blocks: a running top-k over candidates that arrive as ``(ids, vectors)`` blocks,
the oracle every approximate index is measured against."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["SCORE_CELLS", "TopK", "exact_search"]

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
