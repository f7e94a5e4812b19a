"""How unusual a score is: the distribution of the scores of random pairs of items.

A cosine of 0.31 may be the best text-image match a collection has or an everyday one, and an
image-image 0.9 may be a near copy or a common sight: scores mean something only against what
unrelated pairs score. ``ScoreNull`` is that distribution for one direction (query collection ->
target collection), from every pair of two samples (4,096 x 4,096 vectors: 16.8M pairs, a fraction
of a second): its quantiles, and beyond the top 0.1% an exponential tail fitted to the excess of
the sampled pairs there, so that rates far below one in the pairs sampled can still be stated.
Cosines are bounded by 1, so the true tail falls faster than an exponential near the bound: the
fitted rates err high, and a threshold chosen from them errs towards fewer false matches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SAMPLE", "TAIL", "ScoreNull", "score_null"]

SAMPLE = 4_096  # vectors of each side; every pair between them is scored
TAIL = 1e-3  # the top fraction of the pairs whose excess the exponential tail is fitted to
# Quantile levels stored, up to where the tail begins.
_LEVELS = np.concatenate([np.linspace(0.0, 0.99, 100), [0.995, 0.998, 1.0 - TAIL]])


@dataclass(frozen=True)
class ScoreNull:
    """Scores of random pairs: an item of ``queries`` against one of ``target``."""

    queries: str
    target: str
    pairs: int
    quantiles: tuple[float, ...]  # at _LEVELS
    tail_scale: float  # mean excess over the last quantile of the pairs beyond it

    @property
    def tail_start(self) -> float:
        return self.quantiles[-1]

    def survival(self, scores: np.ndarray | float) -> np.ndarray:
        """P(a random pair scores above ``scores``), elementwise, float64."""
        s = np.asarray(scores, dtype=np.float64)
        body = 1.0 - np.interp(s, self.quantiles, _LEVELS)
        tail = TAIL * np.exp(-(s - self.tail_start) / max(self.tail_scale, 1e-9))
        return np.where(s >= self.tail_start, np.minimum(tail, TAIL), body)

    def percentile(self, scores: np.ndarray | float) -> np.ndarray:
        """The fraction of random pairs that ``scores`` beat, in [0, 1]."""
        return 1.0 - self.survival(scores)

    def threshold(self, rate: float) -> float:
        """The score that a random pair exceeds with probability ``rate`` (at most 1)."""
        if rate >= TAIL:
            return float(np.interp(1.0 - rate, _LEVELS, self.quantiles))
        return float(min(1.0, self.tail_start + self.tail_scale * np.log(TAIL / rate)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "target": self.target,
            "pairs": self.pairs,
            "quantiles": [round(q, 6) for q in self.quantiles],
            "tail_scale": round(self.tail_scale, 8),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreNull:
        return cls(
            str(data["queries"]),
            str(data["target"]),
            int(data["pairs"]),
            tuple(float(q) for q in data["quantiles"]),
            float(data["tail_scale"]),
        )


def score_null(queries: np.ndarray, targets: np.ndarray, names: tuple[str, str], *, same: bool) -> ScoreNull:
    """The null of every pair between ``queries`` (m, D) and ``targets`` (n, D), unit-norm float32.

    ``same``: the two are one sample of one collection, and an item's pair with itself is left
    out. ``names``: (query collection, target collection).
    """
    scores = np.asarray(queries, np.float32) @ np.asarray(targets, np.float32).T  # (m, n)
    if same:
        off_diagonal = np.ones(scores.shape, dtype=bool)
        np.fill_diagonal(off_diagonal, False)
        scores = scores[off_diagonal]
    scores = scores.reshape(-1)
    if len(scores) < 2:
        # Too few to say anything: every score is as common as any other.
        return ScoreNull(*names, len(scores), tuple(np.full(len(_LEVELS), 1.0).tolist()), 0.0)
    quantiles = np.quantile(scores, _LEVELS)
    beyond = scores[scores > quantiles[-1]]
    scale = float(np.mean(beyond - quantiles[-1])) if len(beyond) else 0.0
    return ScoreNull(*names, len(scores), tuple(float(q) for q in quantiles), scale)
