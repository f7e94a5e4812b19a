"""A collection's rows as results need them: fetched by id from the data files that hold them,
never the whole collection.

Each live data file's id range is in its table's log (``FileRef.first`` / ``last``), so the file
holding an id is found by a binary search over the files' first ids, and only the files of a
result's ids are read (and checked), their result columns only, kept in a small cache. A file
whose range was not logged (written by another tool) makes the collection fall back to reading
its result columns whole.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from retrieval.errors import StoreError
from retrieval.store.folder import Store
from retrieval.store.manifest import FileRef
from retrieval.store.schema import schema

__all__ = ["RowSource"]

_CACHED_FILES = 256  # data files kept read (a few MB each at most, result columns only)


class RowSource:
    """Rows of ``collection`` in ``store`` by id; ``columns`` are those a result carries."""

    def __init__(
        self, store: Store, collection: str, columns: Sequence[str], cached_files: int = _CACHED_FILES
    ) -> None:
        self.store = store
        self.cached_files = cached_files
        self.collection = collection
        self.columns = ["id", *(c for c in columns if c != "id")]
        self.files: tuple[FileRef, ...] = store.state(collection).shards
        ranged = all(f.first is not None and f.last is not None for f in self.files)
        self._starts = np.array([f.first for f in self.files], dtype=np.int64) if ranged else None
        self._lasts = np.array([f.last for f in self.files], dtype=np.int64) if ranged else None
        self._cache: OrderedDict[str, tuple[np.ndarray, pa.Table]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """Rows in the collection, from the log's row counts (nothing read)."""
        return sum(f.rows for f in self.files)

    def take(self, ids: np.ndarray) -> pa.Table:
        """The rows of ``ids`` (each present), in that order, with ``self.columns``."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return pa.table({c: pa.array([], type=self._type(c)) for c in self.columns})
        if self._starts is None or self._lasts is None:
            sorted_ids, table = self._whole()
            return table.take(pa.array(self._positions(sorted_ids, ids, "the collection")))
        where = np.searchsorted(self._starts, ids, side="right") - 1
        parts, order = [], []
        for number in np.unique(where):
            chosen = np.flatnonzero(where == number)
            if number < 0 or ids[chosen].max() > self._lasts[number]:
                raise StoreError(f"{self.store.folder}: ids {ids[chosen].tolist()} are in no data file")
            ref = self.files[number]
            file_ids, table = self._file(ref)
            parts.append(table.take(pa.array(self._positions(file_ids, ids[chosen], ref.file))))
            order.append(chosen)
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """bool (n,): whether each of ``ids`` is a row of the collection."""
        ids = np.asarray(ids, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        if self._starts is None or self._lasts is None:
            sorted_ids = self._whole()[0]
            positions = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
            return sorted_ids[positions] == ids if len(sorted_ids) else found
        where = np.searchsorted(self._starts, ids, side="right") - 1
        for number in np.unique(where[where >= 0]):
            chosen = np.flatnonzero((where == number) & (ids <= self._lasts[number]))
            file_ids = self._file(self.files[number])[0] if len(chosen) else ()
            if len(file_ids):
                positions = np.minimum(np.searchsorted(file_ids, ids[chosen]), len(file_ids) - 1)
                found[chosen] = file_ids[positions] == ids[chosen]
        return found

    def scan(self, columns: Sequence[str]) -> Iterator[pa.Table]:
        """Each data file's ``columns`` (and ``id``), one file at a time."""
        wanted = ["id", *(c for c in columns if c != "id")]
        for ref in self.files:
            yield self.store.read_table(ref, wanted)

    def _file(self, ref: FileRef) -> tuple[np.ndarray, pa.Table]:
        with self._lock:
            if ref.file in self._cache:
                self._cache.move_to_end(ref.file)
                return self._cache[ref.file]
        table = self.store.read_table(ref, self.columns)
        ids = table.column("id").to_numpy()
        if len(ids) > 1 and (np.diff(ids) < 0).any():
            table = table.sort_by("id")
            ids = table.column("id").to_numpy()
        entry = (ids, table.combine_chunks())
        with self._lock:
            self._cache[ref.file] = entry
            while len(self._cache) > self.cached_files:
                self._cache.popitem(last=False)
        return entry

    def _whole(self) -> tuple[np.ndarray, pa.Table]:
        key = "*"
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        tables = list(self.scan(self.columns))
        if not tables:
            raise StoreError(f"{self.store.folder} has no {self.collection}")
        table = pa.concat_tables(tables).sort_by("id").combine_chunks()
        entry = (table.column("id").to_numpy(), table)
        with self._lock:
            self._cache[key] = entry
        return entry

    def _type(self, column: str) -> pa.DataType:
        return schema(self.collection, 0).field(column).type

    @staticmethod
    def _positions(sorted_ids: np.ndarray, wanted: np.ndarray, where: str) -> np.ndarray:
        positions = np.searchsorted(sorted_ids, wanted)
        found = positions < len(sorted_ids)
        found[found] = sorted_ids[positions[found]] == wanted[found]
        if not found.all():
            raise StoreError(f"{where}: ids {wanted[~found][:5].tolist()} are not in it")
        return positions
