"""What a Ray cluster's workers run for ``index build --engine ray``: decoding a group of image
files (a CPU task), encoding (``EncodeWorker``, an actor holding the model), and staging one work
item's data file (a task). Plain functions and a plain class: ``build.ray_engine`` makes them
remote with their resources, so this module imports no Ray and runs in a test as it is.

Decoding is the local reader's own (``ingest.reader.decode_group``: per-file isolation, time and
pixel limits). Pixels and vectors travel between stages as NumPy arrays in Ray's object store,
never through the driver, which sees only what it needs to decide: content hashes, outcomes,
file references.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.build.staging import StagedItem, Staging
from retrieval.errors import ConfigError
from retrieval.ingest.reader import DecodedImage, Decoder, decode_group
from retrieval.ingest.sources import ImageFile
from retrieval.model.preprocess import ImagePreprocess
from retrieval.model.spec import ModelSpec
from retrieval.outcomes import Outcome
from retrieval.store.schema import CaptionRow, Row, shard_table

__all__ = ["Decoded", "EncodeWorker", "Encoded", "ItemSpec", "decode_files", "stage_item"]


@dataclass(frozen=True)
class Decoded:
    """A decoded group as the driver sees it: no pixels (those stay in the object store)."""

    images: list[DecodedImage]
    failures: list[tuple[int, Outcome]]
    seconds: float


@dataclass(frozen=True)
class Encoded:
    """What an encoding call tells the driver: how long it took, and where it ran."""

    inputs: int
    seconds: float
    worker: str  # host:pid, to see a worker that was started again


def decode_files(
    root: str,
    files: list[tuple[int, ImageFile]],
    preprocess: ImagePreprocess,
    max_pixels: int,
    decode_timeout: float,
    decode: Decoder | None,
) -> tuple[Decoded, np.ndarray]:
    """Decode ``files`` (with their plan indexes) under ``root`` -> (what became of them, the
    pixels of those decoded, uint8 (n, H, W, 3))."""
    started = time.perf_counter()
    group = decode_group(
        Path(root), files, preprocess, max_pixels=max_pixels, decode_timeout=decode_timeout, decode=decode
    )
    return Decoded(group.images, group.failures, time.perf_counter() - started), group.pixels.numpy()


class EncodeWorker:
    """One model, loaded once, on the GPU Ray gave this worker (or its CPUs)."""

    def __init__(
        self,
        spec: ModelSpec,
        digest: str,
        *,
        precision: str,
        image_batch_size: int | None,
        threads: int,
        text_threads: int,
        gpu: bool,
    ) -> None:
        import torch  # torch and the towers: only where a model runs

        from retrieval.model.encoder import Encoder

        # This process is the model's alone: its torch threads are set per call, to the CPUs the
        # call may use (images: decoding tasks run beside it).
        self.torch = torch
        self.threads = {"images": threads, "texts": text_threads}
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        self.encoder = Encoder.load(
            spec,
            device="cuda" if gpu else "cpu",
            precision=precision,
            image_batch_size=image_batch_size,
        )
        found = self.encoder.fingerprint.digest if self.encoder.fingerprint else ""
        if found != digest:
            raise ConfigError(
                f"on {self.where}: the model files read there are not the driver's (fingerprint "
                f"{found[:12]}, the build's is {digest[:12]}): give every node the same files"
            )

    def ready(self) -> str:
        return self.where

    def images(self, picks: Sequence[np.ndarray], *pixels: np.ndarray) -> tuple[np.ndarray, Encoded]:
        """The images ``picks[g]`` of each decoded group ``pixels[g]``, as one batch -> unit-norm
        float32 (n, D), in that order."""
        started = time.perf_counter()
        self.torch.set_num_threads(self.threads["images"])
        batch = np.concatenate([group[k] for group, k in zip(pixels, picks, strict=True)])
        vectors = self.encoder.encode_pixels(batch)
        return vectors, Encoded(len(vectors), time.perf_counter() - started, self.where)

    def texts(self, texts: list[str]) -> tuple[tuple[np.ndarray, np.ndarray], Encoded]:
        """Captions -> (unit-norm float32 (n, D), whether each was cut to the tokenizer's limit)."""
        started = time.perf_counter()
        self.torch.set_num_threads(self.threads["texts"])
        vectors, flags = [], []
        for _, v, f in self.encoder.encode_text_chunks(texts, max(1, len(texts))):
            vectors.append(v)
            flags.append(f)
        dim = self.encoder.dim
        joined = np.concatenate(vectors) if vectors else np.empty((0, dim), np.float32)
        cut = np.concatenate(flags) if flags else np.zeros(0, bool)
        return (joined, cut), Encoded(len(texts), time.perf_counter() - started, self.where)


@dataclass(frozen=True)
class ItemSpec:
    """What the staging task needs of one work item: where, under which name, and its rows.

    ``ids`` and ``rows`` come in the order of the vectors: first those reused (``reused``), then
    for each encoded part the rows it picks from its batch's output.
    """

    folder: str
    prefix: str
    name: str
    collection: str
    fingerprint: dict[str, Any]
    ids: list[int]
    rows: list[Row]
    picks: list[np.ndarray]  # per encoded part: its rows' positions in its batch's output
    outcomes: tuple[Outcome, ...]


def stage_item(spec: ItemSpec, reused: np.ndarray, *parts: Any) -> StagedItem:
    """Assemble one item's rows with their vectors and stage them (``build.staging``).

    ``parts`` are the outputs of the encoding calls ``spec.picks`` points into: image vectors, or
    (vectors, truncated flags) for captions.
    """
    started = time.perf_counter()
    dim = int(spec.fingerprint["dim"])
    matrices = [reused.reshape(-1, dim)]
    rows = list(spec.rows)
    at = len(reused)
    for part, picks in zip(parts, spec.picks, strict=True):
        vectors, flags = part if isinstance(part, tuple) else (part, None)
        matrices.append(vectors[picks])
        if flags is not None:
            for k, cut in zip(range(at, at + len(picks)), flags[picks], strict=True):
                row = rows[k]
                if cut and isinstance(row, CaptionRow):
                    rows[k] = replace(row, flags=("truncated",))
        at += len(picks)
    truncated = sum(isinstance(r, CaptionRow) and "truncated" in r.flags for r in rows)
    table = None
    if rows:
        order = np.argsort(np.asarray(spec.ids, np.int64), kind="stable")
        ids = np.asarray(spec.ids, np.int64)[order]
        vectors = np.concatenate(matrices)[order]
        table = shard_table(spec.collection, ids, [rows[k] for k in order], vectors, spec.fingerprint)
    staged = Staging(Path(spec.folder), spec.prefix).write(
        spec.name,
        table,
        spec.outcomes,
        encoded=len(rows) - len(reused),
        reused=len(reused),
        truncated=truncated,
    )
    return replace(staged, seconds=time.perf_counter() - started)
