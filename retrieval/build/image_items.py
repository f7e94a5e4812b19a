"""An image plan's work items held compactly (``ImageItems``): columns, not a Python object a file.

A folder of 100M images plans 100M inputs; as ``ImageInput`` objects in tuples that would be tens
of GB. Here each planned file is its path in an Arrow string array, its size, modification time and
id in NumPy arrays: about 60 bytes with a typical path. An item's inputs are made when it is taken,
and the decoding workers read files by their number in the plan (``files``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from retrieval.build.items import CutItems, ImageInput, Indexed, WorkItem
from retrieval.ingest.sources import ImageFile

__all__ = ["ImageItems"]


class ImageItems(CutItems):
    """An image plan's work items: the planned files in plan order, cut into items at ``cuts``."""

    collection = "images"

    def __init__(
        self, paths: pa.Array, sizes: np.ndarray, mtimes: np.ndarray, ids: np.ndarray, item_size: int
    ) -> None:
        self.paths = paths
        self.file_sizes = sizes
        self.mtimes = mtimes
        self.ids = ids
        count = len(ids)
        # Positions where items start, then the number of planned files.
        self.cuts = np.append(np.arange(0, count, max(1, item_size), dtype=np.int64), count)
        if count == 0:
            self.cuts = np.zeros(1, np.int64)
        self.numbers: list[int] | None = None  # the items' own numbers, where not 0, 1, 2...

    @classmethod
    def of(cls, items: Sequence[WorkItem]) -> ImageItems:
        """Items given as objects (a test's, or another executor's), in this form."""
        inputs = [x for item in items for x in item.inputs if isinstance(x, ImageInput)]
        ids = np.array([i for item in items for i in item.ids], np.int64)
        compact = cls(
            pa.array([x.path for x in inputs], pa.string()),
            np.array([x.size for x in inputs], np.int64),
            np.array([x.mtime_ns for x in inputs], np.int64),
            ids,
            1,
        )
        compact.cuts = np.cumsum([0, *(len(item.ids) for item in items)]).astype(np.int64)
        compact.numbers = [item.number for item in items]
        return compact

    def at(self, number: int) -> WorkItem:
        a, b = int(self.cuts[number]), int(self.cuts[number + 1])
        inputs = tuple(self.input(k) for k in range(a, b))
        own = number if self.numbers is None else self.numbers[number]
        return WorkItem("images", own, tuple(self.ids[a:b].tolist()), inputs)

    def __iter__(self) -> Iterator[WorkItem]:
        return (self.at(k) for k in range(len(self)))

    def input(self, index: int) -> ImageInput:
        """The ``index``-th planned file."""
        return ImageInput(self.paths[index].as_py(), int(self.file_sizes[index]), int(self.mtimes[index]))

    def place(self, index: int) -> tuple[int, int]:
        """Where the ``index``-th planned file is: its item's position here, and its own in it."""
        number = int(np.searchsorted(self.cuts, index, side="right")) - 1
        return number, index - int(self.cuts[number])

    def files(self) -> Sequence[ImageFile]:
        """The planned files in plan order, as the decoding workers read them."""
        return _Files(self.paths, self.file_sizes, self.mtimes)

    def table(self) -> pa.Table:
        """Each planned file with its id: what the store keeps while the plan is in progress."""
        return pa.table(
            {
                "id": pa.array(self.ids, pa.int64()),
                "path": self.paths,
                "size": pa.array(self.file_sizes, pa.int64()),
                "mtime_ns": pa.array(self.mtimes, pa.int64()),
            }
        )


class _Files(Indexed[ImageFile]):
    """Planned files by number, made when read (picklable: it travels to decoding workers)."""

    def __init__(self, paths: pa.Array, sizes: np.ndarray, mtimes: np.ndarray) -> None:
        self.paths, self.sizes, self.mtimes = paths, sizes, mtimes

    def __len__(self) -> int:
        return len(self.paths)

    def at(self, k: int) -> ImageFile:
        return ImageFile(self.paths[k].as_py(), int(self.sizes[k]), int(self.mtimes[k]))
