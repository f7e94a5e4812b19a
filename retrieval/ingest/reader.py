"""The reader stage: image files -> preprocessed uint8 pixels, in parallel worker processes.

Each worker decodes a small group of images (``group`` files) and returns them as one
``DecodedGroup``; groups complete out of order, so a slow file (a 169-megapixel PNG takes seconds)
holds back only its own group while the other workers keep the model fed. Every file ends as
pixels or as an ``Outcome`` with the reason: a bad file never costs its neighbours.

Each file also has a time limit (``decode_timeout``, 60 s by default): a decoder that spins on a
crafted file is interrupted by a timer signal and the file fails with the reason, instead of
holding its worker forever. The limit needs the decoding thread to be its process's main thread
(always so in worker processes); elsewhere files decode without one.

Big JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, ``Image.draft``) when the image
is at least twice the model's input in both sides after reduction, which keeps the result within
the reference path's tolerance while decoding several times faster.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from retrieval.ingest.sources import ImageFile
from retrieval.model.imaging import DEFAULT_MAX_PIXELS, to_rgb
from retrieval.model.preprocess import ImagePreprocess
from retrieval.outcomes import Outcome, Reason

__all__ = [
    "DEFAULT_DECODE_TIMEOUT",
    "DecodeError",
    "DecodedGroup",
    "DecodedImage",
    "Decoder",
    "decode_file",
    "decode_group",
    "default_workers",
    "read_images",
]

DEFAULT_DECODE_TIMEOUT = 60.0  # seconds for one file; the biggest allowed PNG takes a few


@dataclass(frozen=True)
class DecodedImage:
    """One decoded file: its plan index, content hash, original size."""

    index: int
    sha256: str
    width: int
    height: int
    reduced: bool  # decoded at a reduced scale (big JPEG)


@dataclass(frozen=True)
class DecodedGroup:
    """What a worker returns for a group of files: successes, their pixels stacked, failures.

    ``pixels`` is a tensor so that it crosses from the worker in shared memory, not pickled.
    """

    images: list[DecodedImage]
    pixels: torch.Tensor  # uint8 (len(images), H, W, 3)
    failures: list[tuple[int, Outcome]]


def decode_file(
    path: Path, preprocess: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[str, int, int, np.ndarray, bool]:
    """Read, hash and decode one file -> (sha256, width, height, pixels (H, W, 3) uint8, reduced).

    Raises ``DecodeError`` (a ``ValueError``) with a reason code and a readable reason for anything
    unusable.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DecodeError(Reason.UNREADABLE, f"cannot read: {e.strerror or e}") from e
    if not data:
        raise DecodeError(Reason.EMPTY, "empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pixel limit is ours; Pillow's warnings are noise here
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # declared size beyond Pillow's own hard limit
            why = f"too many pixels (decompression bomb?): {str(e).split(', could')[0]}"
            raise DecodeError(Reason.TOO_LARGE, why) from e
        except UnidentifiedImageError as e:
            raise DecodeError(Reason.NOT_AN_IMAGE, "not an image in a known format") from e
        except Exception as e:
            raise DecodeError(Reason.UNDECODABLE, f"not a readable image: {e}") from e
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError(Reason.TOO_LARGE, f"{width}x{height} exceeds the {max_pixels:,}-pixel limit")
        reduced = False
        if image.format == "JPEG" and preprocess.do_resize:
            wanted = (2 * preprocess.width, 2 * preprocess.height)
            if width >= 2 * wanted[0] and height >= 2 * wanted[1]:
                image.draft("RGB", wanted)
                reduced = image.size != (width, height)
        try:
            image.seek(0)
            image.load()
        except Exception as e:
            raise DecodeError(Reason.UNDECODABLE, f"cannot decode: {e}") from e
        upright = ImageOps.exif_transpose(image)
        rgb = to_rgb(upright if upright is not None else image)
    if not preprocess.do_resize and rgb.size != (preprocess.width, preprocess.height):
        takes = f"{preprocess.width}x{preprocess.height}"
        raise DecodeError(Reason.WRONG_SIZE, f"is {rgb.size[0]}x{rgb.size[1]}, the model takes {takes}")
    return digest, width, height, preprocess.to_pixels(rgb), reduced


Decoder = Callable[[Path, ImagePreprocess, int], tuple[str, int, int, np.ndarray, bool]]


class DecodeError(ValueError):
    """A file that cannot be used, with the reason code its outcome carries."""

    def __init__(self, code: Reason, message: str) -> None:
        super().__init__(message)
        self.code = code


class _DecodeTimeout(BaseException):
    """Raised by the timer; a BaseException so that the decoder's own ``except Exception`` blocks
    cannot turn it into an ordinary decode error."""


def _raise_timeout(signum: int, frame: Any) -> None:
    raise _DecodeTimeout


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``_DecodeTimeout`` in this thread after ``seconds`` (main thread only; else no limit)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _GroupDataset(Dataset[DecodedGroup]):
    """Item ``g`` is the ``g``-th group of ``group`` consecutive files of the plan."""

    def __init__(
        self,
        root: Path,
        files: Sequence[ImageFile],
        preprocess: ImagePreprocess,
        max_pixels: int,
        group: int,
        timeout: float,
        decode: Decoder,
    ) -> None:
        self.root = root
        self.files = files
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.group = group
        self.timeout = timeout
        self.decode = decode

    def __len__(self) -> int:
        return (len(self.files) + self.group - 1) // self.group

    def __getitem__(self, g: int) -> DecodedGroup:
        numbers = range(g * self.group, min((g + 1) * self.group, len(self.files)))
        return decode_group(
            self.root,
            [(index, self.files[index]) for index in numbers],
            self.preprocess,
            max_pixels=self.max_pixels,
            decode_timeout=self.timeout,
            decode=self.decode,
        )


def decode_group(
    root: Path,
    files: Sequence[tuple[int, ImageFile]],
    preprocess: ImagePreprocess,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
    decode: Decoder | None = None,
) -> DecodedGroup:
    """Decode ``files`` (each with its plan index) here, one after the other: what every reader's
    worker runs. Each file ends as pixels or as an outcome; the time limit holds when this is the
    process's main thread."""
    decode = decode or decode_file
    images, arrays, failures = [], [], []
    for index, file in files:
        try:
            with _time_limit(decode_timeout):
                sha, width, height, pixels, reduced = decode(root / file.path, preprocess, max_pixels)
        except _DecodeTimeout:
            code, reason = Reason.TIMEOUT, f"decoding took longer than {decode_timeout:g} s"
        except DecodeError as e:
            code, reason = e.code, str(e)
        except Exception as e:  # per-file isolation: any decoder error is this file's outcome
            code, reason = Reason.UNDECODABLE, str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            images.append(DecodedImage(index, sha, width, height, reduced))
            arrays.append(pixels)
            continue
        outcome = Outcome(file.path, "failed", "decode", reason, code, file.size, file.mtime_ns)
        failures.append((index, outcome))
    shape = (0, preprocess.height, preprocess.width, 3)
    stacked = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(shape, dtype=torch.uint8)
    return DecodedGroup(images, stacked, failures)


def default_workers(workers: int | None) -> int:
    """``workers``, or all cores but one and at least two: a giant image can then hold one worker
    while the other keeps decoding."""
    return max(2, (os.cpu_count() or 2) - 1) if workers is None else workers


def _keep(group: Any) -> Any:
    return group


def _ignore_interrupts(worker: int) -> None:
    """In a decoding worker: a terminal's Ctrl-C (or a SIGTERM to the whole process group) reaches
    the workers too, but stopping is the build's decision (it finishes the files in hand and
    commits). So a worker ignores SIGINT, and on SIGTERM leaves quietly (exit status 0), which the
    build, stopping already, takes as the end of decoding rather than a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave)


def _leave(signum: int, frame: Any) -> None:
    os._exit(0)


def read_images(
    root: Path,
    files: Sequence[ImageFile],
    preprocess: ImagePreprocess,
    *,
    workers: int,
    group: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ordered: bool = False,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
    decode: Decoder | None = None,
    start_method: str | None = None,
) -> Iterator[DecodedGroup]:
    """Decode ``files`` (relative to ``root``) in ``workers`` processes, groups in completion order.

    ``ordered=True`` yields the groups in file order instead (training batches must not depend on
    which worker finished first). ``workers=0`` decodes in this process, in order. A file that takes
    longer than ``decode_timeout`` seconds (0: no limit) fails with that reason. ``decode`` replaces
    ``decode_file`` (a module-level function, so that workers started by any ``start_method`` --
    fork, forkserver, spawn; default the platform's -- can import it).
    """
    dataset = _GroupDataset(root, files, preprocess, max_pixels, group, decode_timeout, decode or decode_file)
    if len(dataset) == 0:
        return
    if workers == 0:
        yield from (dataset[g] for g in range(len(dataset)))
        return
    # Out of order by default: a group that takes long does not hold back the groups behind it.
    loader: DataLoader[DecodedGroup] = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_keep,
        prefetch_factor=4,
        in_order=ordered,
        worker_init_fn=_ignore_interrupts,
        multiprocessing_context=start_method,
    )
    yield from loader
