"""Executors: work items in, shard results out, in any order.

An executor turns each ``WorkItem`` into an ``ItemResult`` (rows, their ids and vectors, and the
outcomes of inputs that failed). Ids come with the items, so results may arrive in any order;
the committer writes each as it comes. ``LocalExecutor`` runs here: images decoded in worker
processes (``ingest.reader``) and encoded in batches, captions tokenized and encoded a few
batches at a time. Content already indexed (the same sha256) takes its stored vector instead of
going through the model. When ``stop`` is set, the executor ends at the next batch and yields
what it finished of the items in flight (``complete=False``); their other inputs stay planned.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from retrieval.build.config import StageReport
from retrieval.build.image_items import ImageItems
from retrieval.build.plan import CaptionInput, WorkItem, collection_of, item_sizes
from retrieval.build.staging import StagedItem
from retrieval.build.stored import StoredVectors
from retrieval.ingest.reader import (
    DEFAULT_DECODE_TIMEOUT,
    DecodedGroup,
    Decoder,
    default_workers,
    read_images,
)
from retrieval.ingest.sources import ImageFile
from retrieval.model.encoder import Encoder
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.outcomes import Outcome
from retrieval.progress import Progress
from retrieval.store.schema import CaptionRow, ImageRow, Row

__all__ = ["Executor", "ItemResult", "LocalExecutor", "StoredVectors", "caption_row"]


@dataclass
class ItemResult:
    """What became of a work item's inputs: the rows written and the inputs that failed."""

    item: WorkItem
    ids: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    complete: bool = False  # every input of the item is settled (False: a stop came first)
    encoded: int = 0
    reused: int = 0
    truncated: int = 0
    staged: StagedItem | None = None  # written by a worker elsewhere: rows in its file, not here

    @classmethod
    def of_staged(cls, item: WorkItem, staged: StagedItem) -> ItemResult:
        """A whole item a worker staged (``build.staging``)."""
        return cls(
            item,
            outcomes=list(staged.outcomes),
            complete=True,
            encoded=staged.encoded,
            reused=staged.reused,
            truncated=staged.truncated,
            staged=staged,
        )

    @property
    def settled(self) -> int:
        return len(self.ids) + len(self.outcomes)

    @property
    def added(self) -> int:
        """Rows this result adds to its collection."""
        return self.staged.rows if self.staged is not None else len(self.rows)

    def matrix(self, dim: int) -> np.ndarray:
        return (
            np.stack(self.vectors).astype(np.float32, copy=False)
            if self.vectors
            else np.empty((0, dim), np.float32)
        )


class Executor(Protocol):
    """Runs work items; yields a result for each (a partial one for those a stop interrupted).

    ``stages`` says how the last run's stages went where the executor measures them (a cluster's),
    ``gpus`` how many GPUs each of its encoding workers has; ``close`` releases its workers.
    """

    stages: tuple[StageReport, ...]
    gpus: float

    def close(self) -> None: ...

    def run(
        self,
        items: Sequence[WorkItem],
        stored: StoredVectors,
        progress: Progress,
        stop: threading.Event | None = None,
    ) -> Iterator[ItemResult]: ...


class LocalExecutor:
    """This machine: decoding worker processes, the model on the encoder's device."""

    stages: tuple[StageReport, ...] = ()  # the model and decoding share the machine: not timed apart

    def __init__(
        self,
        encoder: Encoder,
        root: Path | None,
        *,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
        decode: Decoder | None = None,
        start_method: str | None = None,
    ) -> None:
        self.encoder = encoder
        self.root = root
        self.workers = default_workers(workers)
        self.max_pixels = max_pixels
        self.decode_timeout = decode_timeout
        self.decode = decode  # another decoder in place of ingest.reader.decode_file (module-level)
        self.start_method = start_method  # how decoding workers start (default: the platform's)
        self.gpus = 1.0 if encoder.runtime.device.type == "cuda" else 0.0

    def close(self) -> None:
        pass  # its decoding workers live for one run

    def run(
        self,
        items: Sequence[WorkItem],
        stored: StoredVectors,
        progress: Progress,
        stop: threading.Event | None = None,
    ) -> Iterator[ItemResult]:
        if not len(items):
            return
        collection = collection_of(items)
        progress.start(collection, sum(item_sizes(items)))
        try:
            if collection == "images":
                yield from self._images(items, stored, progress, stop)
            else:
                yield from self._captions(items, stored, progress, stop)
        finally:
            progress.finish()

    # -- images ------------------------------------------------------------------------------------

    def _images(
        self,
        items: Sequence[WorkItem],
        stored: StoredVectors,
        progress: Progress,
        stop: threading.Event | None,
    ) -> Iterator[ItemResult]:
        if self.root is None:
            raise ValueError("an image work item needs the executor's image root")
        run = _ImageRun(items, stored, progress)
        with self._feeding_threads():
            groups = read_images(
                self.root,
                run.files(),
                self.encoder.preprocess,
                workers=self.workers,
                max_pixels=self.max_pixels,
                decode_timeout=self.decode_timeout,
                decode=self.decode,
                start_method=self.start_method,
            )
            for group in _until_stopped(groups, stop):
                yield from run.take(group)
                if len(run.waiting) >= self.encoder.image_batch_size:
                    yield from run.encode(self.encoder)
            if stop is None or not stop.is_set():
                yield from run.encode(self.encoder)
        # Stopped: what each item in flight finished is committed; the rest stays planned.
        yield from run.unfinished()

    @contextlib.contextmanager
    def _feeding_threads(self) -> Iterator[None]:
        """On a GPU the main process only feeds the device: its CPU threads would spin against the
        decoding workers for the same cores. torch's thread count is the process's: restored after."""
        threads = torch.get_num_threads()
        if self.encoder.runtime.device.type == "cuda":
            torch.set_num_threads(min(threads, 2))
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    # -- captions ----------------------------------------------------------------------------------

    def _captions(
        self,
        items: Sequence[WorkItem],
        stored: StoredVectors,
        progress: Progress,
        stop: threading.Event | None,
    ) -> Iterator[ItemResult]:
        # The bar moves every few model batches, not once an item (65,536 captions by default);
        # tokens are made a chunk ahead while the model runs, and held for two chunks only.
        step = self.encoder.text_batch_size * 4
        for item in items:
            inputs = [x for x in item.inputs if isinstance(x, CaptionInput)]
            hashes = [x.sha256 for x in inputs]
            found = [stored.get(h) for h in hashes]
            ready: dict[int, np.ndarray] = {k: v for k, v in enumerate(found) if v is not None}
            todo = [k for k, v in enumerate(found) if v is None]
            truncated = np.zeros(len(inputs), dtype=bool)
            if ready:
                reused = sorted(ready)
                _, flags = self.encoder.text_batcher.tokenize_flagged([inputs[k].record.text for k in reused])
                truncated[reused] = flags
            progress.advance(len(ready))
            stopped = False
            chunks = self.encoder.encode_text_chunks([inputs[k].record.text for k in todo], step)
            while not (stopped := stop is not None and stop.is_set()):
                chunk = next(chunks, None)
                if chunk is None:
                    break
                offset, vectors, flags = chunk
                part = todo[offset : offset + len(vectors)]
                ready.update(zip(part, vectors, strict=True))
                truncated[part] = flags
                progress.advance(len(part))
            chunks.close()
            result = ItemResult(item, complete=not stopped)
            fresh = set(todo)
            for k in sorted(ready):
                row = caption_row(inputs[k], hashes[k], bool(truncated[k]))
                result.ids.append(item.ids[k])
                result.rows.append(row)
                result.vectors.append(ready[k])
                result.encoded += k in fresh
                result.reused += k not in fresh
                result.truncated += bool(truncated[k])
            if result.settled:
                yield result
            if stopped:
                return


def caption_row(x: CaptionInput, sha256: str, truncated: bool) -> CaptionRow:
    """The row a planned caption becomes."""
    r = x.record
    cut = ("truncated",) if truncated else ()
    return CaptionRow(r.text, r.source, r.row, r.image, sha256, x.size, x.mtime_ns, cut, x.metadata)


class _ImageRun:
    """The images of some work items on their way through decoding and the model.

    Inputs are numbered in plan order (the reader's file index); each settles as a row with its
    vector or as an outcome, and an item is yielded once all its inputs have settled.
    """

    def __init__(self, items: Sequence[WorkItem], stored: StoredVectors, progress: Progress) -> None:
        self.items = items if isinstance(items, ImageItems) else ImageItems.of(items)
        self.results: dict[int, ItemResult] = {}  # by position: items some input of which has settled
        self.stored = stored
        self.progress = progress
        self.rows: dict[int, ImageRow] = {}  # decoded, waiting for the model
        self.waiting: list[tuple[int, np.ndarray]] = []  # (input number, pixels (1, H, W, 3))

    def files(self) -> Sequence[ImageFile]:
        return self.items.files()

    def take(self, group: DecodedGroup) -> Iterator[ItemResult]:
        """A decoded group: failures settle now, known content takes its stored vector."""
        for index, outcome in group.failures:
            yield from self._settle(index, outcome=outcome)
        for k, image in enumerate(group.images):
            x = self.items.input(image.index)
            flags = ("reduced_on_load",) if image.reduced else ()
            row = ImageRow(x.path, image.sha256, x.size, x.mtime_ns, image.width, image.height, flags)
            if (vector := self.stored.get(image.sha256)) is not None:
                yield from self._settle(image.index, row, vector, fresh=False)
            else:
                self.rows[image.index] = row
                self.waiting.append((image.index, group.pixels[k : k + 1].numpy()))

    def encode(self, encoder: Encoder) -> Iterator[ItemResult]:
        """Everything decoded so far through the model, as one batch."""
        if not self.waiting:
            return
        vectors = encoder.encode_pixels(np.concatenate([pixels for _, pixels in self.waiting]))
        waiting, self.waiting = self.waiting, []
        for (index, _), vector in zip(waiting, vectors, strict=True):
            yield from self._settle(index, self.rows.pop(index), vector, fresh=True)

    def unfinished(self) -> Iterator[ItemResult]:
        """Items a stop interrupted, with what they finished."""
        yield from (r for r in self.results.values() if r.settled)

    def _settle(
        self,
        index: int,
        row: ImageRow | None = None,
        vector: np.ndarray | None = None,
        outcome: Outcome | None = None,
        fresh: bool = False,
    ) -> Iterator[ItemResult]:
        position, k = self.items.place(index)
        result = self.results.get(position)
        if result is None:
            result = self.results[position] = ItemResult(self.items[position])
        item = result.item
        if outcome is not None:
            result.outcomes.append(outcome)
        elif row is not None and vector is not None:
            result.ids.append(item.ids[k])
            result.rows.append(row)
            result.vectors.append(vector)
            result.encoded += fresh
            result.reused += not fresh
        self.progress.advance(1)
        if result.settled == len(item.ids):
            result.complete = True
            yield self.results.pop(position)


def _until_stopped(groups: Iterator[DecodedGroup], stop: threading.Event | None) -> Iterator[DecodedGroup]:
    """``groups`` until ``stop`` is set. A worker that a terminal's Ctrl-C reached before it could
    ignore it ends the decoding with an error: once stopping, that is simply the end."""
    try:
        for group in groups:
            yield group
            if stop is not None and stop.is_set():
                return
    except Exception:
        if stop is None or not stop.is_set():
            raise
