"""A collection's vectors at one table version, sorted by id, in a flat float32 file.

Whole-collection work (every item's neighbours, duplicate groups) reads every vector many times.
Parquet is decoded once, in two passes that hold only the ids and one data file: the ids first (to
sort them), then each file's vectors written at their sorted rows of a memory-mapped file. What
follows reads slices of that map, so memory stays bounded by the page cache, not the collection.
A file written to completion is reused by a later run of the same collection version (a resumed
job), recognised by its description file, written last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.durable import atomic_write
from retrieval.errors import StoreError
from retrieval.progress import Progress, Silent
from retrieval.store.folder import Store
from retrieval.vectors import embedding_matrix

__all__ = ["VectorFile", "content_keys"]


@dataclass
class VectorFile:
    """``ids`` (N,) int64 ascending and ``vectors`` (N, D) float32 (a read-only memory map), row
    for row; ``distinct`` files hold one row per content (the smallest id of each sha256)."""

    ids: np.ndarray
    vectors: np.ndarray
    collection: str
    version: int
    distinct: bool

    @classmethod
    def of(
        cls,
        store: Store,
        collection: str,
        folder: Path,
        *,
        distinct: bool = False,
        progress: Progress | None = None,
    ) -> VectorFile:
        """The vectors of ``collection`` as ``store`` sees it, written under ``folder`` (or reused)."""
        state = store.state(collection)
        if state.version is None or not state.shards:
            raise StoreError(f"{store.folder} has no {collection} in search")
        dim = int(store.manifest.model["fingerprint"]["dim"]) if store.manifest else 0
        stem = folder / f"{collection}{'-distinct' if distinct else ''}-v{state.version}"
        key = {"collection": collection, "version": state.version, "dim": dim, "distinct": distinct}
        described = stem.with_suffix(".json")
        if _complete(stem, key, dim):
            ids = np.load(stem.with_suffix(".ids.npy"))
            vectors = np.memmap(stem.with_suffix(".f32"), np.float32, "r", shape=(max(len(ids), 1), dim))
            return cls(ids, vectors[: len(ids)], collection, state.version, distinct)
        folder.mkdir(parents=True, exist_ok=True)
        ids, places = _sorted_ids(store, collection, distinct)
        progress = progress or Silent()
        progress.start("reading vectors", len(ids))
        # Filled under a name of its own and moved into place: a reader of a finished copy never
        # sees one being written over it.
        filling = stem.with_name(f".{stem.name}.f32.{os.getpid()}")
        out = np.memmap(filling, np.float32, "w+", shape=(max(len(ids), 1), dim))
        done = 0
        for _, table in store.iter_shards(collection, ["embedding"]):
            rows = places[done : done + table.num_rows]
            keep = rows >= 0
            out[rows[keep]] = embedding_matrix(table.column("embedding"), dim)[keep]
            done += table.num_rows
            progress.advance(int(keep.sum()))
        out.flush()
        del out
        os.replace(filling, stem.with_suffix(".f32"))
        progress.finish()
        np.save(stem.with_suffix(".ids.npy"), ids)
        atomic_write(described, lambda tmp: tmp.write_text(json.dumps(key | {"rows": len(ids)})))
        vectors = np.memmap(stem.with_suffix(".f32"), np.float32, "r", shape=(max(len(ids), 1), dim))
        return cls(ids, vectors[: len(ids)], collection, state.version, distinct)

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (all present) -> their positions in the file."""
        return np.searchsorted(self.ids, ids)

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(first position, ids, vectors)`` of ``rows`` consecutive rows at a time."""
        for start in range(0, len(self.ids), rows):
            yield start, self.ids[start : start + rows], self.vectors[start : start + rows]


def _complete(stem: Path, key: dict, dim: int) -> bool:
    """A copy written to the end for ``key``: its description, ids and vectors all whole."""
    try:
        described = json.loads(stem.with_suffix(".json").read_text())
        rows = len(np.load(stem.with_suffix(".ids.npy"), mmap_mode="r"))
        size = stem.with_suffix(".f32").stat().st_size
    except (OSError, ValueError):
        return False
    return described == key | {"rows": rows} and size == max(rows, 1) * dim * 4


def content_keys(digests: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """sha256 hex digests -> uint64 (n,) keys, equal for equal digests, 0 for none recorded.

    All 64 digits are mixed in (an FNV-style multiply-xor of the eight 8-byte words): keys take
    8 bytes a row where the strings take 64; two distinct digests share a key with probability
    about 2^-64 a pair.
    """
    recorded = pc.fill_null(pa.chunked_array([digests]), "")
    text = np.asarray(recorded.to_numpy(zero_copy_only=False), dtype="S64")
    words = np.ascontiguousarray(text).view(np.uint64).reshape(len(text), 8)
    keys = np.full(len(text), 0xCBF29CE484222325, dtype=np.uint64)
    for column in range(8):
        keys = (keys ^ words[:, column]) * np.uint64(0x100000001B3)
    keys[keys == 0] = 1
    keys[text == b""] = 0
    return keys


def _sorted_ids(store: Store, collection: str, distinct: bool) -> tuple[np.ndarray, np.ndarray]:
    """-> the kept ids ascending, and for every row in file order its position among them (-1:
    left out, a later copy of content already kept)."""
    columns = ["id", "sha256"] if distinct else ["id"]
    parts = [table for _, table in store.iter_shards(collection, columns)]
    ids = np.concatenate([t.column("id").to_numpy() for t in parts]) if parts else np.empty(0, np.int64)
    keep = np.ones(len(ids), dtype=bool)
    if distinct and len(ids):
        digests = np.concatenate([content_keys(t.column("sha256")) for t in parts])
        order = np.lexsort((ids, digests))  # by content, then id: the first of each run is kept
        first = np.ones(len(order), dtype=bool)
        first[1:] = digests[order][1:] != digests[order][:-1]
        first |= digests[order] == 0  # no recorded content: never taken for a copy
        keep[order[~first]] = False
    kept = ids[keep]
    order = np.argsort(kept, kind="stable")
    places = np.full(len(ids), -1, dtype=np.int64)
    ranks = np.empty(len(kept), dtype=np.int64)
    ranks[order] = np.arange(len(kept))
    places[np.flatnonzero(keep)] = ranks
    return kept[order], places
