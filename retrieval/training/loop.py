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

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.model.checkpoint import Checkpoint, load_checkpoint
from retrieval.model.dual_encoder import MultiModalEncoder
from retrieval.model.preprocess import ImagePreprocess, TextBatcher
from retrieval.model.runtime import Runtime, resolve_runtime
from retrieval.progress import Progress, Silent
from retrieval.training.checkpoints import (
    Start,
    remove_stale_temporaries,
    resume_point,
    save_checkpoint,
    write_plan,
)
from retrieval.training.config import StepLog, TrainConfig, TrainReport, check_config
from retrieval.training.data import Batch, PairData, random_crops
from retrieval.training.runlog import RunLog

__all__ = ["StepLog", "TrainConfig", "TrainReport", "clip_loss", "train"]

TEMPERATURE_RANGE = (0.01, 1.0)  # logits are cosine / temperature: at most 100x, at least 1x


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
    """Train as ``config`` says; ``on_step`` is called after every optimizer step.

    The run seeds torch's random generators itself (the initial projections, dropout at each
    step) inside ``torch.random.fork_rng``: the caller's random state is the same afterwards.
    """
    check_config(config)
    runtime = resolve_runtime(config.device, config.precision)
    devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _Trainer(config, runtime, progress or Silent()).fit(on_step)


def build_model(config: TrainConfig) -> tuple[MultiModalEncoder, Checkpoint | None]:
    """The model to train: a checkpoint's (``resume`` or ``init``), built as inference builds it,
    or fresh towers from the two folders with seeded projections."""
    source = config.resume or config.init
    if source is None:
        torch.manual_seed(config.seed)  # the initial projections of a fresh model
        return MultiModalEncoder(config.text_model, config.vision_model, embed_dim=config.embed_dim), None
    checkpoint = load_checkpoint(source, trust_checkpoint=config.trust_checkpoint)
    model = MultiModalEncoder.from_state_dict(
        checkpoint.model_state_dict, config.text_model, config.vision_model
    )
    return model, checkpoint


class _Trainer:
    """One run: the model, its optimizer and data, and the loop over epochs and steps."""

    def __init__(self, config: TrainConfig, runtime: Runtime, progress: Progress) -> None:
        self.config = config
        self.progress = progress
        self.runtime = runtime
        self.model, checkpoint = build_model(config)
        frozen_parts = (
            ("text_encoder", config.freeze_text),
            ("visual_encoder", config.freeze_vision),
            ("text_projection", config.freeze_text_projection),
        )
        for name, frozen in frozen_parts:
            for p in getattr(self.model, name).parameters():
                p.requires_grad_(not frozen)
        self.model.to(runtime.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.preprocess = ImagePreprocess.from_processor(self.model.image_processor)
        self.batcher = TextBatcher.for_model(self.model)
        self.data = self._read(config.pairs)
        self.val = self._read(config.val_pairs) if config.val_pairs is not None else None
        # A frozen text tower gives every caption the same [CLS] state at every step: once is enough.
        self.text_states = {
            d: self._text_states(d) for d in (self.data, self.val) if d is not None and config.freeze_text
        }
        self.batches_per_epoch = max(1, len(self.data) // config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.scaler = torch.amp.GradScaler(enabled=runtime.precision == "fp16")
        config.out.mkdir(parents=True, exist_ok=True)
        self.plan = {
            "pairs_sha256": self.data.sha256,
            "pairs": len(self.data),
            "batch_size": config.batch_size,
            "grad_accum": config.grad_accum,
            "seed": config.seed,
            "steps_per_epoch": self.steps_per_epoch,
        }
        self.start = Start()
        self.log = RunLog(config.out)
        if config.resume is not None and checkpoint is not None:
            self.start = resume_point(
                config.resume,
                checkpoint,
                self.optimizer,
                self.plan,
                self.steps_per_epoch,
                config.trust_checkpoint,
            )
            self.log.truncate(self.start.global_step, self.start.epoch)
        self.global_step = self.start.global_step
        self.best_loss = self.start.best_loss

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

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, on_step: Callable[[StepLog], None] | None) -> TrainReport:
        config = self.config
        started = time.perf_counter()
        remove_stale_temporaries(config.out)
        write_plan(config.out, self.plan)
        steps_run = pairs_seen = 0
        train_loss = val_loss = None
        remaining = max(0, (config.epochs - self.start.epoch) * self.steps_per_epoch - self.start.skip_steps)
        self.progress.start("steps", remaining)
        with self.log:
            for epoch in range(self.start.epoch, config.epochs):
                epoch_losses: list[float] = []
                epoch_started = tick = time.perf_counter()
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
                    self.log.step(entry)
                    self.progress.advance(1)
                    if on_step is not None:
                        on_step(entry)
                    if config.save_every and self.global_step % config.save_every == 0:
                        self._save("checkpoint.pt", epoch - 1)  # epoch not complete: resume redoes it
                train_loss = float(np.mean(epoch_losses)) if epoch_losses else None
                val_loss = self._validate()
                self.start = replace(self.start, skip_steps=0)
                self._save("checkpoint.pt", epoch)
                watched = val_loss if self.val is not None else train_loss
                if watched is not None and (self.best_loss is None or watched < self.best_loss):
                    self.best_loss = watched
                    self._save("best_checkpoint.pt", epoch, best_loss=watched)
                self.log.epoch(
                    epoch, self.global_step, train_loss, val_loss, time.perf_counter() - epoch_started
                )
        self.progress.finish()
        training = time.perf_counter() - started
        plot = self.log.plot()
        best = config.out / "best_checkpoint.pt"
        return TrainReport(
            out=config.out,
            checkpoint=config.out / "checkpoint.pt",
            best_checkpoint=best if best.is_file() else None,
            resumed_from=config.resume,
            start_epoch=self.start.epoch,
            epochs=config.epochs,
            global_step=self.global_step,
            steps_run=steps_run,
            pairs=len(self.data),
            val_pairs=len(self.val) if self.val is not None else 0,
            train_loss=train_loss,
            val_loss=val_loss,
            best_loss=self.best_loss,
            pairs_per_s=round(pairs_seen / max(training, 1e-9), 2),
            seconds=round(time.perf_counter() - started, 3),
            skipped=tuple(self.data.outcomes + (self.val.outcomes if self.val is not None else [])),
            log=self.log.path,
            plot=plot,
        )

    def _steps(self, epoch: int) -> Iterator[list[Batch]]:
        """The optimizer steps of ``epoch`` still to run, each a list of micro-batches."""
        config = self.config
        order = np.random.default_rng([config.seed, epoch]).permutation(len(self.data))
        size = min(config.batch_size, len(order))
        chunks = [order[i * size : (i + 1) * size] for i in range(self.batches_per_epoch)]
        todo = chunks[self.start.skip_steps * config.grad_accum if epoch == self.start.epoch else 0 :]
        batches = self.data.batches(todo)
        while True:
            step = [b for _, b in zip(range(config.grad_accum), batches, strict=False)]
            if not step:
                return
            yield step

    def _update(self, batches: list[Batch]) -> tuple[float, int]:
        """One optimizer step over ``batches``; returns the mean loss and the pairs seen."""
        config = self.config
        position = self.global_step - self.start.step_offset  # this step's place in the schedule
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
        save_checkpoint(
            self.config.out / name, self.model, self.optimizer, epoch, self.global_step, best_loss
        )
