"""``retrieval eval``: recall of a model and of its indexes, and zero-shot accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli.common import (
    Bar,
    CheckpointOpt,
    DeviceOpt,
    Json,
    PrecisionOpt,
    TextModelOpt,
    TrustOpt,
    VisionModelOpt,
    bars_wanted,
    model_paths,
)


def evaluate(
    index: Annotated[
        Path | None,
        typer.Option("--index", help="Index folder: search its collections, exactly and by index."),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs", help="CSV/TSV/JSONL/Parquet of image and caption (default: the index's pairs)."
        ),
    ] = None,
    images_root: Annotated[
        Path | None, typer.Option("--images-root", help="Folder relative image paths start from.")
    ] = None,
    labels_column: Annotated[
        str | None, typer.Option("--labels-column", help="Column of class labels: adds zero-shot accuracy.")
    ] = None,
    k: Annotated[str, typer.Option("-k", "--k", help="Comma-separated K for recall@K.")] = "1,5,10",
    template: Annotated[
        list[str] | None, typer.Option("--template", help="Zero-shot prompt, {} is the label; repeatable.")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write FILE.md (with a PNG) or FILE.html.")
    ] = None,
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: Annotated[int | None, typer.Option("--workers", help="Image decoding processes.")] = None,
    as_json: Json = False,
) -> None:
    """Recall@K both ways (exact and through each index), ranks, and zero-shot accuracy."""
    from retrieval.errors import ConfigError
    from retrieval.evaluation.protocol import DEFAULT_TEMPLATES, EvalConfig
    from retrieval.evaluation.protocol import evaluate as run_evaluation
    from retrieval.evaluation.report import tables, write_report

    try:
        ks = tuple(sorted({int(x) for x in k.split(",") if x.strip()}))
    except ValueError as e:
        raise ConfigError(f"-k takes comma-separated integers, got {k!r}") from e
    paths = model_paths(checkpoint, text_model, vision_model, trust_checkpoint)
    config = EvalConfig(
        pairs=pairs,
        index=index,
        images_root=images_root,
        model=paths.over(),
        index_model=paths,
        labels_column=labels_column,
        ks=ks,
        templates=tuple(template) if template else DEFAULT_TEMPLATES,
        device=device,
        precision=precision,
        workers=workers,
    )
    result = run_evaluation(config, progress=Bar(enabled=bars_wanted(as_json)))
    written = write_report(result, report) if report is not None else []
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str, ensure_ascii=False))
        return
    typer.echo(
        f"{result.source}: {result.images} images, {result.captions} distinct captions, "
        f"{result.pairs} pairs, {len(result.skipped)} rows skipped, {result.seconds:.1f} s"
    )
    parts = tables(result)
    _print_table(parts[0])
    z = result.zeroshot
    if z is not None:
        typer.echo(
            f"\nzero-shot over {z.images} labelled images: top-1 {z.top1:.3f}, top-5 {z.top5:.3f}, "
            f"mean precision@10 of the labels as queries {z.mean_precision_at_10:.3f}"
        )
        _print_table(parts[1])
        if z.confusions:
            typer.echo(
                "most frequent confusions: " + ", ".join(f"{t} -> {p} ({n})" for t, p, n in z.confusions)
            )
    for outcome in result.skipped[:10]:
        typer.echo(f"skipped  {outcome.source}: {outcome.reason}")
    if len(result.skipped) > 10:
        typer.echo(f"... {len(result.skipped) - 10} more skipped (--json lists all)")
    for path in written:
        typer.echo(f"report: {path}")


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.ljust(w) if c < 2 else cell.rjust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        typer.echo("  ".join(cells).rstrip())
