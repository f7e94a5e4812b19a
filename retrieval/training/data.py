"""Training batches from a pairs file: the indexer's decoding and preprocessing, in a fixed order.

Captions are tokenized once. Images are decoded by the same reader as ``index build`` (worker
processes, the same pixel limit and per-file outcomes): once up front into an in-memory cache when
the decoded corpus fits ``cache_bytes``, otherwise batch by batch each epoch, in order. A file
that cannot be decoded is recorded once and its pairs leave the batches they were drawn into;
batches are cut the same way whether a failure is known in advance or found on the way, so the
cached and the streamed paths (and a resumed run) train on exactly the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.durable import file_sha256
from retrieval.errors import InputError
from retrieval.ingest.pairs import PairSet, read_pairs
from retrieval.ingest.reader import default_workers, read_images
from retrieval.model.preprocess import ImagePreprocess, TextBatch, TextBatcher
from retrieval.outcomes import Outcome
from retrieval.progress import Progress

__all__ = ["Batch", "PairData", "random_crops"]


@dataclass(frozen=True)
class Batch:
    """One micro-batch: pixels, tokens, and which image and text each row is (for duplicates)."""

    pixels: torch.Tensor  # uint8 (B, H, W, 3)
    text: TextBatch
    image_keys: torch.Tensor  # (B,) int64: equal when two rows show the same image
    text_keys: torch.Tensor  # (B,) int64: equal when two rows have the same caption


class PairData:
    """The usable pairs of a file, ready to be cut into batches in any order."""

    def __init__(
        self,
        path: Path,
        preprocess: ImagePreprocess,
        batcher: TextBatcher,
        progress: Progress,
        *,
        images_root: Path | None = None,
        workers: int | None = None,
        cache_bytes: int = 2 << 30,
    ) -> None:
        self.pairs: PairSet = read_pairs(path, images_root=images_root)
        self.preprocess = preprocess
        self.batcher = batcher
        self.workers = default_workers(workers)
        self.sha256 = file_sha256(path)
        self.files, missing = self.pairs.image_files()
        self.outcomes: list[Outcome] = list(self.pairs.outcomes) + missing
        position = {file.path: k for k, file in enumerate(self.files)}
        kept = [p for p in self.pairs.pairs if p.image in position]
        texts = list(dict.fromkeys(p.caption for p in kept))
        text_key = {t: k for k, t in enumerate(texts)}
        self.image_of = np.array([position[p.image] for p in kept], dtype=np.int64)  # pair -> file
        self.text_of = np.array([text_key[p.caption] for p in kept], dtype=np.int64)  # pair -> text
        self.tokens = batcher.tokenize(texts)
        self.failed = np.zeros(len(self.files), dtype=bool)
        self.cache: np.ndarray | None = None
        image_bytes = preprocess.height * preprocess.width * 3
        if len(self.files) * image_bytes <= cache_bytes:
            self._fill_cache(progress)
        if not len(self):
            raise InputError(
                f"{path}: no usable image-caption pair ({len(self.outcomes)} rows or files failed)"
            )

    def __len__(self) -> int:
        """Pairs whose image file exists (one that turns out undecodable leaves its batches)."""
        return len(self.image_of)

    def _fill_cache(self, progress: Progress) -> None:
        cache = np.zeros((len(self.files), self.preprocess.height, self.preprocess.width, 3), np.uint8)
        progress.start("decoding", len(self.files))
        root = self.pairs.root
        for group in read_images(root, self.files, self.preprocess, workers=self.workers, group=16):
            for k, image in enumerate(group.images):
                cache[image.index] = group.pixels[k].numpy()
            self._record(group.failures)
            progress.advance(len(group.images) + len(group.failures))
        progress.finish()
        self.cache = cache

    def _record(self, failures: Sequence[tuple[int, Outcome]]) -> None:
        for index, outcome in failures:
            if not self.failed[index]:
                self.failed[index] = True
                self.outcomes.append(outcome)

    def batches(self, chunks: Sequence[np.ndarray]) -> Iterator[Batch]:
        """One ``Batch`` per chunk of pair indices, in order; unreadable images leave their batch.

        Every chunk but the last must have the same length.
        """
        if self.cache is not None:
            for chunk in chunks:
                chunk = chunk[~self.failed[self.image_of[chunk]]]
                yield self._batch(chunk, torch.from_numpy(self.cache[self.image_of[chunk]]))
            return
        # Decode as we go: a flat file list in batch order, one reader group per batch. Every chunk
        # but the last has the same length, so reader group g is chunk g.
        if not chunks:
            return
        size = len(chunks[0])
        files = [self.files[i] for chunk in chunks for i in self.image_of[chunk]]
        groups = read_images(
            self.pairs.root, files, self.preprocess, workers=self.workers, group=size, ordered=True
        )
        for g, (chunk, group) in enumerate(zip(chunks, groups, strict=True)):
            base = g * size
            self._record([(int(self.image_of[chunk[i - base]]), o) for i, o in group.failures])
            rows = np.array([image.index - base for image in group.images], dtype=np.int64)
            yield self._batch(chunk[rows], group.pixels)

    def _batch(self, chunk: np.ndarray, pixels: torch.Tensor) -> Batch:
        text_keys = self.text_of[chunk]
        return Batch(
            pixels=pixels,
            text=self.batcher.pad([self.tokens[k] for k in text_keys]),
            image_keys=torch.from_numpy(self.image_of[chunk]),
            text_keys=torch.from_numpy(text_keys),
        )


def random_crops(pixels: torch.Tensor, area: tuple[float, float] = (0.6, 1.0)) -> torch.Tensor:
    """Random resized crops of uint8 (B, H, W, 3) images -> float (B, H, W, 3) of the same size.

    Each crop covers ``area`` of the image (as a fraction) with an aspect ratio between 3:4 and
    4:3, is scaled back with antialiasing, and half of them are mirrored left to right. Draws
    from torch's global generator, which training seeds per step, so a resumed run draws the same
    crops.
    """
    b, h, w, _ = pixels.shape
    x = pixels.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    out = torch.empty_like(x)
    fractions = torch.empty(b).uniform_(*area)
    ratios = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3)))
    corners = torch.rand(b, 2)
    mirrored = torch.rand(b) < 0.5
    for i in range(b):
        size = float(fractions[i]) * h * w
        ch = max(1, min(h, round(math.sqrt(size / float(ratios[i])))))
        cw = max(1, min(w, round(math.sqrt(size * float(ratios[i])))))
        top, left = int(corners[i, 0] * (h - ch + 1)), int(corners[i, 1] * (w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        if mirrored[i]:
            out[i] = out[i].flip(-1)
    return out.permute(0, 2, 3, 1)
