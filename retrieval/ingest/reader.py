"""The reader stage: image files -> preprocessed uint8 pixels, in parallel worker processes.

Each worker decodes a small group of images (``group`` files) and returns them as one
``DecodedGroup``; groups complete out of order, so a slow file (a 169-megapixel PNG takes seconds)
holds back only its own group while the other workers keep the model fed. Every file ends as
pixels or as an ``Outcome`` with the reason: a bad file never costs its neighbours.

Each file also has a time limit (``decode_timeout``, 60 s by default): a decoder that spins on a
crafted file is interrupted by a timer signal and the file fails with the reason, instead of
holding its worker forever. The limit needs the decoding thread to be its process's main thread
(always so in worker processes); elsewhere files decode without one.

One file's work (read, hash, decode) is ``ingest.decoding``'s. On a CUDA host (``gpu_jpegs``), the
JPEGs the GPU decoder takes are only read and hashed here and travel as bytes (``DecodedGroup.jpegs``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from retrieval.ingest.decoding import Decoded, DecodeError, Decoder, GpuJpeg, decode_file, decode_or_keep
from retrieval.ingest.sources import ImageFile
from retrieval.model.imaging import DEFAULT_MAX_PIXELS
from retrieval.model.preprocess import ImagePreprocess
from retrieval.outcomes import Outcome, Reason

__all__ = [
    "DEFAULT_DECODE_TIMEOUT",
    "DecodeError",
    "DecodedGroup",
    "DecodedImage",
    "Decoder",
    "attempt",
    "decode_file",
    "decode_group",
    "default_workers",
    "read_images",
]

DEFAULT_DECODE_TIMEOUT = 60.0  # seconds for one file; the biggest allowed PNG takes a few
T = TypeVar("T")


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
    cpu_seconds: float = 0.0  # the decoding thread's CPU time on the group (what decoding costs)
    jpegs: list[tuple[DecodedImage, bytes]] = dataclasses.field(default_factory=list)  # for the GPU

    @property
    def files(self) -> int:
        return len(self.images) + len(self.failures) + len(self.jpegs)


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


class _Slots:
    """Pixel buffers in shared memory that the workers decode into, one group a slot.

    Made once a run, before the workers start (they inherit it, or receive it once): a worker then
    sends back only what it found, and the main process copies the pixels out of the slot and
    hands the slot to a next group. A fresh shared tensor per group instead costs a shared-memory
    file, a descriptor passed over a socket and fresh pages each time, about 0.2 ms a file on the
    2-core machine of the README (6% of decoding a 640x480 JPEG).
    """

    def __init__(self, count: int, group: int, shape: tuple[int, int, int]) -> None:
        self.pixels = torch.empty((count, group, *shape), dtype=torch.uint8).share_memory_()
        self.free = collections.deque(range(count))

    def take(self) -> int:
        """A free slot, or -1 (the group then sends its own pixels) if none is."""
        return self.free.popleft() if self.free else -1

    def give_back(self, slot: int, images: int) -> torch.Tensor:
        """A copy of the ``images`` pixels in ``slot``, which is free again."""
        # numpy's copy, one thread: torch's would wake its thread pool to spin beside the workers.
        pixels = torch.from_numpy(self.pixels[slot, :images].numpy().copy())
        self.free.append(slot)
        return pixels


class _GroupDataset(Dataset[tuple[int, DecodedGroup]]):
    """Item ``(g, slot)`` is the ``g``-th group of ``group`` consecutive files of the plan, decoded
    into ``slots`` (``slot`` -1: into a tensor of its own)."""

    def __init__(
        self,
        root: Path,
        files: Sequence[ImageFile],
        preprocess: ImagePreprocess,
        max_pixels: int,
        group: int,
        timeout: float,
        decode: Decoder,
        slots: _Slots | None = None,
        gpu_jpegs: bool = False,
    ) -> None:
        self.gpu_jpegs = gpu_jpegs
        self.root = root
        self.files = files
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.group = group
        self.timeout = timeout
        self.decode = decode
        self.slots = slots

    def __len__(self) -> int:
        return (len(self.files) + self.group - 1) // self.group

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, DecodedGroup]:
        g, slot = key
        numbers = range(g * self.group, min((g + 1) * self.group, len(self.files)))
        into = self.slots.pixels[slot] if self.slots is not None and slot >= 0 else None
        group = decode_group(
            self.root,
            [(index, self.files[index]) for index in numbers],
            self.preprocess,
            max_pixels=self.max_pixels,
            decode_timeout=self.timeout,
            decode=self.decode,
            into=into,
            gpu_jpegs=self.gpu_jpegs,
        )
        if into is not None:  # the pixels are in the slot: the tensor must not travel
            group = dataclasses.replace(group, pixels=_NO_PIXELS)
        return slot, group

    def slotted(self) -> Iterator[tuple[int, int]]:
        """The groups in order, each with the slot it decodes into (taken when a worker is given
        it, so only groups in flight hold one)."""
        for g in range(len(self)):
            yield g, self.slots.take() if self.slots is not None else -1


_NO_PIXELS = torch.empty(0, dtype=torch.uint8)


def decode_group(
    root: Path,
    files: Sequence[tuple[int, ImageFile]],
    preprocess: ImagePreprocess,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
    decode: Decoder | None = None,
    into: torch.Tensor | None = None,
    gpu_jpegs: bool = False,
) -> DecodedGroup:
    """Decode ``files`` (each with its plan index) here, one after the other: what every reader's
    worker runs. Each file ends as pixels, as JPEG bytes for the GPU (``gpu_jpegs``, where its
    decoder takes the file), or as an outcome; the time limit holds when this is the process's
    main thread. ``into``: uint8 (>= len(files), H, W, 3) to decode into (else a tensor of its
    own, in shared memory in a worker, so that it is not copied on the way). ``gpu_jpegs`` takes
    no other ``decode``: the GPU route reads each file once (``decoding.decode_or_keep``)."""
    _check_decoder(decode, gpu_jpegs)
    work: Callable[[Path, ImagePreprocess, int], GpuJpeg | Decoded] = (
        decode_or_keep if gpu_jpegs else (decode or decode_file)
    )
    began = time.thread_time()
    shape = (preprocess.height, preprocess.width, 3)
    out = into
    if out is None:
        out = torch.empty((len(files), *shape), dtype=torch.uint8)
        if get_worker_info() is not None:
            out.share_memory_()
    slots = out.numpy()
    images: list[DecodedImage] = []
    failures: list[tuple[int, Outcome]] = []
    jpegs: list[tuple[DecodedImage, bytes]] = []
    for index, file in files:
        done = attempt(work, root / file.path, preprocess, max_pixels, timeout=decode_timeout)
        if isinstance(done, GpuJpeg):
            jpegs.append((DecodedImage(index, done.sha256, done.width, done.height, False), done.data))
            continue
        if not isinstance(done, DecodeError):
            sha, width, height, pixels, reduced = done
            if pixels.shape == shape:
                slots[len(images)] = pixels
                images.append(DecodedImage(index, sha, width, height, reduced))
                continue
            done = DecodeError(Reason.UNDECODABLE, f"decoded to {pixels.shape}, not {shape}")
        outcome = Outcome(file.path, "failed", "decode", str(done), done.code, file.size, file.mtime_ns)
        failures.append((index, outcome))
    return DecodedGroup(images, out[: len(images)], failures, time.thread_time() - began, jpegs)


def attempt(call: Callable[..., T], *args: Any, timeout: float = DEFAULT_DECODE_TIMEOUT) -> T | DecodeError:
    """``call(*args)`` (one file's work) within ``timeout`` seconds where this is the process's
    main thread; any failure comes back as the ``DecodeError`` its outcome records: per-file
    isolation."""
    try:
        with _time_limit(timeout):
            return call(*args)
    except _DecodeTimeout:
        return DecodeError(Reason.TIMEOUT, f"decoding took longer than {timeout:g} s")
    except DecodeError as e:
        return e
    except Exception as e:  # any decoder error is this file's outcome
        return DecodeError(Reason.UNDECODABLE, str(e).splitlines()[0] if str(e) else type(e).__name__)


def _check_decoder(decode: Decoder | None, gpu_jpegs: bool) -> None:
    if gpu_jpegs and decode is not None and decode is not decode_file:
        raise ValueError("a decoder of its own decodes every file: it cannot be combined with gpu_jpegs")


def default_workers(workers: int | None) -> int:
    """``workers``, or all cores but one and at least two: a giant image can then hold one worker
    while the other keeps decoding."""
    return max(2, (os.cpu_count() or 2) - 1) if workers is None else workers


def _keep(group: Any) -> Any:
    return group


_WORKER_NICENESS = 5


def _start_worker(worker: int) -> None:
    """In a decoding worker: a terminal's Ctrl-C (or a SIGTERM to the whole process group) reaches
    the workers too, but stopping is the build's decision (it finishes the files in hand and
    commits). So a worker ignores SIGINT, and on SIGTERM leaves quietly (exit status 0), which the
    build, stopping already, takes as the end of decoding rather than a crash."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave)
    # A little below the process that consumes the pixels: where the cores are shared, a worker
    # yields its core when the model's thread wants one, rather than the model stalling mid-batch
    # while the workers' queues of groups run dry (a 3% to 5% faster build on the README's 2-core
    # machine). Each worker is a process of its own: nothing else is lowered.
    os.nice(_WORKER_NICENESS)


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
    gpu_jpegs: bool = False,
) -> Iterator[DecodedGroup]:
    """Decode ``files`` (relative to ``root``) in ``workers`` processes, groups in completion order.

    ``ordered=True`` yields the groups in file order instead (training batches must not depend on
    which worker finished first). ``workers=0`` decodes in this process, in order. A file that takes
    longer than ``decode_timeout`` seconds (0: no limit) fails with that reason. ``decode`` replaces
    ``decode_file`` (a module-level function, so that workers started by any ``start_method`` --
    fork, forkserver, spawn; default the platform's -- can import it). ``gpu_jpegs``: the JPEGs the
    GPU decoder takes come as bytes (``DecodedGroup.jpegs``), read and hashed only.
    """
    _check_decoder(decode, gpu_jpegs)
    decode = decode or decode_file
    groups = (len(files) + group - 1) // group
    if groups == 0:
        return
    if workers == 0:
        dataset = _GroupDataset(
            root, files, preprocess, max_pixels, group, decode_timeout, decode, gpu_jpegs=gpu_jpegs
        )
        yield from (dataset[key][1] for key in dataset.slotted())
        return
    # A slot for every group the loader keeps in flight (prefetch x workers), one just received
    # and one spare. In file order, groups finished early wait inside the loader, holding theirs:
    # there each group sends its own pixels.
    prefetch = 4
    shape = (preprocess.height, preprocess.width, 3)
    slots = None if ordered else _Slots(min(groups, prefetch * workers + 2), group, shape)
    dataset = _GroupDataset(
        root, files, preprocess, max_pixels, group, decode_timeout, decode, slots, gpu_jpegs
    )
    # Out of order by default: a group that takes long does not hold back the groups behind it.
    loader: DataLoader[tuple[int, DecodedGroup]] = DataLoader(
        dataset,
        batch_size=None,
        sampler=_Keys(dataset),
        num_workers=workers,
        collate_fn=_keep,
        prefetch_factor=prefetch,
        in_order=ordered,
        worker_init_fn=_start_worker,
        multiprocessing_context=start_method,
    )
    for slot, decoded in loader:
        if slot >= 0 and slots is not None:
            decoded = dataclasses.replace(decoded, pixels=slots.give_back(slot, len(decoded.images)))
        yield decoded


class _Keys:
    """The loader's sampler: ``dataset.slotted()``, drawn one at a time as groups are sent out."""

    def __init__(self, dataset: _GroupDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.dataset.slotted()

    def __len__(self) -> int:
        return len(self.dataset)
