"""What the planner hands the executor: inputs, work items, and the view of a collection it
planned against (``build.plan`` makes them)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar, overload

import numpy as np
import pyarrow as pa

from retrieval.ingest.sources import CaptionRecord
from retrieval.outcomes import Outcome
from retrieval.store.manifest import CollectionState

__all__ = [
    "CaptionInput",
    "CollectionView",
    "CutItems",
    "ImageInput",
    "Indexed",
    "Input",
    "Reader",
    "WorkItem",
    "metadata_text",
    "row_digest",
]


@dataclass(frozen=True)
class ImageInput:
    """An image file to decode and encode."""

    path: str  # relative to the root
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class CaptionInput:
    """A caption to encode: the record as read, its metadata as stored, its source's stats."""

    record: CaptionRecord
    metadata: str  # JSON, keys sorted
    size: int
    mtime_ns: int

    @property
    def sha256(self) -> str:
        """Of the text alone: identical captions share a vector."""
        return hashlib.sha256(self.record.text.encode()).hexdigest()

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            self.record.source,
            self.record.row,
            row_digest(self.record.text, self.record.image, self.metadata),
        )


Input = ImageInput | CaptionInput


@dataclass(frozen=True)
class WorkItem:
    """Inputs encoded and committed together (one shard), each with its pre-assigned id."""

    collection: str
    number: int
    ids: tuple[int, ...]
    inputs: tuple[Input, ...]


@dataclass(frozen=True)
class CollectionView:
    """What the planner reads of one collection (``read_view``)."""

    state: CollectionState
    rows: pa.Table  # live rows, the planner's columns
    outcomes: list[Outcome]
    reserved: dict[tuple[Any, ...], int]  # inputs an earlier plan gave ids that no shard holds yet
    # Captions: the rows of the given sources with what they read (``_CAPTION_CONTENT``), read
    # when the planner compares them; None: ``rows`` holds those columns itself.
    content: Callable[[set[str]], pa.Table] | None = None


Reader = Callable[[Path, str, str | None], Iterable[CaptionRecord | Outcome]]


def metadata_text(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, default=str)


# -- ids and items -------------------------------------------------------------------------------


def row_digest(text: str, image: str | None, metadata: str) -> int:
    """A caption row's key: 64 bits of the sha256 of what it reads (text, image, metadata)."""
    data = json.dumps([text, image, metadata]).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


T = TypeVar("T")


class Indexed(Sequence[T]):
    """A sequence whose elements are made when asked for (``at``), by number or slice."""

    def at(self, number: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            numbers = range(len(self))[index]
            if numbers.step == 1:  # one pass: a caption plan's items are read in order
                return list(islice(iter(self), numbers.start, numbers.stop))
            return [self.at(k) for k in numbers]
        return self.at(range(len(self))[index])


class CutItems(Indexed[WorkItem]):
    """A plan's work items held as columns of planned inputs, cut into items where ``cuts`` say:
    the position each item starts at, then the number of planned inputs."""

    collection: str
    cuts: np.ndarray

    def table(self) -> pa.Table:
        """Each planned input with its id: what the store keeps while the plan is in progress."""
        raise NotImplementedError

    @property
    def sizes(self) -> list[int]:
        return [int(n) for n in np.diff(self.cuts)]

    def __len__(self) -> int:
        return len(self.cuts) - 1
