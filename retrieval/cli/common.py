"""What the commands share: option types, table or JSON output, progress bars."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["Bar", "bars_wanted", "emit", "model_paths", "open_encoder"]


Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
# Model flags default to None: the index's own model where a command has --index, otherwise the
# defaults of ``ModelSpec`` (checkpoints/best_checkpoint.pt, models/bert-base-uncased,
# models/vit-base-patch16-224), the one place they are written.
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="The seed-format checkpoint (.pt) [default: the index's, else checkpoints/best_checkpoint.pt].",
        show_default=False,
    ),
]
TextModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--text-model",
        help="Folder of the BERT tower and tokenizer [default: the index's, else models/bert-base-uncased].",
        show_default=False,
    ),
]
VisionModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--vision-model",
        help="Folder of the ViT tower and image processor [default: the index's, else "
        "models/vit-base-patch16-224].",
        show_default=False,
    ),
]
ModelIndexOpt = Annotated[
    Path | None,
    typer.Option("--index", help="Use the model this index was built with (model flags override parts)."),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="Allow a checkpoint that needs full unpickling (can run code: only for files you made).",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto, fp32, bf16 or fp16.")]


def model_paths(
    checkpoint: Path | None, text_model: Path | None, vision_model: Path | None, trust: bool = False
) -> Any:
    """The model flags as the library's ``ModelPaths``."""
    from retrieval.store.location import ModelPaths

    return ModelPaths(checkpoint, text_model, vision_model, trust_checkpoint=trust)


def open_encoder(index: Path | None, paths: Any, device: str, precision: str = "auto") -> Any:
    """The model of ``index`` (flags override parts, and a moved model is remembered), or of the flags."""
    from retrieval.errors import StoreError
    from retrieval.model.encoder import Encoder
    from retrieval.search.modelref import load_index_encoder
    from retrieval.store.folder import Store
    from retrieval.store.location import remember_model

    if index is None:
        return Encoder.load(paths.over(), device=device, precision=precision)
    with Store.open(index) as store:
        manifest = store.manifest
    if manifest is None:
        raise StoreError(f"{index} has no committed state")
    encoder = load_index_encoder(index, manifest, paths, device=device, precision=precision)
    if paths.given and encoder.spec is not None:
        remember_model(index, encoder.spec, encoder.source.stat if encoder.source else None)
    return encoder


def emit(data: Any, as_json: bool, rows: Sequence[tuple[str, Any]]) -> None:
    """``data`` as JSON, or ``rows`` as an aligned two-column table."""
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {'-' if value is None else value}")


# The library's stage names -> what the bar says, and its unit.
_STAGES = {
    "images": ("encoding images", "image"),
    "captions": ("encoding captions", "caption"),
    "decoding": ("decoding images", "image"),
    "steps": ("training", "step"),
    "neighbors": ("neighbours", "item"),
    "reading vectors": ("reading vectors", "row"),
}


class Bar:
    """tqdm progress for the library's ``Progress`` protocol (on stderr, rate and ETA)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, stage: str, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            desc, unit = _STAGES.get(stage, (stage, "item"))
            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def note(self, **values: str) -> None:
        """Short live figures after the bar (a loss, a temperature)."""
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def bars_wanted(as_json: bool) -> bool:
    """Bars go to a terminal (not with --json); ``RETRIEVAL_PROGRESS=1`` forces them."""
    return (not as_json and sys.stderr.isatty()) or os.environ.get("RETRIEVAL_PROGRESS") == "1"
