"""How unusual a score is: the distribution of the scores of random pairs of items.

A cosine of 0.31 may be the best text-image match a collection has or an everyday one, and an
image-image 0.9 may be a near copy or a common sight: scores mean something only against what
unrelated pairs score. ``ScoreNull`` is that distribution for one direction (query collection ->
target collection), from every pair of two samples (4,096 x 4,096 vectors: 16.8M pairs, about a
second): its quantiles, and beyond the top 0.1% a fitted tail, so that rates far below one in the
pairs sampled can still be stated.

- Each query's two best partners are left out (``score_null``): random pairs would otherwise be
  the collection's own duplicates, or true matches, far more often than the rates asked of them.
- The tail models the distance to the bound, ``1 - s``, as a power: cosines cannot pass 1, and a
  tail that ignores it (an exponential) puts some random pairs above any T < 1. The power is the
  tail's slope where it starts (through the median scores of each query's 3rd to 16th best
  partners), or, if flatter, the one unit vectors spread over D dimensions reach near the bound,
  ``(D - 1) / 2`` with D from the pairs' variance; then made a fifth flatter (``MARGIN``).
- Measured on isotropic vectors (8 to 256 dimensions, 100M fresh pairs each), a threshold chosen
  for a rate of 1e-6 let through 0 to 0.97 times that rate, and for 1e-4, 0.17 to 1.1 times: an
  extrapolation three decades past the pairs sampled errs towards fewer false matches. Without
  the margin, 0.04 to 3.9 times at 1e-6.
- Pairs at the bound itself (identical vectors: more copies than the two left out, or a model
  that maps different items to one point) are a mass no threshold below 1 can avoid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.ann.sampling import sample_vectors
from retrieval.store.folder import Store

__all__ = ["FORMAT", "SAMPLE", "TAIL", "ScoreNull", "calibrate", "readable", "score_null"]

FORMAT = 1  # of a null's dict in the catalog: another one is computed again, never misread
SAMPLE = 4_096  # vectors of each side; every pair between them is scored
TAIL = 1e-3  # the top fraction of the pairs the tail is fitted to
_AT_BOUND = 1e-6  # a pair within this of cosine 1 counts as identical vectors
TRIM = 2  # best partners of each query left out of its random pairs
ORDER = 16  # best partners of each query whose scores place the tail
MARGIN = 0.8  # the fitted power made a fifth flatter: rates err high rather than low
# Quantile levels stored, up to where the tail begins.
_LEVELS = np.concatenate([np.linspace(0.0, 0.99, 100), [0.995, 0.998, 1.0 - TAIL]])


@dataclass(frozen=True)
class ScoreNull:
    """Scores of random pairs: an item of ``queries`` against one of ``target``."""

    queries: str
    target: str
    pairs: int
    quantiles: tuple[float, ...]  # at _LEVELS: the last one is where the tail starts
    tail_shape: float  # the power of (1 - s) the tail falls as
    at_bound: float  # the fraction of pairs at cosine 1 (identical vectors)

    @property
    def tail_start(self) -> float:
        return self.quantiles[-1]

    def survival(self, scores: np.ndarray | float) -> np.ndarray:
        """P(a random pair scores above ``scores``), elementwise, float64."""
        s = np.asarray(scores, dtype=np.float64)
        body = 1.0 - np.interp(s, self.quantiles, _LEVELS)
        room = max(1.0 - self.tail_start, 0.0)
        if room <= _AT_BOUND:
            return np.where(s >= self.tail_start, self.at_bound, body)
        ratio = np.clip((1.0 - s) / room, 0.0, 1.0)
        tail = self.at_bound + max(TAIL - self.at_bound, 0.0) * ratio**self.tail_shape
        return np.where(s >= self.tail_start, tail, body)

    def percentile(self, scores: np.ndarray | float) -> np.ndarray:
        """The fraction of random pairs that ``scores`` beat, in [0, 1]."""
        return 1.0 - self.survival(scores)

    def threshold(self, rate: float) -> float:
        """The lowest score that a random pair exceeds with probability at most ``rate``; 1.0
        when even identical vectors are more common among random pairs than ``rate``."""
        if rate >= TAIL:
            return float(np.interp(1.0 - rate, _LEVELS, self.quantiles))
        room = 1.0 - self.tail_start
        if rate <= self.at_bound or room <= _AT_BOUND or self.tail_shape <= 0:
            return 1.0
        fraction = (rate - self.at_bound) / (TAIL - self.at_bound)
        return float(min(1.0, 1.0 - room * fraction ** (1.0 / self.tail_shape)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "queries": self.queries,
            "target": self.target,
            "pairs": self.pairs,
            "quantiles": [round(q, 6) for q in self.quantiles],
            "tail_shape": round(self.tail_shape, 6),
            "at_bound": self.at_bound,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreNull:
        if not readable(data):
            raise ValueError(f"a score null of format {data.get('format')!r}, not {FORMAT}")
        return cls(
            str(data["queries"]),
            str(data["target"]),
            int(data["pairs"]),
            tuple(float(q) for q in data["quantiles"]),
            float(data["tail_shape"]),
            float(data["at_bound"]),
        )


def score_null(queries: np.ndarray, targets: np.ndarray, names: tuple[str, str], *, same: bool) -> ScoreNull:
    """The null of every pair between ``queries`` (m, D) and ``targets`` (n, D), unit-norm float32.

    ``same``: the two are one sample of one collection, and an item's pair with itself is left
    out. ``names``: (query collection, target collection).

    A random pair is one of the collection's duplicates (or, across collections, a true match)
    far more often than the rates asked of the null: one item in six with a copy makes a copy pair
    one in 10,000 at 1,854 items. So each query's best ``TRIM`` partners are left out of the pairs,
    and the tail is fitted on what needs no such pair: a query's j-th best partner (j > TRIM)
    scores above a share j/n of its random partners, so the median over queries of the j-th best
    scores, j = 3 .. 16, place the survival at 16 levels around the top 0.1%; the power of
    ``1 - s`` through them is the tail's shape (least squares on the logarithms).
    """
    scores = np.asarray(queries, np.float32) @ np.asarray(targets, np.float32).T  # (m, n)
    if same:
        np.fill_diagonal(scores, -np.inf)
    columns = scores.shape[1] - int(same)
    if columns < 4 * ORDER or len(scores) < 2:
        return _small_null(scores[np.isfinite(scores)].reshape(-1), names)
    best = -np.sort(-np.partition(-scores, ORDER, axis=1)[:, :ORDER], axis=1)  # (m, ORDER), best first
    rest = -np.partition(-scores, TRIM, axis=1)[:, TRIM:]
    rest = rest[np.isfinite(rest)].reshape(-1)
    levels = np.minimum(_LEVELS / (1.0 - TRIM / columns), 1.0)  # the kept pairs are the lower ones
    quantiles = np.quantile(rest, levels)
    ranks = np.arange(TRIM + 1, ORDER + 1)
    medians = np.median(best[:, TRIM:], axis=0).astype(np.float64)  # the j-th best, j = ranks
    room = np.maximum(1.0 - medians, _AT_BOUND)
    at_bound = float(np.mean(rest >= 1.0 - _AT_BOUND))
    if np.ptp(np.log(room)) > 1e-9:
        shape, _ = np.polyfit(np.log(room), np.log((ranks - 1 / 3) / columns), 1)  # median ranks
    else:
        shape = 0.0
    # Nearer the bound the tail of unit vectors spread over D dimensions flattens towards the power
    # (D - 1) / 2, D taken from the pairs' spread (their variance is 1 / D when isotropic): past
    # where it starts, the tail is given the flatter of the two, so it never falls faster than that.
    spread = float(np.var(rest))
    if spread > 0:
        shape = min(shape, (1.0 / spread - 1.0) / 2.0)
    shape *= MARGIN
    return ScoreNull(*names, len(rest), tuple(float(q) for q in quantiles), max(float(shape), 0.0), at_bound)


def _small_null(scores: np.ndarray, names: tuple[str, str]) -> ScoreNull:
    """Too few partners a query for order statistics: the pairs as they are, Hill's estimate."""
    if len(scores) < 2:
        # Too few to say anything: every score is as common as any other.
        return ScoreNull(*names, len(scores), tuple(np.full(len(_LEVELS), 1.0).tolist()), 0.0, 1.0)
    quantiles = np.quantile(scores, _LEVELS)
    start = float(quantiles[-1])
    at_bound = float(np.mean(scores >= 1.0 - _AT_BOUND))
    distance = 1.0 - scores[(scores > start) & (scores < 1.0 - _AT_BOUND)].astype(np.float64)
    room = 1.0 - start
    shape = (
        float(len(distance) / np.sum(np.log(room / distance))) if len(distance) and room > _AT_BOUND else 0.0
    )
    return ScoreNull(*names, len(scores), tuple(float(q) for q in quantiles), shape, at_bound)


def readable(data: Mapping[str, Any] | None) -> bool:
    """Whether ``data`` is a null this version writes (an index's calibration of another format is
    computed again by the next ``index build``)."""
    return isinstance(data, Mapping) and data.get("format") == FORMAT


def calibrate(
    store: Store,
    collection: str,
    others: dict[str, np.ndarray],
    seed: int = 0,
    sample: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """The nulls of every direction into ``collection``, as an index record keeps them: query
    collection -> ``ScoreNull.to_dict()``. ``others``: vectors of the other collections (queries
    of those directions); ``sample``: vectors of this one already drawn at random (else drawn)."""
    rng = np.random.default_rng(seed)
    if sample is None or len(sample) < SAMPLE:
        sample = sample_vectors(store, collection, SAMPLE, rng)
    nulls = {collection: score_null(sample, sample, (collection, collection), same=True)}
    for name, queries in others.items():
        if len(queries):
            nulls[name] = score_null(queries[:SAMPLE], sample, (name, collection), same=False)
    return {name: null.to_dict() for name, null in nulls.items()}
