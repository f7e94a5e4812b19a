"""Checkpoints in the seed's format, written atomically, and where a resumed run starts.

``checkpoint.pt`` / ``best_checkpoint.pt`` hold exactly the seed's keys (``epoch``,
``global_step``, ``model_state_dict``, ``optimizer_state_dict``, and ``best_loss`` in the best one),
as CPU tensors. ``train_state.json`` beside them records the data plan, so that a checkpoint taken
mid-epoch resumes at its step; a checkpoint from elsewhere resumes at its next epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrieval.durable import TMP_MARKER, atomic_write, atomic_write_bytes
from retrieval.errors import CheckpointError
from retrieval.model.checkpoint import Checkpoint, load_checkpoint
from retrieval.training.runlog import LOG_FILE, PLOT_FILE

__all__ = ["STATE_FILE", "Start", "remove_stale_temporaries", "resume_point", "save_checkpoint", "write_plan"]

STATE_FILE = "train_state.json"


@dataclass(frozen=True)
class Start:
    """Where a run starts in its schedule."""

    epoch: int = 0
    global_step: int = 0
    skip_steps: int = 0  # steps of the first epoch already done (a mid-epoch checkpoint)
    step_offset: int = 0  # global_step minus the position in this run's schedule
    best_loss: float | None = None


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    global_step: int,
    best_loss: float | None = None,
) -> None:
    """Write the seed's checkpoint dict atomically, as CPU tensors (it then loads anywhere)."""
    state: dict[str, Any] = {
        "epoch": epoch,
        "global_step": global_step,
        "model_state_dict": _on_cpu(model.state_dict()),
        "optimizer_state_dict": _on_cpu(optimizer.state_dict()),
    }
    if best_loss is not None:
        state["best_loss"] = float(best_loss)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_plan(out: Path, plan: dict[str, Any]) -> None:
    atomic_write_bytes(out / STATE_FILE, json.dumps(plan, indent=2).encode())


def resume_point(
    path: Path,
    checkpoint: Checkpoint,
    optimizer: torch.optim.Optimizer,
    plan: dict[str, Any],
    steps_per_epoch: int,
    trust_checkpoint: bool,
) -> Start:
    """Load ``checkpoint``'s optimizer state and say where the run goes on from."""
    if checkpoint.optimizer_state_dict is None:
        raise CheckpointError(f"{path} has no optimizer_state_dict: use --init to start from its weights")
    try:
        optimizer.load_state_dict(checkpoint.optimizer_state_dict)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model: {e}") from e
    epoch = (checkpoint.epoch if checkpoint.epoch is not None else -1) + 1
    global_step = int(checkpoint.global_step or 0)
    saved = path.parent / STATE_FILE
    skip = 0
    if saved.is_file() and json.loads(saved.read_text()) == plan:
        skip = max(0, global_step - epoch * steps_per_epoch)  # the same data plan: resume at the step
    # A checkpoint from another plan (the seed's own pretraining) starts this run's schedule at
    # its next epoch, whatever its global step.
    offset = global_step - (epoch * steps_per_epoch + skip)
    best = path.parent / "best_checkpoint.pt"
    best_loss = load_checkpoint(best, trust_checkpoint=trust_checkpoint).best_loss if best.is_file() else None
    return Start(epoch, global_step, skip, offset, best_loss)


def remove_stale_temporaries(out: Path) -> None:
    """Temporary files of this folder's own outputs that a killed run left behind."""
    for name in ("checkpoint.pt", "best_checkpoint.pt", STATE_FILE, LOG_FILE, PLOT_FILE):
        for stale in out.glob(f".{name}{TMP_MARKER}*"):
            stale.unlink(missing_ok=True)


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value
