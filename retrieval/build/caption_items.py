"""A caption plan's work items held compactly (``CaptionItems``), how the planner fills them
(``CaptionPlanning``), and the indexed caption rows it compares against (``IndexedCaptions``)."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.build.items import (
    CaptionInput,
    CollectionView,
    CutItems,
    Reader,
    WorkItem,
    metadata_text,
    row_digest,
)
from retrieval.errors import InputError
from retrieval.outcomes import Outcome

__all__ = ["CaptionItems", "CaptionPlanning", "IndexedCaptions"]


class CaptionItems(CutItems):
    """A caption plan's work items, held as 28 bytes a planned row (its source, row number, key
    digest and id) and read again from the sources, one item at a time, when iterated.

    A source whose size or modification time changed since it was planned is refused
    (``InputError``): the items committed by then hold rows as planned, and a rerun plans the
    file as it is now.
    """

    collection = "captions"

    def __init__(
        self,
        sources: list[tuple[str, Path, str | None, list[int]]],
        read: Reader,
        source_of: np.ndarray,
        rows: np.ndarray,
        digests: np.ndarray,
        ids: np.ndarray,
        cuts: np.ndarray,
    ) -> None:
        self.sources = sources  # (name, path, image, stats when planned)
        self.read = read
        self.source_of = source_of
        self.rows = rows
        self.digests = digests
        self.ids = ids
        self.cuts = cuts  # positions where items start, then the number of planned rows

    def at(self, number: int) -> WorkItem:
        return next(islice(iter(self), number, None))

    def __iter__(self) -> Iterator[WorkItem]:
        cuts = self.cuts.tolist()
        pending: list[CaptionInput] = []
        number = 0
        changes = (np.flatnonzero(np.diff(self.source_of)) + 1).tolist()
        for begin, end in zip([0, *changes], [*changes, len(self.ids)], strict=True):
            for x in self._read(int(self.source_of[begin]), self.rows[begin:end]):
                pending.append(x)
                if cuts[number] + len(pending) == cuts[number + 1]:
                    ids = tuple(self.ids[cuts[number] : cuts[number + 1]].tolist())
                    yield WorkItem("captions", number, ids, tuple(pending))
                    pending, number = [], number + 1

    def numbers_of(self, source: str) -> set[int]:
        """The items that hold rows of ``source``."""
        index = next(k for k, s in enumerate(self.sources) if s[0] == source)
        positions = np.flatnonzero(self.source_of == index)
        return {int(n) for n in np.unique(np.searchsorted(self.cuts, positions, side="right") - 1)}

    def table(self) -> pa.Table:
        """Each planned row with its id: what the store keeps while the plan is in progress."""
        names = pa.array([s[0] for s in self.sources], pa.string())
        return pa.table(
            {
                "id": pa.array(self.ids, pa.int64()),
                "source": pa.DictionaryArray.from_arrays(pa.array(self.source_of, pa.int32()), names),
                "row": pa.array(self.rows, pa.int64()),
                "digest": pa.array(self.digests, pa.int64()),
            }
        )

    def _read(self, index: int, rows: np.ndarray) -> Iterator[CaptionInput]:
        name, path, image, stats = self.sources[index]
        _check_unchanged(path, stats)
        wanted = iter(rows.tolist())
        want = next(wanted, None)
        for record in self.read(path, name, image):
            if want is None:
                break
            if isinstance(record, Outcome) or record.row < want:
                continue
            if record.row > want:
                break
            yield CaptionInput(record, metadata_text(record.metadata), stats[0], stats[1])
            want = next(wanted, None)
        if want is not None:
            raise InputError(f"{path} changed while it was being indexed: run the build again")
        _check_unchanged(path, stats)


class CaptionPlanning:
    """The planned rows of a caption plan as they are found: ids given, items cut."""

    def __init__(self, view: CollectionView, item_size: int, read: Reader) -> None:
        self.reserved = dict(view.reserved)
        self.next_id = view.state.next_id
        self.item_size = item_size
        self.read = read
        self.kept = 0
        self.count = 0
        self.sources: list[tuple[str, Path, str | None, list[int]]] = []
        self.index: dict[str, int] = {}
        self.source_of = array("i")
        self.rows = array("q")
        self.digests = array("q")
        self.ids = array("q")
        self.cuts = array("q")
        self.last_image: tuple[str, str | None] | None = None

    def add(
        self, source: str, path: Path, image: str | None, stats: list[int], row: int, digest: int
    ) -> None:
        if source not in self.index:
            self.index[source] = len(self.sources)
            self.sources.append((source, path, image, stats))
        # A sidecar's rows stay together in one item; a caption file's may be cut anywhere.
        starts = image is None or self.last_image != (source, image)
        if not self.cuts or (self.count - self.cuts[-1] >= self.item_size and starts):
            self.cuts.append(self.count)
        self.last_image = (source, image)
        reused = self.reserved.pop((source, row, digest), None)
        if reused is None:
            reused, self.next_id = self.next_id, self.next_id + 1
        else:
            self.kept += 1
        self.source_of.append(self.index[source])
        self.rows.append(row)
        self.digests.append(digest)
        self.ids.append(reused)
        self.count += 1

    def items(self) -> CaptionItems:
        def array_of(values: array, dtype: type) -> np.ndarray:
            return np.frombuffer(values, dtype=dtype) if len(values) else np.empty(0, dtype)

        cuts = np.append(array_of(self.cuts, np.int64), self.count) if self.count else np.zeros(1, np.int64)
        return CaptionItems(
            self.sources,
            self.read,
            array_of(self.source_of, np.int32),
            array_of(self.rows, np.int64),
            array_of(self.digests, np.int64),
            array_of(self.ids, np.int64),
            cuts,
        )


class IndexedCaptions:
    """The live caption rows grouped by source, without a Python object per row until a source's
    rows are compared (``rows``), one source at a time. ``rows`` holds ids, sources, rows and file
    stats; what the rows read (text, image, metadata) comes from ``content`` for the sources
    ``prepare`` names (or from ``rows`` itself when it has those columns)."""

    def __init__(self, rows: pa.Table, content: Callable[[set[str]], pa.Table] | None = None) -> None:
        self.table, self.order, self.slices = _grouped(rows)
        self.sources = set(self.slices)
        self.content = content
        self.read: tuple[pa.Table, pa.Array, dict[str, tuple[int, int]]] | None = None

    def prepare(self, sources: set[str]) -> None:
        wanted = sources & self.sources
        if self.content is not None and wanted:
            self.read = _grouped(self.content(wanted))

    def _take(self, source: str, columns: Sequence[str]) -> pa.Table:
        a, b = self.slices.get(source, (0, 0))
        return self.table.select(list(columns)).take(self.order[a:b])

    def ids(self, source: str) -> list[int]:
        return [int(i) for i in self._take(source, ["id"]).column("id").to_pylist()]

    def stats(self, source: str) -> set[tuple[int, int]]:
        """The file stats ``source``'s rows were read with."""
        if source not in self.slices:
            return set()
        table = self._take(source, ["size", "mtime_ns"])
        pairs = table.group_by(["size", "mtime_ns"]).aggregate([])
        return set(zip(pairs.column("size").to_pylist(), pairs.column("mtime_ns").to_pylist(), strict=True))

    def rows(self, source: str) -> dict[int, tuple[int, int]]:
        """``source``'s rows: row -> (id, digest of what it read)."""
        table, order, slices = self.read if self.read is not None else (self.table, self.order, self.slices)
        if source not in slices:
            return {}
        a, b = slices[source]
        columns = ("id", "row", "text", "image", "metadata")
        part = table.select(list(columns)).take(order[a:b])
        out: dict[int, tuple[int, int]] = {}
        for batch in part.to_batches(max_chunksize=65536):
            values = (batch.column(c).to_pylist() for c in columns)
            for i, row, text, image, metadata in zip(*values, strict=True):
                out[row] = (i, row_digest(text, image, metadata))
        return out


def _grouped(rows: pa.Table) -> tuple[pa.Table, pa.Array, dict[str, tuple[int, int]]]:
    """``rows``, the order that sorts them by (source, row), and each source's slice of it."""
    order = pc.sort_indices(rows, sort_keys=[("source", "ascending"), ("row", "ascending")])
    names = rows.column("source").take(order)
    slices: dict[str, tuple[int, int]] = {}
    if len(names):
        values = names.to_numpy(zero_copy_only=False)
        starts = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist()]
        ends = [*starts[1:], len(values)]
        slices = {str(values[a]): (a, b) for a, b in zip(starts, ends, strict=True)}
    return rows, order, slices


def _check_unchanged(path: Path, stats: list[int]) -> None:
    try:
        info = path.stat()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
    if [info.st_size, info.st_mtime_ns] != stats:
        raise InputError(f"{path} changed while it was being indexed: run the build again")
