"""A training run's log: one JSON line per optimizer step and per epoch, and its curves (PNG)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from retrieval.durable import atomic_write_bytes
from retrieval.training.config import StepLog

__all__ = ["LOG_FILE", "PLOT_FILE", "RunLog", "read_log"]

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "train_curves.png"


class RunLog:
    """``train_log.jsonl`` in a run's folder, appended line by line (each flushed at once)."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOG_FILE
        self._file: IO[str] | None = None

    def __enter__(self) -> RunLog:
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def step(self, entry: StepLog) -> None:
        self._write({"type": "step", **asdict(entry)})

    def epoch(
        self, epoch: int, step: int, train_loss: float | None, val_loss: float | None, seconds: float
    ) -> None:
        self._write(
            {
                "type": "epoch",
                "epoch": epoch,
                "step": step,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "seconds": round(seconds, 3),
            }
        )

    def truncate(self, step: int, epoch: int) -> None:
        """Drop what a killed run logged after the checkpoint it resumes from (``step``, in ``epoch``)."""
        kept = [
            r
            for r in read_log(self.path)
            if (r.get("type") == "step" and r["step"] <= step)
            or (r.get("type") == "epoch" and r["epoch"] < epoch)
        ]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def plot(self) -> Path | None:
        """``train_curves.png`` beside the log; None when no step was logged."""
        from retrieval.plotting import training_curves

        rows = read_log(self.path)
        steps = [r for r in rows if r.get("type") == "step"]
        if not steps:
            return None
        path = self.path.parent / PLOT_FILE
        training_curves(steps, [r for r in rows if r.get("type") == "epoch"], path)
        return path

    def _write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError("the run log is not open")
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()


def read_log(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return rows
