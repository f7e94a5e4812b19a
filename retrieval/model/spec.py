"""Where a model lives: the seed's checkpoint and its two tower folders, and their defaults.

The one place the default paths are written (the command line's flags and the library's
``ModelSpec()`` both come here). Plain data: importing it costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_CHECKPOINT", "DEFAULT_TEXT_MODEL", "DEFAULT_VISION_MODEL", "ModelSpec"]

DEFAULT_CHECKPOINT = "checkpoints/best_checkpoint.pt"
DEFAULT_TEXT_MODEL = "./models/bert-base-uncased"
DEFAULT_VISION_MODEL = "./models/vit-base-patch16-224"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model lives: the seed's checkpoint and its two tower folders."""

    checkpoint: Path = Path(DEFAULT_CHECKPOINT)
    text_model: Path = Path(DEFAULT_TEXT_MODEL)
    vision_model: Path = Path(DEFAULT_VISION_MODEL)
    trust_checkpoint: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("checkpoint", "text_model", "vision_model"):
            object.__setattr__(self, name, Path(getattr(self, name)))
