"""``search text`` and ``search image``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from retrieval.cli.common import (
    CheckpointOpt,
    DeviceOpt,
    Json,
    TextModelOpt,
    TrustOpt,
    VisionModelOpt,
    model_paths,
)

IndexDirOpt = Annotated[Path, typer.Option("--index", help="Index folder.")]
KOpt = Annotated[int, typer.Option("-k", "--k", help="How many results.")]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--where",
        help="Keep results whose FIELD=VALUE or FIELD~GLOB (path: as printed or relative to the "
        "image folder; text, metadata); repeatable.",
    ),
]
GridOpt = Annotated[Path | None, typer.Option("--grid", help="Also draw the results as a contact sheet PNG.")]
KeepOpt = Annotated[
    bool,
    typer.Option(
        "--keep-identical", help="List files of identical content (and equal captions) each on their own."
    ),
]


def shown_path(path: str) -> str:
    """A result's path as the table prints it: relative to the working folder when inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _print_hits(hits: list[Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2, default=str, ensure_ascii=False))
        return
    if not hits:
        typer.echo("no results")
        return
    for h in hits:
        label = shown_path(h.path) if h.path is not None else h.text
        if h.text is not None and h.fields.get("image"):
            label = f"{h.text}  [{h.fields['image']}]"
        same = h.fields.get("identical") or []
        if same:
            first = shown_path(same[0]) if isinstance(same[0], str) else f"id {same[0]}"
            label += f"  (+{len(same)} identical: {first}{', ...' if len(same) > 1 else ''})"
        typer.echo(f"{h.rank:>3}  {h.score:7.4f}  {label}")


def _draw(hits: list[Any], grid: Path, title: str) -> None:
    from retrieval.search.sheet import Tile, contact_sheet

    tiles = []
    for h in hits:
        name = Path(h.path).name if h.path is not None else Path(str(h.fields.get("image") or "")).name
        label = f"#{h.rank} {h.score:.3f} {name}".rstrip()
        tiles.append(Tile(label, image=h.path, text=h.text if h.path is None else None))
    contact_sheet(tiles, grid, title=title)


def _search(
    index: Path,
    device: str,
    target: str,
    where: list[str] | None,
    run: Any,
    as_json: bool,
    k: int,
    grid: Path | None,
    title: str,
    paths: Any,
    keep_identical: bool,
) -> None:
    from retrieval.search.filters import parse_where
    from retrieval.search.retriever import Retriever

    with Retriever.open(index, device=device, model=paths) as retriever:
        allow = retriever.filter_ids(target, parse_where(where)) if where else None  # type: ignore[arg-type]
        hits = run(retriever, k, allow, not keep_identical)
        retriever.remember_model()  # a model named by flags: found again without them next time
    _print_hits(hits, as_json)
    if grid is not None and hits:
        _draw(hits, grid, title)
        if not as_json:
            typer.echo(f"contact sheet: {grid}")


def search_text(
    query: Annotated[str, typer.Argument(help="The sentence to search for.")],
    index: IndexDirOpt = Path("indexes/default"),
    k: KOpt = 10,
    target: Annotated[str, typer.Option("--target", help="images or captions.")] = "images",
    where: WhereOpt = None,
    device: DeviceOpt = "auto",
    grid: GridOpt = None,
    keep_identical: KeepOpt = False,
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: Json = False,
) -> None:
    """Top images (or captions) for a sentence."""

    def run(retriever: Any, k: int, allow: Any, fold: bool) -> Any:
        return retriever.search_text(query, k, target, allow, fold_identical=fold)

    paths = model_paths(checkpoint, text_model, vision_model, trust_checkpoint)
    _search(
        index, device, target, where, run, as_json, k, grid, f"search text: {query}", paths, keep_identical
    )


def search_image(
    image: Annotated[Path, typer.Argument(help="The query image.")],
    index: IndexDirOpt = Path("indexes/default"),
    k: KOpt = 10,
    target: Annotated[
        str, typer.Option("--target", help="captions, or images for look-alikes.")
    ] = "captions",
    where: WhereOpt = None,
    device: DeviceOpt = "auto",
    grid: GridOpt = None,
    keep_identical: KeepOpt = False,
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: Json = False,
) -> None:
    """Top captions (or similar images) for an image."""

    def run(retriever: Any, k: int, allow: Any, fold: bool) -> Any:
        return retriever.search_image(image, k, target, allow, fold_identical=fold)

    paths = model_paths(checkpoint, text_model, vision_model, trust_checkpoint)
    _search(
        index,
        device,
        target,
        where,
        run,
        as_json,
        k,
        grid,
        f"search image: {image.name}",
        paths,
        keep_identical,
    )
