"""Vectors out of a store, a block at a time: ``live_vectors`` streams them, ``sample_vectors``
draws a uniform sample in one pass holding only the sample and a block, whatever the collection's
size (``draw_sample``), for IVF training and for the tuning queries."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from retrieval.ann.sizing import BLOCK
from retrieval.store.folder import Store
from retrieval.vectors import embedding_matrix

__all__ = ["draw_sample", "live_count", "live_vectors", "sample_vectors", "store_dim"]


def store_dim(store: Store) -> int:
    return int(store.manifest.model["fingerprint"]["dim"]) if store.manifest else 0


def live_vectors(
    store: Store, collection: str, block: int = BLOCK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids (n,) int64, vectors (n, D) float32)`` blocks of the rows still in search, at most
    ``block`` rows each: read-only views of one data file's Arrow buffers at a time."""
    dim = store_dim(store)
    for _, table in store.live_rows(collection, ["id", "embedding"]):
        for batch in table.to_batches():  # columns aligned chunk by chunk, so nothing is combined
            ids = batch.column("id").to_numpy()
            vectors = embedding_matrix(batch.column("embedding"), dim)
            for start in range(0, len(ids), block):
                yield ids[start : start + block], vectors[start : start + block]


def live_count(store: Store, collection: str) -> int:
    """How many rows of ``collection`` are in search, from the id column alone."""
    return sum(t.num_rows for _, t in store.live_rows(collection, ["id"]))


def sample_vectors(store: Store, collection: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """``min(size, n)`` live vectors (m, D) float32: a uniform sample without replacement, in store
    order. The rows are counted from the id column first; then one pass over the vectors keeps the
    sample and one block, whatever the collection's size (``draw_sample``)."""
    total = live_count(store, collection)
    return draw_sample(live_vectors(store, collection), total, size, store_dim(store), rng)


def draw_sample(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    total: int,
    size: int,
    dim: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A uniform sample of ``size`` of the ``total`` rows that ``blocks`` yield, in one pass: each
    block takes its share of the rows still wanted given the rows still to come (a hypergeometric
    draw), then that many of its own rows, uniformly. (M, D) float32, M = min(size, total)."""
    out = np.empty((min(size, total), dim), dtype=np.float32)
    filled, left = 0, total
    for _, vectors in blocks:
        if filled == len(out):
            break
        left = max(left - len(vectors), 0)
        take = _share(rng, len(vectors), left, len(out) - filled)
        rows = np.sort(rng.choice(len(vectors), take, replace=False))
        np.take(vectors, rows, axis=0, out=out[filled : filled + take])
        filled += take
    return out[:filled]


def _share(rng: np.random.Generator, rows: int, rest: int, wanted: int) -> int:
    """How many of ``wanted`` rows drawn without replacement from ``rows + rest`` fall in ``rows``."""
    wanted = min(wanted, rows + rest)
    if wanted == 0 or rest == 0:
        return min(wanted, rows)
    if rest < 10**9:  # numpy's bound for hypergeometric populations
        return int(rng.hypergeometric(rows, rest, wanted))
    # Beyond it, the binomial (drawing with replacement) is the same law to within rows / rest.
    return int(np.clip(rng.binomial(wanted, rows / (rows + rest)), max(0, wanted - rest), min(rows, wanted)))
