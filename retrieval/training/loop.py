"""Contrastive training of ``MultiModalEncoder`` that writes and resumes the seed's checkpoints.

``train(TrainConfig(...))`` fine-tunes (or continues pretraining) on image-caption pairs with the
symmetric InfoNCE loss of CLIP over in-batch negatives, scaled by the model's learned
``temperature``, and AdamW over ``model.parameters()`` (one group, as the seed's resume code
builds it). Frozen towers keep ``requires_grad=False``; AdamW skips them and the optimizer state
still loads into the seed's ``AdamW(model.parameters(), ...)``.

Checkpoints are the seed's format, written atomically: ``checkpoint.pt`` at the end of every
epoch (and every ``save_every`` steps) and ``best_checkpoint.pt`` with ``best_loss`` when the
validation loss (without validation pairs, the epoch's training loss) improves. Nothing else needs
saving to resume exactly: the data order of an epoch and the random state of a step are functions
of ``(seed, epoch)`` and ``(seed, step)``, and the learning rate is a function of the step, so a
run killed and resumed with ``resume`` ends with the same weights as one never interrupted.
``train_state.json`` beside the checkpoints records the data plan, so that a checkpoint taken
mid-epoch resumes at its step; a checkpoint from elsewhere resumes at its next epoch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.durable import TMP_MARKER, atomic_write, atomic_write_bytes
from retrieval.errors import CheckpointError, ConfigError
from retrieval.model.checkpoint import Checkpoint, load_checkpoint
from retrieval.model.dual_encoder import MultiModalEncoder
from retrieval.model.preprocess import ImagePreprocess, TextBatcher
from retrieval.model.runtime import Runtime, resolve_runtime
from retrieval.model.spec import DEFAULT_TEXT_MODEL, DEFAULT_VISION_MODEL
from retrieval.outcomes import Outcome
from retrieval.progress import Progress, Silent
from retrieval.training.data import Batch, PairData, random_crops

__all__ = ["StepLog", "TrainConfig", "TrainReport", "clip_loss", "train"]

TEMPERATURE_RANGE = (0.01, 1.0)  # logits are cosine / temperature: at most 100x, at least 1x
STATE_FILE = "train_state.json"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "train_curves.png"


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
        data["skipped"] = [asdict(o) for o in self.skipped]
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def clip_loss(
    text: torch.Tensor, image: torch.Tensor, temperature: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives.

    ``text``, ``image``: (B, D) unit norm; ``same`` (B, B) bool marks pairs that match (the
    diagonal, and rows that repeat an image or a caption: not negatives of each other).
    """
    logits = text @ image.T / temperature  # (B, B)
    targets = same.float() / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T)) / 2


def train(
    config: TrainConfig, progress: Progress | None = None, on_step: Callable[[StepLog], None] | None = None
) -> TrainReport:
    """Train as ``config`` says; ``on_step`` is called after every optimizer step."""
    _check(config)
    run = _Run(config, progress or Silent())
    return run.fit(on_step)


def _check(config: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
    if config.lr <= 0 or config.weight_decay < 0 or config.warmup < 0:
        raise ConfigError("lr must be positive; weight decay and warm-up must not be negative")
    if config.resume is not None and config.init is not None:
        raise ConfigError("--resume continues a run; --init starts one from weights: give one of them")
    if config.save_every is not None and config.save_every < 1:
        raise ConfigError("--save-every must be at least 1")


class _Run:
    def __init__(self, config: TrainConfig, progress: Progress) -> None:
        self.config = config
        self.progress = progress
        self.runtime: Runtime = resolve_runtime(config.device, config.precision)
        torch.manual_seed(config.seed)  # the initial projections of a fresh model
        self.model = MultiModalEncoder(config.text_model, config.vision_model, embed_dim=config.embed_dim)
        self.start_epoch, self.global_step, self.skip_steps = 0, 0, 0
        self.step_offset = 0  # global_step minus the position in this run's schedule
        self.best_loss: float | None = None
        source = config.resume or config.init
        checkpoint = None
        if source is not None:
            checkpoint = load_checkpoint(source, trust_checkpoint=config.trust_checkpoint)
            self.model.load_state_dict(checkpoint.model_state_dict)
        frozen_parts = (
            ("text_encoder", config.freeze_text),
            ("visual_encoder", config.freeze_vision),
            ("text_projection", config.freeze_text_projection),
        )
        for name, frozen in frozen_parts:
            for p in getattr(self.model, name).parameters():
                p.requires_grad_(not frozen)
        self.model.to(self.runtime.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        preprocess = ImagePreprocess.from_processor(self.model.image_processor)
        self.batcher = TextBatcher.for_model(self.model)
        self.preprocess = preprocess
        self.data = self._read(config.pairs)
        self.val = self._read(config.val_pairs) if config.val_pairs is not None else None
        # A frozen text tower gives every caption the same [CLS] state at every step: once is enough.
        self.text_states = {
            d: self._text_states(d) for d in (self.data, self.val) if d is not None and config.freeze_text
        }
        self.batches_per_epoch = max(1, len(self.data) // config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.scaler = torch.amp.GradScaler(enabled=self.runtime.precision == "fp16")
        config.out.mkdir(parents=True, exist_ok=True)
        self.plan = {
            "pairs_sha256": self.data.sha256,
            "pairs": len(self.data),
            "batch_size": config.batch_size,
            "grad_accum": config.grad_accum,
            "seed": config.seed,
            "steps_per_epoch": self.steps_per_epoch,
        }
        if config.resume is not None and checkpoint is not None:
            self._resume(config.resume, checkpoint)

    def _read(self, path: Path) -> PairData:
        return PairData(
            path,
            self.preprocess,
            self.batcher,
            self.progress,
            images_root=self.config.images_root,
            workers=self.config.workers,
            cache_bytes=int(self.config.cache_gb * 1e9),
        )

    # -- resuming ---------------------------------------------------------------------------------

    def _resume(self, path: Path, state: Checkpoint) -> None:
        if state.optimizer_state_dict is None:
            raise CheckpointError(f"{path} has no optimizer_state_dict: use --init to start from its weights")
        try:
            self.optimizer.load_state_dict(state.optimizer_state_dict)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this model: {e}") from e
        self.start_epoch = (state.epoch if state.epoch is not None else -1) + 1
        self.global_step = int(state.global_step or 0)
        saved = path.parent / STATE_FILE
        plan = json.loads(saved.read_text()) if saved.is_file() else None
        if plan == self.plan:  # the same data plan: a mid-epoch checkpoint resumes at its step
            self.skip_steps = max(0, self.global_step - self.start_epoch * self.steps_per_epoch)
        # A checkpoint from another plan (the seed's own pretraining) starts this run's schedule
        # at its next epoch, whatever its global step.
        self.step_offset = self.global_step - (self.start_epoch * self.steps_per_epoch + self.skip_steps)
        best = path.parent / "best_checkpoint.pt"
        if best.is_file():
            self.best_loss = load_checkpoint(best, trust_checkpoint=self.config.trust_checkpoint).best_loss
        _truncate_log(self.config.out / LOG_FILE, self.global_step, self.start_epoch)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, on_step: Callable[[StepLog], None] | None) -> TrainReport:
        config = self.config
        started = time.perf_counter()
        _remove_stale_temporaries(config.out)
        atomic_write_bytes(config.out / STATE_FILE, json.dumps(self.plan, indent=2).encode())
        log_path = config.out / LOG_FILE
        steps_run = pairs_seen = 0
        train_loss = val_loss = None
        remaining = max(0, (config.epochs - self.start_epoch) * self.steps_per_epoch - self.skip_steps)
        self.progress.start("steps", remaining)
        with log_path.open("a", encoding="utf-8") as log:
            for epoch in range(self.start_epoch, config.epochs):
                epoch_losses: list[float] = []
                epoch_started = time.perf_counter()
                tick = time.perf_counter()
                for step_batches in self._steps(epoch):
                    loss, pairs = self._update(step_batches)
                    epoch_losses.append(loss)
                    steps_run += 1
                    pairs_seen += pairs
                    now = time.perf_counter()
                    entry = StepLog(
                        epoch=epoch,
                        step=self.global_step,
                        loss=round(loss, 6),
                        temperature=round(float(self.model.temperature.detach().float().mean()), 6),
                        lr=self.optimizer.param_groups[0]["lr"],
                        pairs_per_s=round(pairs / max(now - tick, 1e-9), 2),  # data and update
                        seconds=round(now - started, 3),
                    )
                    tick = now
                    log.write(json.dumps({"type": "step", **asdict(entry)}) + "\n")
                    log.flush()
                    self.progress.advance(1)
                    if on_step is not None:
                        on_step(entry)
                    if config.save_every and self.global_step % config.save_every == 0:
                        self._save("checkpoint.pt", epoch - 1)  # epoch not complete: resume redoes it
                train_loss = float(np.mean(epoch_losses)) if epoch_losses else None
                val_loss = self._validate()
                self.skip_steps = 0
                self._save("checkpoint.pt", epoch)
                watched = val_loss if self.val is not None else train_loss
                if watched is not None and (self.best_loss is None or watched < self.best_loss):
                    self.best_loss = watched
                    self._save("best_checkpoint.pt", epoch, best_loss=watched)
                log.write(
                    json.dumps(
                        {
                            "type": "epoch",
                            "epoch": epoch,
                            "step": self.global_step,
                            "train_loss": train_loss,
                            "val_loss": val_loss,
                            "seconds": round(time.perf_counter() - epoch_started, 3),
                        }
                    )
                    + "\n"
                )
                log.flush()
        self.progress.finish()
        training = time.perf_counter() - started
        plot = self._plot(log_path)
        seconds = time.perf_counter() - started
        best = config.out / "best_checkpoint.pt"
        return TrainReport(
            out=config.out,
            checkpoint=config.out / "checkpoint.pt",
            best_checkpoint=best if best.is_file() else None,
            resumed_from=config.resume,
            start_epoch=self.start_epoch,
            epochs=config.epochs,
            global_step=self.global_step,
            steps_run=steps_run,
            pairs=len(self.data),
            val_pairs=len(self.val) if self.val is not None else 0,
            train_loss=train_loss,
            val_loss=val_loss,
            best_loss=self.best_loss,
            pairs_per_s=round(pairs_seen / max(training, 1e-9), 2),
            seconds=round(seconds, 3),
            skipped=tuple(self.data.outcomes + (self.val.outcomes if self.val is not None else [])),
            log=log_path,
            plot=plot,
        )

    def _steps(self, epoch: int) -> Iterator[list[Batch]]:
        """The optimizer steps of ``epoch`` still to run, each a list of micro-batches."""
        config = self.config
        order = np.random.default_rng([config.seed, epoch]).permutation(len(self.data))
        size = min(config.batch_size, len(order))
        chunks = [order[i * size : (i + 1) * size] for i in range(self.batches_per_epoch)]
        todo = chunks[self.skip_steps * config.grad_accum if epoch == self.start_epoch else 0 :]
        batches = self.data.batches(todo)
        while True:
            step = [b for _, b in zip(range(config.grad_accum), batches, strict=False)]
            if not step:
                return
            yield step

    def _update(self, batches: list[Batch]) -> tuple[float, int]:
        """One optimizer step over ``batches``; returns the mean loss and the pairs seen."""
        config = self.config
        position = self.global_step - self.step_offset  # this step's place in the schedule
        self._train_mode()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(position)
        self.optimizer.zero_grad(set_to_none=True)
        total, pairs = 0.0, 0
        for k, batch in enumerate(batches):
            if len(batch.image_keys) < 2:  # a lone pair (its batch-mates undecodable) has no negatives
                continue
            # Randomness (dropout) is a function of the step, so a resumed run repeats it exactly.
            torch.manual_seed(int(np.random.SeedSequence([config.seed, position, k]).generate_state(1)[0]))
            loss = self._loss(batch, self.data, augment=config.augment) / len(batches)
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
            pairs += len(batch.image_keys)
        if config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.temperature.clamp_(*TEMPERATURE_RANGE)
        self.global_step += 1
        return total, pairs

    def _text_states(self, data: PairData) -> torch.Tensor:
        """The frozen text tower's [CLS] state of every distinct caption of ``data``, (T, H_t)."""
        hidden = int(self.model.text_encoder.config.hidden_size)
        states = torch.empty(len(data.tokens), hidden, device=self.runtime.device)
        self.model.text_encoder.eval()
        with torch.no_grad(), self.runtime.autocast():
            for batch in self.batcher.batches_from_ids(data.tokens, 256):
                states[torch.from_numpy(batch.positions)] = self.model.text_cls(batch.inputs()).float()
        return states

    def _loss(self, batch: Batch, data: PairData, augment: bool = False) -> torch.Tensor:
        device = self.runtime.device
        pixels = batch.pixels.to(device, non_blocking=True)
        pixels = self.preprocess.normalize(random_crops(pixels) if augment else pixels)
        image_keys, text_keys = batch.image_keys.to(device), batch.text_keys.to(device)
        same = (image_keys[:, None] == image_keys[None, :]) | (text_keys[:, None] == text_keys[None, :])
        with self.runtime.autocast():
            image = self.model.encode_image({"pixel_values": pixels})
            if data in self.text_states:
                text = self.model.project_text(self.text_states[data][text_keys])
            else:
                text = self.model.encode_text({k: v.to(device) for k, v in batch.text.inputs().items()})
        temperature = self.model.temperature.float().clamp(*TEMPERATURE_RANGE)
        return clip_loss(text, image, temperature, same)

    def _lr(self, step: int) -> float:
        config = self.config
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        if config.schedule == "cosine":
            done = min(1.0, (step - config.warmup) / max(1, self.total_steps - config.warmup))
            return config.lr * 0.5 * (1 + math.cos(math.pi * done))
        return config.lr

    def _validate(self) -> float | None:
        if self.val is None:
            return None
        self.model.eval()
        everything = np.arange(len(self.val))
        size = min(self.config.batch_size, len(everything))
        chunks = [everything[i : i + size] for i in range(0, len(everything), size)]
        losses, counts = [], []
        with torch.no_grad():
            for batch in self.val.batches(chunks):
                if len(batch.image_keys) > 1:  # one pair alone has no negatives
                    losses.append(float(self._loss(batch, self.val)))
                    counts.append(len(batch.image_keys))
        self._train_mode()
        return float(np.average(losses, weights=counts)) if losses else None

    def _train_mode(self) -> None:
        """Training mode, except frozen towers: their dropout would only add noise."""
        self.model.train()
        if self.config.freeze_text:
            self.model.text_encoder.eval()
        if self.config.freeze_vision:
            self.model.visual_encoder.eval()

    def _save(self, name: str, epoch: int, best_loss: float | None = None) -> None:
        # CPU tensors: a checkpoint written on a GPU then loads anywhere without map_location.
        state: dict[str, Any] = {
            "epoch": epoch,
            "global_step": self.global_step,
            "model_state_dict": _on_cpu(self.model.state_dict()),
            "optimizer_state_dict": _on_cpu(self.optimizer.state_dict()),
        }
        if best_loss is not None:
            state["best_loss"] = float(best_loss)
        atomic_write(self.config.out / name, lambda tmp: torch.save(state, tmp))

    def _plot(self, log_path: Path) -> Path | None:
        from retrieval.plotting import training_curves

        rows = _read_log(log_path)
        steps = [r for r in rows if r.get("type") == "step"]
        if not steps:
            return None
        path = self.config.out / PLOT_FILE
        training_curves(steps, [r for r in rows if r.get("type") == "epoch"], path)
        return path


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of this folder's own outputs that a killed run left behind."""
    for name in ("checkpoint.pt", "best_checkpoint.pt", STATE_FILE, LOG_FILE, PLOT_FILE):
        for stale in out.glob(f".{name}{TMP_MARKER}*"):
            stale.unlink(missing_ok=True)


def _read_log(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return rows


def _truncate_log(path: Path, step: int, epoch: int) -> None:
    """Drop what a killed run logged after the checkpoint it resumes from (at ``step``, in ``epoch``)."""
    kept = [
        r
        for r in _read_log(path)
        if (r.get("type") == "step" and r["step"] <= step)
        or (r.get("type") == "epoch" and r["epoch"] < epoch)
    ]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
