"""``retrieval train``: fine-tune or continue training, in the seed's checkpoint format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from retrieval.cli.common import (
    Bar,
    DeviceOpt,
    Json,
    PrecisionOpt,
    TextModelOpt,
    TrustOpt,
    VisionModelOpt,
    bars_wanted,
    model_paths,
)


def train(
    pairs: Annotated[Path, typer.Option("--pairs", help="CSV/TSV/JSONL/Parquet of image and caption.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for checkpoint.pt, best_checkpoint.pt and logs.")
    ] = Path("checkpoints"),
    val_pairs: Annotated[
        Path | None, typer.Option("--val-pairs", help="Held-out pairs: their loss picks best_checkpoint.pt.")
    ] = None,
    images_root: Annotated[
        Path | None, typer.Option("--images-root", help="Folder relative image paths start from.")
    ] = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    init: Annotated[
        Path | None, typer.Option("--init", help="Start from this checkpoint's weights (fresh optimizer).")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue this checkpoint: weights, optimizer, epoch, step."),
    ] = None,
    trust_checkpoint: TrustOpt = False,
    epochs: Annotated[
        int, typer.Option("--epochs", help="Epochs in all (a resumed run counts those done).")
    ] = 10,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Pairs per batch (in-batch negatives).")
    ] = 32,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.")] = 1e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.01,
    warmup: Annotated[int, typer.Option("--warmup", help="Steps of linear warm-up.")] = 0,
    schedule: Annotated[
        str, typer.Option("--schedule", help="constant or cosine (after warm-up).")
    ] = "constant",
    max_grad_norm: Annotated[
        float | None, typer.Option("--max-grad-norm", help="Clip the gradient norm to this.")
    ] = None,
    freeze_text: Annotated[bool, typer.Option("--freeze-text", help="Keep the text tower fixed.")] = False,
    freeze_vision: Annotated[
        bool, typer.Option("--freeze-vision", help="Keep the image tower fixed.")
    ] = False,
    freeze_text_projection: Annotated[
        bool,
        typer.Option(
            "--freeze-text-projection",
            help="Keep the text projection fixed too: images learn to meet the text space as it is.",
        ),
    ] = False,
    augment: Annotated[
        bool, typer.Option("--augment", help="Random resized crops of the training images.")
    ] = False,
    save_every: Annotated[
        int | None, typer.Option("--save-every", help="Also write checkpoint.pt every N steps.")
    ] = None,
    embed_dim: Annotated[
        int, typer.Option("--embed-dim", help="Shared space width of a model not loaded from a checkpoint.")
    ] = 256,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds the data order and every step's randomness.")
    ] = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: Annotated[int | None, typer.Option("--workers", help="Image decoding processes.")] = None,
    cache_gb: Annotated[
        float, typer.Option("--cache-gb", help="Keep decoded images in memory when they fit in this many GB.")
    ] = 2.0,
    as_json: Json = False,
) -> None:
    """Contrastive training (symmetric InfoNCE, AdamW) that writes and resumes seed-format checkpoints."""
    from retrieval.errors import ConfigError
    from retrieval.training.config import TrainConfig
    from retrieval.training.loop import train as run_training

    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"--schedule must be constant or cosine, got {schedule!r}")
    paths = model_paths(None, text_model, vision_model).over()
    config = TrainConfig(
        pairs=pairs,
        out=out,
        text_model=paths.text_model,
        vision_model=paths.vision_model,
        val_pairs=val_pairs,
        images_root=images_root,
        init=init,
        resume=resume,
        trust_checkpoint=trust_checkpoint,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        schedule=schedule,  # type: ignore[arg-type]
        max_grad_norm=max_grad_norm,
        freeze_text=freeze_text,
        freeze_vision=freeze_vision,
        freeze_text_projection=freeze_text_projection,
        augment=augment,
        save_every=save_every,
        embed_dim=embed_dim,
        seed=seed,
        device=device,
        precision=precision,
        workers=workers,
        cache_gb=cache_gb,
    )
    bar = Bar(enabled=bars_wanted(as_json))

    def show(step: Any) -> None:
        bar.note(loss=f"{step.loss:.4f}", temp=f"{step.temperature:.4f}", lr=f"{step.lr:.2e}")

    report = run_training(config, progress=bar, on_step=show)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    resumed = f" (resumed at epoch {report.start_epoch})" if report.resumed_from else ""
    losses = [f"train loss {report.train_loss:.4f}"] if report.train_loss is not None else []
    if report.val_loss is not None:
        losses.append(f"validation loss {report.val_loss:.4f}")
    typer.echo(
        f"{report.out}: {report.steps_run} steps{resumed}, epoch {report.epochs}/{report.epochs}, "
        f"global step {report.global_step}; {', '.join(losses) or 'no loss'}; "
        f"{report.pairs_per_s:.1f} pairs/s; {len(report.skipped)} inputs skipped; {report.seconds:.1f} s"
    )
    typer.echo(f"checkpoint: {report.checkpoint}")
    if report.best_checkpoint is not None:
        typer.echo(f"best: {report.best_checkpoint} (best loss {report.best_loss:.4f})")
    typer.echo(f"log: {report.log}" + (f"  plot: {report.plot}" if report.plot else ""))
    for outcome in report.skipped[:10]:
        typer.echo(f"skipped  {outcome.source}: {outcome.reason}")
