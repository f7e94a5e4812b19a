"""``search text`` and ``search image``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from retrieval.cli.common import DeviceOpt, Json

IndexDirOpt = Annotated[Path, typer.Option("--index", help="Index folder.")]
KOpt = Annotated[int, typer.Option("-k", "--k", help="How many results.")]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--where", help="Keep results whose FIELD=VALUE or FIELD~GLOB (path, text, metadata); repeatable."
    ),
]


def _print_hits(hits: list[Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2, default=str, ensure_ascii=False))
        return
    if not hits:
        typer.echo("no results")
        return
    for h in hits:
        label = h.path if h.path is not None else h.text
        if h.text is not None and h.fields.get("image"):
            label = f"{h.text}  [{h.fields['image']}]"
        typer.echo(f"{h.rank:>3}  {h.score:7.4f}  {label}")


GridOpt = Annotated[
    Path | None, typer.Option("--grid", help="Also draw image results as a contact sheet PNG.")
]


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
) -> None:
    from retrieval.search import Retriever, parse_where

    with Retriever.open(index, device=device) as retriever:
        allow = retriever.filter_ids(target, parse_where(where)) if where else None  # type: ignore[arg-type]
        hits = run(retriever, k, allow)
    _print_hits(hits, as_json)
    if grid is not None:
        from retrieval.sheet import contact_sheet

        paths = [(h.path, f"#{h.rank}  {h.score:.3f}") for h in hits if h.path is not None]
        contact_sheet(paths, grid, title=title)
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
    as_json: Json = False,
) -> None:
    """Top images (or captions) for a sentence."""

    def run(retriever: Any, k: int, allow: Any) -> Any:
        return retriever.search_text(query, k, target, allow)

    _search(index, device, target, where, run, as_json, k, grid, f"search text: {query}")


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
    as_json: Json = False,
) -> None:
    """Top captions (or similar images) for an image."""

    def run(retriever: Any, k: int, allow: Any) -> Any:
        return retriever.search_image(image, k, target, allow)

    _search(index, device, target, where, run, as_json, k, grid, f"search image: {image.name}")
