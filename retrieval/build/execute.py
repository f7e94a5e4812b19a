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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from retrieval.build.config import StageReport
from retrieval.build.cores import CoreShare
from retrieval.build.image_run import ImageRun
from retrieval.build.plan import CaptionInput, WorkItem, collection_of, item_sizes
from retrieval.build.results import ItemResult
from retrieval.build.stored import StoredVectors
from retrieval.ingest.gpu_decode import GpuJpegDecoder
from retrieval.ingest.reader import (
    DEFAULT_DECODE_TIMEOUT,
    DecodedGroup,
    Decoder,
    default_workers,
    read_images,
)
from retrieval.model.encoder import Encoder
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.progress import Progress
from retrieval.store.schema import CaptionRow

__all__ = ["Executor", "ItemResult", "LocalExecutor", "StoredVectors", "caption_row"]


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
        run = ImageRun(items, stored, progress, self.gpu_decoder, self.max_pixels, self.decode_timeout)
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
