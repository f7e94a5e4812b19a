"""What ``retrieval train`` is asked to do, and what it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from retrieval.errors import ConfigError
from retrieval.model.spec import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL
from retrieval.outcomes import Outcome

__all__ = ["StepLog", "TrainConfig", "TrainReport", "check_config"]


@dataclass(frozen=True)
class TrainConfig:
    """What ``retrieval train`` does. Steps count optimizer updates (``grad_accum`` batches each)."""

    pairs: Path
    out: Path = Path("checkpoints")
    text_model: Path = Path(DEFAULT_TEXT_MODEL)
    vision_model: Path = Path(DEFAULT_VISION_MODEL)
    val_pairs: Path | None = None
    images_root: Path | None = None
    init: Path | None = None  # start from this checkpoint's weights, with a fresh optimizer
    resume: Path | None = None  # continue this checkpoint: weights, optimizer, epoch and step
    trust_checkpoint: bool = False
    epochs: int = 10
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 0  # steps of linear warm-up
    schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float | None = None
    freeze_text: bool = False
    freeze_vision: bool = False
    freeze_text_projection: bool = False  # with freeze_text: the text embeddings stay as they are
    augment: bool = False  # random resized crops of the training images
    save_every: int | None = None  # steps; also at every epoch end
    embed_dim: int = 256  # the shared space, for a model not loaded from a checkpoint
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    cache_gb: float = 2.0  # decoded images kept in memory when they fit


@dataclass(frozen=True)
class StepLog:
    epoch: int
    step: int  # global step after this update
    loss: float
    temperature: float
    lr: float
    pairs_per_s: float
    seconds: float  # since the run started


@dataclass(frozen=True)
class TrainReport:
    out: Path
    checkpoint: Path
    best_checkpoint: Path | None
    resumed_from: Path | None
    start_epoch: int
    epochs: int
    global_step: int
    steps_run: int
    pairs: int
    val_pairs: int
    train_loss: float | None  # mean of the last epoch run
    val_loss: float | None
    best_loss: float | None
    pairs_per_s: float  # over the training loop: steps, validation, checkpoints
    seconds: float  # the whole call, plot included
    skipped: tuple[Outcome, ...]
    log: Path
    plot: Path | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [o.to_dict() for o in self.skipped]
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def check_config(config: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
    if config.lr <= 0 or config.weight_decay < 0 or config.warmup < 0:
        raise ConfigError("lr must be positive; weight decay and warm-up must not be negative")
    if config.resume is not None and config.init is not None:
        raise ConfigError("--resume continues a run; --init starts one from weights: give one of them")
    if config.save_every is not None and config.save_every < 1:
        raise ConfigError("--save-every must be at least 1")
