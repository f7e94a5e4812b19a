"""Fast, exact batched encoding on top of ``MultiModalEncoder``.

``Encoder.load(ModelSpec(...))`` reads the checkpoint safely, builds the towers, fingerprints the
model and places it on a device; ``encode_texts`` and ``encode_images`` then return float32
``(n, D)`` unit-norm numpy arrays equal (cosine >= 0.9999 in fp32) to the seed's one-at-a-time
computation:

- texts are tokenized once, sorted by length and padded per batch, then put back in order;
- images are decoded and resized in a thread pool (PIL releases the GIL) one batch ahead of the
  model, moved to the device as uint8 and normalized there.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from retrieval.errors import ConfigError
from retrieval.model.checkpoint import Checkpoint, CheckpointInfo, KnownHash, load_checkpoint
from retrieval.model.dual_encoder import MultiModalEncoder
from retrieval.model.fingerprint import ModelFingerprint
from retrieval.model.imaging import open_image, to_rgb
from retrieval.model.preprocess import ImagePreprocess, TextBatcher
from retrieval.model.runtime import Runtime, resolve_runtime
from retrieval.model.spec import ModelSpec

__all__ = ["Encoder", "ImageInput", "load_model"]

ImageInput = Image.Image | str | Path
T = TypeVar("T")
# Texts are tokenized this many batches at a time: enough to sort by length, bounded in memory.
_TEXT_CHUNK_BATCHES = 16


def load_model(spec: ModelSpec, known: KnownHash | None = None) -> tuple[MultiModalEncoder, Checkpoint]:
    """Build the towers from their folders and load the checkpoint into them, strictly.

    ``known``: the checkpoint's recorded hash, used while the file is unchanged. The model
    is returned in eval mode, as the seed uses it for inference.
    """
    checkpoint = load_checkpoint(spec.checkpoint, trust_checkpoint=spec.trust_checkpoint, known=known)
    model = MultiModalEncoder.from_state_dict(checkpoint.model_state_dict, spec.text_model, spec.vision_model)
    return model.eval(), checkpoint


class Encoder:
    """Batched text and image encoding with one model on one device.

    Safe to use from several threads at once: the model is put in eval mode once, and inference
    mode and autocast are per thread. Use as a context manager or call ``close()`` to stop the
    preprocessing threads.
    """

    def __init__(
        self,
        model: MultiModalEncoder,
        *,
        runtime: Runtime | None = None,
        fingerprint: ModelFingerprint | None = None,
        text_batch_size: int | None = None,
        image_batch_size: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.runtime = runtime or resolve_runtime()
        self.model = model.to(self.runtime.device).eval()  # an encoder only infers: eval mode, once
        self.preprocess = ImagePreprocess.from_processor(model.image_processor)
        self.text_batcher = TextBatcher.for_model(model)
        self.fingerprint = fingerprint
        self.source: CheckpointInfo | None = None
        self.spec: ModelSpec | None = None  # where it was loaded from (Encoder.load)
        on_gpu = self.runtime.device.type == "cuda"
        self.text_batch_size = _positive(text_batch_size, 512 if on_gpu else 64, "text batch size")
        self.image_batch_size = _positive(image_batch_size, 256 if on_gpu else 16, "image batch size")
        self.threads = _positive(threads, min(32, os.cpu_count() or 1), "threads")
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        device: str = "auto",
        precision: str = "auto",
        text_batch_size: int | None = None,
        image_batch_size: int | None = None,
        threads: int | None = None,
        known: KnownHash | None = None,
    ) -> Encoder:
        """Load ``spec`` (safely, strictly) onto a device and fingerprint it.

        ``known``: the checkpoint's hash as an index recorded it with the file's stats; while
        they are unchanged a multi-GB file is not hashed again.
        """
        runtime = resolve_runtime(device, precision)
        model, checkpoint = load_model(spec, known)
        encoder = cls(
            model,
            runtime=runtime,
            text_batch_size=text_batch_size,
            image_batch_size=image_batch_size,
            threads=threads,
        )
        encoder.source = checkpoint.info
        encoder.spec = spec
        encoder.fingerprint = ModelFingerprint.compute(
            checkpoint_sha256=checkpoint.sha256,
            text_config=model.text_encoder.config,
            vision_config=model.visual_encoder.config,
            tokenizer_folder=model.text_folder,
            max_length=encoder.text_batcher.max_length,
            preprocess=encoder.preprocess,
            dim=model.embed_dim,
        )
        return encoder

    @property
    def dim(self) -> int:
        return self.model.embed_dim

    @property
    def temperature(self) -> float:
        """The model's learned softmax temperature (logits = cosine / temperature)."""
        return float(self.model.temperature.detach().float().mean())

    # -- texts --------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """``n`` strings -> float32 (n, D), unit norm, in input order.

        Texts are tokenized a chunk ahead in a worker thread while the model runs, and sorted by
        length within each chunk so that every batch is padded only to its own longest text.
        """
        size = _positive(batch_size, self.text_batch_size, "batch size")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start, vectors, _ in self.encode_text_chunks(texts, size * _TEXT_CHUNK_BATCHES, size):
            out[start : start + len(vectors)] = vectors
        return out

    def encode_text_chunks(
        self, texts: Sequence[str], chunk: int, batch_size: int | None = None
    ) -> Generator[tuple[int, np.ndarray, np.ndarray], None, None]:
        """``(offset, vectors, truncated)`` for each ``chunk`` of ``texts`` in turn; the next chunk
        is tokenized in a worker thread while the model encodes this one (the tokenizer releases
        the GIL, so both cores work), and only two chunks' tokens are held at a time."""
        size = _positive(batch_size, self.text_batch_size, "batch size")
        chunk = _positive(chunk, size, "chunk")

        def tokenize(start: int, stop: int) -> Callable[[], tuple[list[list[int]], np.ndarray]]:
            return self._executor().submit(self.text_batcher.tokenize_flagged, texts[start:stop]).result

        for start, (ids, truncated) in _ahead(len(texts), chunk, tokenize):
            out = np.empty((len(ids), self.dim), dtype=np.float32)
            with self._inference():
                for batch in self.text_batcher.batches_from_ids(ids, size):
                    out[batch.positions] = self._to_numpy(self.model.encode_text(batch.inputs()))
            yield start, out, truncated

    def encode_text_ids(self, ids: Sequence[Sequence[int]], batch_size: int | None = None) -> np.ndarray:
        """Token ids as ``text_batcher.tokenize`` makes them -> float32 (n, D), in input order."""
        size = _positive(batch_size, self.text_batch_size, "batch size")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        with self._inference():
            for batch in self.text_batcher.batches_from_ids(ids, size):
                out[batch.positions] = self._to_numpy(self.model.encode_text(batch.inputs()))
        return out

    # -- images -------------------------------------------------------------------------------

    def encode_images(self, images: Sequence[ImageInput], batch_size: int | None = None) -> np.ndarray:
        """``n`` PIL images or paths -> float32 (n, D), unit norm, in input order.

        Images are decoded and resized in the thread pool one batch ahead of the model. A path
        that cannot be decoded raises ``InputError`` naming it.
        """
        size = _positive(batch_size, self.image_batch_size, "batch size")
        out = np.empty((len(images), self.dim), dtype=np.float32)

        def prepare(start: int, stop: int) -> Callable[[], np.ndarray]:
            futures = [self._executor().submit(self.prepare_image, image) for image in images[start:stop]]
            return lambda: np.stack([f.result() for f in futures])

        for start, pixels in _ahead(len(images), size, prepare):
            out[start : start + len(pixels)] = self.encode_pixels(pixels)
        return out

    def encode_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Preprocessed uint8 (B, H, W, 3), as ``ImagePreprocess.to_pixels`` makes -> (B, D).

        A tensor may already be on the model's device (pixels decoded there).
        """
        expected = (self.preprocess.height, self.preprocess.width, 3)
        batch = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
        if batch.dtype != torch.uint8 or batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            shape = f"(B, {expected[0]}, {expected[1]}, 3)"
            raise ConfigError(f"pixels must be uint8 {shape}, got {pixels.dtype} {tuple(pixels.shape)}")
        if self.runtime.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.runtime.device, non_blocking=True)
        with self._inference():
            values = self.preprocess.normalize(batch)  # (B, 3, H, W) float32
            return self._to_numpy(self.model.encode_image({"pixel_values": values}))

    def prepare_image(self, image: ImageInput) -> np.ndarray:
        """One image or path -> the uint8 (H, W, 3) array ``encode_pixels`` takes."""
        rgb = to_rgb(image) if isinstance(image, Image.Image) else open_image(image)
        return self.preprocess.to_pixels(rgb)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:  # two threads encoding at once must not make two pools
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="retrieval-prep")
            return self._pool

    # -- plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        # The model stays in eval mode (set once, in __init__): switching modes per call would race
        # between threads. inference_mode and autocast are per thread.
        with torch.inference_mode(), self.runtime.autocast():
            yield

    @staticmethod
    def _to_numpy(features: torch.Tensor) -> np.ndarray:
        return features.float().cpu().numpy()

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ahead(total: int, size: int, start: Callable[[int, int], Callable[[], T]]) -> Iterator[tuple[int, T]]:
    """Yield ``(offset, result)`` per chunk of ``size``, the next chunk's work already started.

    ``start(a, b)`` begins the work for items ``a:b`` (in a pool) and returns how to collect it.
    """
    pending: Callable[[], T] | None = None
    for offset in range(0, total, size):
        current = pending or start(offset, min(offset + size, total))
        following = offset + size
        pending = start(following, min(following + size, total)) if following < total else None
        yield offset, current()


def _positive(value: int | None, default: int, what: str) -> int:
    """``value`` (or ``default`` when None), refused unless it is at least 1."""
    chosen = default if value is None else value
    if chosen < 1:
        raise ConfigError(f"{what} must be at least 1, got {chosen}")
    return int(chosen)
