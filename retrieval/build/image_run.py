"""The images of a local build's work items on their way from the decoding workers through the model.

``ImageRun`` takes the decoded groups as they come: failures settle at once, content indexed
before takes its stored vector, the rest waits for the model in batches; JPEGs kept for the GPU are
decoded there (``ingest.gpu_decode``), those it refuses on the CPU. On shared CPU cores each batch
runs with the threads the model's share of the work gives it (``build.cores``). An item is
yielded once every input of it has settled.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from retrieval.build.config import StageReport
from retrieval.build.cores import CoreShare
from retrieval.build.image_items import ImageItems
from retrieval.build.plan import WorkItem
from retrieval.build.results import ItemResult
from retrieval.build.stored import StoredVectors
from retrieval.ingest.decoding import DecodeError, decode_bytes
from retrieval.ingest.gpu_decode import GpuJpegDecoder
from retrieval.ingest.reader import DEFAULT_DECODE_TIMEOUT, DecodedGroup, attempt
from retrieval.ingest.sources import ImageFile
from retrieval.model.encoder import Encoder
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.outcomes import Outcome
from retrieval.progress import Progress
from retrieval.store.schema import ImageRow

__all__ = ["ImageRun"]

_Failed = tuple[int, Outcome]  # an input number and why it failed


class ImageRun:
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
        decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
    ) -> None:
        self.decode_timeout = decode_timeout  # for the JPEGs the GPU refused, decoded here
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
        wall, cpu = time.perf_counter(), time.process_time()
        numbers, pixels, failed = self._batch(encoder)
        vectors = self._model(encoder, pixels, share) if numbers else np.empty((0, 0), np.float32)
        self.encode_cpu += time.process_time() - cpu
        self.encode_wall += time.perf_counter() - wall
        self.encoded += len(vectors)
        for index, outcome in failed:
            self.rows.pop(index)
            yield from self._settle(index, outcome=outcome)
        for index, vector in zip(numbers, vectors, strict=True):
            yield from self._settle(index, self.rows.pop(index), vector, fresh=True)

    def _model(
        self, encoder: Encoder, pixels: np.ndarray | torch.Tensor, share: CoreShare | None
    ) -> np.ndarray:
        """The model on ``pixels``; on shared cores with the threads its share gives it, measured
        first (while unknown) on a probe of two images at one thread."""
        if share is None:
            return encoder.encode_pixels(pixels)
        parts = []
        if share.model_cpu is None and len(pixels) > _PROBE:
            parts.append(_encode_with(encoder, pixels[:_PROBE], 1, share))
            pixels = pixels[_PROBE:]
        decode_cpu = self.decode_cpu / self.decoded if self.decoded else None
        parts.append(_encode_with(encoder, pixels, share.threads(decode_cpu), share))
        return np.concatenate(parts)

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
            timeout = self.decode_timeout
            done = attempt(decode_bytes, data, encoder.preprocess, self.max_pixels, timeout=timeout)
            if isinstance(done, DecodeError):
                x = self.items.input(index)
                outcome = Outcome(x.path, "failed", "decode", str(done), done.code, x.size, x.mtime_ns)
                failed.append((index, outcome))
                continue
            _, _, pixels, reduced = done
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


_PROBE = 2  # images a batch encodes at one thread to measure the model (ViT-B/16 on a CPU: 1 s)


def _encode_with(
    encoder: Encoder, pixels: np.ndarray | torch.Tensor, threads: int, share: CoreShare
) -> np.ndarray:
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    began = time.thread_time()
    vectors = encoder.encode_pixels(pixels)
    share.add_encoded(len(vectors), threads, time.thread_time() - began)
    return vectors
