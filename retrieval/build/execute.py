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
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from retrieval.build.config import StageReport
from retrieval.build.cores import CoreShare
from retrieval.build.image_items import ImageItems
from retrieval.build.plan import CaptionInput, WorkItem, collection_of, item_sizes
from retrieval.build.staging import StagedItem
from retrieval.build.stored import StoredVectors
from retrieval.ingest.decoding import DecodeError, decode_bytes
from retrieval.ingest.gpu_decode import GpuJpegDecoder
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

    ``stages`` says how the last run's stages went (``config.verdict`` reads them), ``gpus`` how
    many GPUs each of its encoding workers has, ``shared_cores`` how many CPU cores its stages
    share (a CPU build on one machine; None where each stage has its own); ``close`` releases its
    workers.
    """

    stages: tuple[StageReport, ...]
    gpus: float
    shared_cores: int | None

    def close(self) -> None: ...

    def run(
        self,
        items: Sequence[WorkItem],
        stored: StoredVectors,
        progress: Progress,
        stop: threading.Event | None = None,
    ) -> Iterator[ItemResult]: ...


class LocalExecutor:
    """This machine: decoding worker processes, the model on the encoder's device.

    On a CPU the model's threads follow its share of the work (``build.cores``); on a GPU the main
    process only feeds the device, with two threads, and with ``gpu_decoder`` decodes the JPEGs
    there (the workers only read and hash them). ``stages`` times decoding (the workers' CPU time)
    and encoding (on a CPU the model's CPU time; on a GPU its wall time, decoding there included)
    of the last run.
    """

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
        gpu_decoder: GpuJpegDecoder | None = None,
    ) -> None:
        self.encoder = encoder
        self.gpu_decoder = gpu_decoder  # JPEGs decoded on the GPU (None: every file on the CPU)
        self.root = root
        self.workers = default_workers(workers)
        self.max_pixels = max_pixels
        self.decode_timeout = decode_timeout
        self.decode = decode  # another decoder in place of ingest.reader.decode_file (module-level)
        self.start_method = start_method  # how decoding workers start (default: the platform's)
        on_gpu = encoder.runtime.device.type == "cuda"
        self.gpus = 1.0 if on_gpu else 0.0
        self.shared_cores: int | None = None if on_gpu else torch.get_num_threads()
        self.stages: tuple[StageReport, ...] = ()

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
        run = _ImageRun(items, stored, progress, self.gpu_decoder, self.max_pixels)
        with _restored_threads() as threads:
            share = None
            if self.encoder.runtime.device.type == "cuda":
                # The main process only feeds the device: more threads would spin against the
                # decoding workers for the same cores.
                torch.set_num_threads(min(threads, 2))
            else:
                share = CoreShare(threads)
                self.shared_cores = threads
            groups = read_images(
                self.root,
                run.files(),
                self.encoder.preprocess,
                workers=self.workers,
                max_pixels=self.max_pixels,
                decode_timeout=self.decode_timeout,
                decode=self.decode,
                start_method=self.start_method,
                gpu_jpegs=self.gpu_decoder is not None,
            )
            for group in _until_stopped(groups, stop):
                if share is not None:
                    share.add_decoded(group.files, group.cpu_seconds)
                yield from run.take(group)
                if run.pending >= self.encoder.image_batch_size:
                    yield from run.encode(self.encoder, share)
            if stop is None or not stop.is_set():
                if share is not None:
                    share.decoding = False
                yield from run.encode(self.encoder, share)
        self.stages = run.stages(max(1, self.workers), self.shared_cores if share else None)
        # Stopped: what each item in flight finished is committed; the rest stays planned.
        yield from run.unfinished()

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
        # Tokenizing and the model: CPU time on a CPU (the cores the stages share), else wall time.
        clock = time.perf_counter if self.shared_cores is None else time.process_time
        busy, encoded = 0.0, 0
        self.stages = ()
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
                began = clock()
                chunk = next(chunks, None)
                busy += clock() - began
                if chunk is None:
                    break
                offset, vectors, flags = chunk
                encoded += len(vectors)
                self.stages = (StageReport("encode", encoded, busy, self.shared_cores or 1),)
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


_Failed = tuple[int, Outcome]  # an input number and why it failed


class _ImageRun:
    """The images of some work items on their way through decoding and the model.

    Inputs are numbered in plan order (the reader's file index); each settles as a row with its
    vector or as an outcome, and an item is yielded once all its inputs have settled.
    """

    def __init__(
        self,
        items: Sequence[WorkItem],
        stored: StoredVectors,
        progress: Progress,
        gpu: GpuJpegDecoder | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.items = items if isinstance(items, ImageItems) else ImageItems.of(items)
        self.gpu = gpu  # decodes the JPEGs the workers kept as bytes
        self.max_pixels = max_pixels
        self.results: dict[int, ItemResult] = {}  # by position: items some input of which has settled
        self.stored = stored
        self.progress = progress
        self.rows: dict[int, ImageRow] = {}  # decoded, waiting for the model
        self.waiting: list[tuple[int, np.ndarray]] = []  # (input number, pixels (1, H, W, 3))
        self.jpegs: list[tuple[int, bytes]] = []  # (input number, JPEG for the GPU)
        self.decoded = self.encoded = 0
        self.decode_cpu = self.encode_cpu = self.encode_wall = 0.0  # seconds

    def files(self) -> Sequence[ImageFile]:
        return self.items.files()

    def take(self, group: DecodedGroup) -> Iterator[ItemResult]:
        """A decoded group: failures settle now, known content takes its stored vector."""
        self.decoded += group.files
        self.decode_cpu += group.cpu_seconds
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
        for image, data in group.jpegs:
            x = self.items.input(image.index)
            flags = ("gpu_decoded",)
            row = ImageRow(x.path, image.sha256, x.size, x.mtime_ns, image.width, image.height, flags)
            if (vector := self.stored.get(image.sha256)) is not None:
                yield from self._settle(image.index, row, vector, fresh=False)
            else:
                self.rows[image.index] = row
                self.jpegs.append((image.index, data))

    @property
    def pending(self) -> int:
        """Images waiting for the model."""
        return len(self.waiting) + len(self.jpegs)

    def encode(self, encoder: Encoder, share: CoreShare | None = None) -> Iterator[ItemResult]:
        """Everything decoded so far through the model, as one batch (with ``share``: on the CPU,
        with the threads the model's share of the cores gives it)."""
        if not self.pending:
            return
        threads = share.threads() if share is not None else torch.get_num_threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        wall, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
        numbers, pixels, failed = self._batch(encoder)
        vectors = encoder.encode_pixels(pixels) if numbers else np.empty((0, 0), np.float32)
        if share is not None:
            share.add_encoded(len(vectors), threads, time.thread_time() - own)
        self.encode_cpu += time.process_time() - cpu
        self.encode_wall += time.perf_counter() - wall
        self.encoded += len(vectors)
        for index, outcome in failed:
            self.rows.pop(index)
            yield from self._settle(index, outcome=outcome)
        for index, vector in zip(numbers, vectors, strict=True):
            yield from self._settle(index, self.rows.pop(index), vector, fresh=True)

    def _batch(self, encoder: Encoder) -> tuple[list[int], np.ndarray | torch.Tensor, list[_Failed]]:
        """What waits, as one batch of pixels: the input numbers, uint8 (B, H, W, 3) (on the
        device where some were decoded there) and the JPEGs the GPU refused that the CPU could not
        decode either."""
        numbers = [index for index, _ in self.waiting]
        cpu = [pixels for _, pixels in self.waiting]
        self.waiting = []
        if not self.jpegs:
            return numbers, np.concatenate(cpu) if cpu else np.empty((0, 0, 0, 3), np.uint8), []
        assert self.gpu is not None  # jpegs come only from workers told to keep them for it
        jpegs, self.jpegs = self.jpegs, []
        decoded, refused = self.gpu.decode([data for _, data in jpegs])
        failed: list[_Failed] = []
        for k in refused:  # odd JPEGs nvJPEG would not take: decoded here, or failed with the reason
            index, data = jpegs[k]
            try:
                _, _, pixels, reduced = decode_bytes(data, encoder.preprocess, self.max_pixels)
            except DecodeError as e:
                x = self.items.input(index)
                outcome = Outcome(x.path, "failed", "decode", str(e), e.code, x.size, x.mtime_ns)
                failed.append((index, outcome))
                continue
            flags = ("reduced_on_load",) if reduced else ()
            self.rows[index] = dataclasses.replace(self.rows[index], flags=flags)
            numbers.append(index)
            cpu.append(pixels[None])
        again = set(refused)
        numbers += [index for k, (index, _) in enumerate(jpegs) if k not in again]
        parts = [torch.from_numpy(np.concatenate(cpu)).to(decoded.device)] if cpu else []
        return numbers, torch.cat([*parts, decoded]), failed

    def stages(self, workers: int, shared_cores: int | None) -> tuple[StageReport, ...]:
        """Decoding (the workers' CPU time) and encoding: on shared cores its CPU time, which all
        the cores could do alone; on a GPU its wall time."""
        decode = StageReport("decode", self.decoded, self.decode_cpu, workers)
        if shared_cores is None:
            return decode, StageReport("encode", self.encoded, self.encode_wall, 1)
        return decode, StageReport("encode", self.encoded, self.encode_cpu, shared_cores)

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


@contextlib.contextmanager
def _restored_threads() -> Iterator[int]:
    """torch's thread count (the process's), given back as it was afterwards."""
    threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


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
