"""Reading checkpoints in the seed's format, safely.

A checkpoint is a ``torch.save``d dict::

    {'epoch': int, 'global_step': int,
     'model_state_dict': {...}, 'optimizer_state_dict': {...},
     'best_loss': float}            # best_checkpoint.pt only

It is unpickled with ``weights_only=True``: tensors, containers and plain scalars only, plus the
numpy scalar types that a ``best_loss`` computed with numpy pickles as. Anything else (a class, a
function) could run code while loading, so it is refused unless the caller trusts the file.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.durable import file_sha256, stat_key
from retrieval.errors import CheckpointError

__all__ = ["Checkpoint", "CheckpointInfo", "KnownHash", "file_sha256", "load_checkpoint"]


@dataclass(frozen=True)
class KnownHash:
    """A checkpoint's sha256 as recorded, with the file stats (``durable.stat_key``) it had then."""

    sha256: str
    stat: list[int]


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's identity and training position, without its tensors."""

    path: Path
    sha256: str
    epoch: int | None
    global_step: int | None
    best_loss: float | None
    stat: list[int] | None = None  # the file's stats when it was hashed and read


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the seed's fields plus where it came from."""

    path: Path
    sha256: str
    model_state_dict: dict[str, torch.Tensor]
    optimizer_state_dict: dict[str, Any] | None
    epoch: int | None
    global_step: int | None
    best_loss: float | None
    stat: list[int] | None = None

    @property
    def info(self) -> CheckpointInfo:
        return CheckpointInfo(self.path, self.sha256, self.epoch, self.global_step, self.best_loss, self.stat)


def _numpy_safe_globals() -> list[Any]:
    """Globals a numpy scalar pickles with, under both numpy 2 and numpy 1 module names.

    ``np.float64(0.12)`` pickles as ``numpy._core.multiarray.scalar(numpy.dtype('f8'), b'...')``
    (``numpy.core.multiarray`` when written by numpy 1.x). Rebuilding a scalar from a dtype and its
    raw bytes runs no user code.
    """
    scalar = np._core.multiarray.scalar  # type: ignore[attr-defined]
    return [
        np.dtype,
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        *(type(np.dtype(code)) for code in ("f8", "f4", "f2", "i8", "i4", "u8", "u4", "b1")),
    ]


def _read(path: Path, trust: bool) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            # mmap keeps the optimizer state (twice the model's size) on disk unless it is used.
            mmap = zipfile.is_zipfile(path)
            return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and "Unsupported global" in str(e):
            unsafe = _unsafe_globals(path)
            what = ", ".join(unsafe) if unsafe else "objects other than tensors and plain values"
            raise CheckpointError(
                f"{path} needs to unpickle {what}, which can run code while loading; refusing. "
                "If you made this file yourself, pass --trust-checkpoint (trust_checkpoint=True)"
            ) from e
        raise _unreadable(path, e) from e
    except Exception as e:  # damaged bytes can fail anywhere in the zip reader or the unpickler
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    """The refusal in the engine's words. torch's own message ends with advice to load with
    ``weights_only=False``, which would run whatever code the file holds: never passed on."""
    text = str(e)
    detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    why = detail.group(1).strip() if detail else _first_line(e)
    if "weights_only" in why or not why.strip() or why.strip().isdigit():
        why = ""
    with path.open("rb") as f:
        head = f.read(64)
    kind = "a text file" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else None
    what = f"it looks like {kind}" if kind else "truncated, damaged or another format"
    return CheckpointError(
        f"{path} is not a readable PyTorch checkpoint ({what})" + (f": {why}" if why else "")
    )


def _unsafe_globals(path: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # only used to word the refusal; the refusal stands either way
        return []
    allowed = {"numpy.dtype", "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"}
    return sorted(g for g in found if g not in allowed and not g.startswith("numpy.dtypes."))


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _as_int(value: Any, field: str, path: Path) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {field!r} should be an integer, got {value!r}") from e


def _as_float(value: Any, path: Path) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: 'best_loss' should be a number, got {value!r}") from e


def _is_state_dict(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_checkpoint(
    path: str | Path, *, trust_checkpoint: bool = False, known: KnownHash | None = None
) -> Checkpoint:
    """Load a checkpoint in the seed's format (a bare ``state_dict`` file is accepted too).

    Raises ``CheckpointError`` with one readable sentence for a missing, empty, truncated, unsafe
    or malformed file. The file's sha256 is computed here, once, for the model fingerprint, unless
    ``known`` gives it and the file's stats are still the ones it was recorded with. The stats are
    taken before hashing and compared after reading: a file replaced meanwhile (a training run
    saving its best checkpoint) is refused rather than paired with another file's hash.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    before = stat_key(path)
    sha256 = known.sha256 if known is not None and known.stat == before else file_sha256(path)
    obj = _read(path, trust_checkpoint)
    if stat_key(path) != before:
        raise CheckpointError(f"checkpoint {path} changed while it was being read; try again")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")

    if "model_state_dict" not in obj:
        if _is_state_dict(obj):
            return Checkpoint(path, sha256, dict(obj), None, None, None, None, before)
        keys = ", ".join(sorted(map(str, obj))[:10])
        raise CheckpointError(f"{path} has no 'model_state_dict' (its keys: {keys})")
    state = obj["model_state_dict"]
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise CheckpointError(f"{path}: 'model_state_dict' is not a mapping of names to tensors")
    optimizer = obj.get("optimizer_state_dict")
    if optimizer is not None and not isinstance(optimizer, Mapping):
        raise CheckpointError(f"{path}: 'optimizer_state_dict' is not a dict")
    return Checkpoint(
        path=path,
        sha256=sha256,
        model_state_dict=dict(state),
        optimizer_state_dict=dict(optimizer) if optimizer is not None else None,
        epoch=_as_int(obj.get("epoch"), "epoch", path),
        global_step=_as_int(obj.get("global_step"), "global_step", path),
        best_loss=_as_float(obj.get("best_loss"), path),
        stat=before,
    )
