"""Small PNG charts: recall@K curves of an evaluation, and the curves of a training run.

Figures are made with matplotlib's object API and drawn by its Agg canvas: no pyplot, no
backend chosen for the process (a caller's own plots are left as they are), nothing opens a
window, and importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.durable import atomic_write

__all__ = ["recall_curves", "training_curves"]

_TITLES = {"text_to_image": "text → image", "image_to_text": "image → text"}


def _figure(columns: int, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A figure of ``columns`` panels, on an Agg canvas of its own."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, columns, squeeze=False)[0]
    return fig, list(axes)


def recall_curves(directions: Sequence[Any], path: Path) -> None:
    """One panel per direction: recall@K against K (log scale), a line per search method."""
    fig, axes = _figure(max(1, len(directions)), (5 * max(1, len(directions)), 3.6))
    for ax, direction in zip(axes, directions, strict=False):
        for method in direction.methods:
            ks = sorted(int(k) for k in method.curve)
            ax.plot(ks, [method.curve[k] for k in ks], marker="o", markersize=3, label=method.method)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_title(f"{_TITLES.get(direction.direction, direction.direction)} ({direction.queries} queries)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def training_curves(
    steps: Sequence[Mapping[str, Any]], epochs: Sequence[Mapping[str, Any]], path: Path
) -> None:
    """Loss (per step, and validation per epoch), temperature and learning rate against the step."""
    fig, (loss_ax, temp_ax, lr_ax) = _figure(3, (14, 3.6))
    x = [s["step"] for s in steps]
    loss_ax.plot(x, [s["loss"] for s in steps], linewidth=0.8, alpha=0.5, label="train (step)")
    if len(steps) >= 10:  # a moving average reads better than the raw, noisy per-step loss
        window = max(5, len(steps) // 20)
        total = np.cumsum([0.0, *(s["loss"] for s in steps)])
        smooth = (total[window:] - total[:-window]) / window
        loss_ax.plot(x[window - 1 :], smooth, linewidth=1.5, label=f"train (mean of {window} steps)")
    val = [e for e in epochs if e.get("val_loss") is not None]
    if val:
        loss_ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], marker="o", label="validation")
    loss_ax.set_title("contrastive loss")
    loss_ax.set_xlabel("step")
    loss_ax.legend(fontsize=8)
    temp_ax.plot(x, [s["temperature"] for s in steps])
    temp_ax.set_title("temperature")
    temp_ax.set_xlabel("step")
    lr_ax.plot(x, [s["lr"] for s in steps])
    lr_ax.set_title("learning rate")
    lr_ax.set_xlabel("step")
    for ax in (loss_ax, temp_ax, lr_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
