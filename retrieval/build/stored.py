"""The vectors a collection already holds, found by content hash (``StoredVectors``).

A build looks up each planned input's sha256 before encoding it: identical content takes the
stored vector. The lookup is a join of the planned hashes against the stored ones, and the
stored side is held as 16 bytes a row (the hash's first 64 bits, sorted, with the file and row
it is in), not as a dict of strings: 160 MB at 10M rows instead of several GB. A match on those
bits is confirmed on the full hash when its file is read, so a collision of prefixes costs a read
and never a wrong vector.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.errors import StoreError
from retrieval.store.folder import Store, removed_file
from retrieval.store.manifest import FileRef
from retrieval.store.table import DeltaCollection
from retrieval.vectors import embedding_matrix

__all__ = ["StoredVectors", "hash_keys"]

_FILES_HELD = 4  # data files' vectors held at a time (a file is 64 MB at 65,536 rows x 256)
_HEX = np.zeros(256, np.uint64)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint64)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint64)


def hash_keys(hashes: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The first 64 bits of each hex sha256, as unsigned integers (vectorized: no Python string
    per row)."""
    prefix = pc.utf8_slice_codeunits(hashes, 0, 16)
    if isinstance(prefix, pa.ChunkedArray):
        prefix = prefix.combine_chunks()
    fixed = pc.utf8_rpad(prefix, 16, "0").cast(pa.binary(16))
    raw = np.frombuffer(fixed.buffers()[1], np.uint8)[fixed.offset * 16 : (fixed.offset + len(fixed)) * 16]
    digits = _HEX[raw.reshape(-1, 16)]
    keys = np.zeros(len(fixed), np.uint64)
    for column in range(16):
        keys = (keys << np.uint64(4)) | digits[:, column]
    return keys


def _key(sha256: str) -> np.uint64:
    return np.uint64(int(sha256[:16].ljust(16, "0"), 16))


class StoredVectors:
    """The vector already stored for a content hash: in a live data file, or in one a deletion or
    rewrite removed from the table but a vacuum has not yet (of the same model). A live copy is
    preferred: its file is the one being read anyway."""

    def __init__(self, store: Store, collection: str, dim: int, table: DeltaCollection) -> None:
        self.store = store
        self.table = table  # the table the build writes (an executor elsewhere stages beside it)
        self.dim = dim
        self.files: list[FileRef] = []
        keys: list[np.ndarray] = []
        numbers: list[np.ndarray] = []
        rows_of: list[np.ndarray] = []

        def add(ref: FileRef, hashes: pa.ChunkedArray) -> None:
            keys.append(hash_keys(hashes))
            numbers.append(np.full(len(hashes), len(self.files), np.int32))
            rows_of.append(np.arange(len(hashes), dtype=np.int32))
            self.files.append(ref)

        named = set()
        for ref, rows in store.iter_shards(collection, ["sha256"]):
            named.add(ref.file)
            add(ref, rows.column("sha256"))
        digest = (store.manifest.fingerprint if store.manifest else None) or ""
        for path in table.files_on_disk():
            found = removed_file(store.folder, path, digest)
            if found is None or found.file in named:
                continue
            try:
                rows = store.read_table(found, ["sha256"])
            except StoreError:
                continue  # damaged: only a chance of reuse is lost
            add(found, rows.column("sha256"))

        def joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate([np.empty(0, dtype), *parts])

        key = joined(keys, np.uint64)
        # Live files come first, and a stable sort keeps that order among equal hashes.
        order = np.argsort(key, kind="stable")
        self.keys = key[order]
        self.file = joined(numbers, np.int32)[order]
        self.row = joined(rows_of, np.int32)[order]
        self._held: dict[int, tuple[pa.Array, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, sha256: str) -> np.ndarray | None:
        """The stored vector of this content, or None."""
        key = _key(sha256)
        at = int(np.searchsorted(self.keys, key))
        while at < len(self.keys) and self.keys[at] == key:
            hashes, vectors = self._read(int(self.file[at]))
            row = int(self.row[at])
            if hashes[row].as_py() == sha256:
                return vectors[row].copy()  # not a view that would hold its whole file
            at += 1
        return None

    def _read(self, number: int) -> tuple[pa.Array, np.ndarray]:
        if number not in self._held:
            if len(self._held) >= _FILES_HELD:
                self._held.pop(next(iter(self._held)))
            table = self.store.read_table(self.files[number], ["sha256", "embedding"])
            hashes = table.column("sha256").combine_chunks()
            self._held[number] = (hashes, embedding_matrix(table.column("embedding"), self.dim))
        return self._held[number]
