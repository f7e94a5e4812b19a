"""The compressed indexes' (IVF-SQ, IVF-PQ) re-rank copy of the vectors: a file beside the index,
written block by block as the index is built (``RerankWriter``) and memory-mapped by searchers
(``Rerank``)."""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from retrieval.errors import StoreError

__all__ = ["Rerank", "RerankWriter"]

_RERANK_QUERIES = 64  # queries re-ranked at a time (a build unmaps their pages after each group)


class Rerank:
    """The re-rank copy of the vectors: a file of the ids (int64, ascending, as the tables
    hold them) then the float32 vectors, memory-mapped. The codes find ``k * refine`` candidates;
    their vectors score them again exactly. On disk and not in memory, it costs a build nothing
    beside the codes, and a search only the pages it reads. ``release`` (a build's tuning): the
    vectors are read with pread and the ids' pages unmapped after each group of queries, so that
    the build's resident memory stays its own."""

    def __init__(self, path: Path, rows: int, dim: int, release: bool = False) -> None:
        expected = rows * (8 + 4 * dim)
        size = path.stat().st_size
        if size != expected:
            raise StoreError(f"{path} has {size} bytes, {rows:,} vectors of {dim} need {expected}")
        self.path = path
        self.rows = rows
        self.dim = dim
        self.release = release
        self.ids = np.memmap(path, dtype=np.int64, mode="r", offset=0, shape=(rows,))
        self.vectors = np.memmap(path, dtype=np.float32, mode="r", offset=8 * rows, shape=(rows, dim))

    def __call__(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of each query's ``candidates`` (ids, -1 for none), scored again."""
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        width = min(k, candidates.shape[1])
        with contextlib.ExitStack() as stack:
            handle = stack.enter_context(self.path.open("rb")) if self.release else None
            for start in range(0, len(queries), _RERANK_QUERIES):
                part = candidates[start : start + _RERANK_QUERIES]
                found, vectors = self._candidates(part, handle)
                scores = np.einsum("qcd,qd->qc", vectors, queries[start : start + _RERANK_QUERIES])
                scores[~found] = -np.inf
                best = np.argsort(-scores, axis=1, kind="stable")[:, :width]
                top = np.take_along_axis(scores, best, axis=1)
                out_ids[start : start + len(part), :width] = np.where(
                    np.isfinite(top), np.take_along_axis(part, best, axis=1), -1
                )
                out_scores[start : start + len(part), :width] = top
        return out_ids, out_scores

    def _candidates(self, part: np.ndarray, handle: BinaryIO | None) -> tuple[np.ndarray, np.ndarray]:
        """Which candidates the file holds, and their vectors (q, c, D)."""
        found = part >= 0
        where = np.searchsorted(self.ids, np.where(found, part, 0)).clip(max=self.rows - 1)
        found &= np.asarray(self.ids[where]) == part
        if handle is None:
            return found, np.asarray(self.vectors[where.ravel()]).reshape(*part.shape, -1)
        self._release()
        return found, self._read(handle, where.ravel()).reshape(*part.shape, -1)

    def _read(self, handle: BinaryIO, rows: np.ndarray) -> np.ndarray:
        """``rows``' vectors, read with pread. Read through the mapping instead, the process's
        resident memory grew to about the whole file (1.05 GB of a 1 GB file for a thousand queries
        of 88 candidates at 1M rows, unmapped after every 64 queries), not to the rows read."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        width, start = 4 * self.dim, 8 * self.rows
        fd = handle.fileno()
        for k, row in enumerate(rows.tolist()):
            if os.preadv(fd, [out[k]], start + row * width) != width:
                raise StoreError(f"{self.path} ended before vector {row:,}: the file is damaged")
        return out

    def _release(self) -> None:
        """Unmap the ids' pages just read: they stay in the page cache, but not in this process's
        resident memory. A build tunes on a thousand queries and must stay within its budget; a
        searcher keeps its pages mapped."""
        for array in (self.ids,):
            mapped = getattr(array, "_mmap", None)
            if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
                mapped.madvise(mmap.MADV_DONTNEED)


class RerankWriter:
    """Writes a ``Rerank`` file block by block with plain writes (no mapped pages held)."""

    def __init__(self, path: Path, rows: int, dim: int) -> None:
        self.rows, self.dim = rows, dim
        self.handle = path.open("wb")
        self.handle.truncate(rows * (8 + 4 * dim))
        self.written = 0
        self.last_id: int | None = None

    def __call__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if self.written + len(ids) > self.rows:
            raise StoreError(f"more than the {self.rows:,} rows counted were read: the rows changed")
        if (self.last_id is not None and ids[0] <= self.last_id) or np.any(np.diff(ids) <= 0):
            raise StoreError("the live rows were not read in ascending id order")
        self.handle.seek(8 * self.written)
        self.handle.write(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        self.handle.seek(8 * self.rows + 4 * self.dim * self.written)
        self.handle.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
        self.written += len(ids)
        self.last_id = int(ids[-1])

    def close(self) -> None:
        self.handle.close()
        if self.written != self.rows:
            raise StoreError(f"{self.written:,} vectors read, {self.rows:,} counted: the rows changed")
