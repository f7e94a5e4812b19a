"""``search text`` and ``search image``."""

from __future__ import annotations

import json
import math
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
PlusOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--plus",
        help="Add a text or an image file to the query, weighted as WEIGHT:PART (2:a dog); repeatable.",
    ),
]
MinusOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--minus", help="Take a text or an image file away from the query (WEIGHT:PART); repeatable."
    ),
]
DedupOpt = Annotated[
    float | None,
    typer.Option("--dedup", help="Fold results within this cosine of a better one into it (e.g. 0.95)."),
]
ConfidenceOpt = Annotated[
    float | None,
    typer.Option(
        "--min-confidence",
        help="Keep results whose score beats at least this fraction of random pairs (e.g. 0.999); "
        "none: 'no good match'.",
    ),
]
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


def _print_hits(hits: list[Any], as_json: bool, min_confidence: float | None = None) -> None:
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2, default=str, ensure_ascii=False))
        return
    if not hits:
        if min_confidence is not None:
            floor = _percent(min_confidence) if min_confidence < 1 else "100%"
            typer.echo(f"no good match: no result beats {floor} of random pairs")
        else:
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
        near = h.fields.get("near_duplicates") or []
        if near:
            label += f"  (+{len(near)} near-duplicate{'s' if len(near) > 1 else ''})"
        sure = f"  {_percent(h.confidence):>9}" if h.confidence is not None else ""
        typer.echo(f"{h.rank:>3}  {h.score:7.4f}{sure}  {label}")


def _percent(fraction: float) -> str:
    """0.9993 -> '99.93%': the decimals it takes to show how far from 100% it is, up to four."""
    left = 1.0 - fraction
    if left < 5e-7:
        return ">99.9999%"
    digits = min(4, max(0, math.ceil(round(-math.log10(left), 6)) - 2))
    shown = math.floor(fraction * 100 * 10**digits) / 10**digits  # never above what it is
    return f"{shown:.{digits}f}%"


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
    options: dict[str, Any],
) -> None:
    from retrieval.search.filters import parse_where
    from retrieval.search.retriever import Retriever

    with Retriever.open(index, device=device, model=paths) as retriever:
        allow = retriever.filter_ids(target, parse_where(where)) if where else None  # type: ignore[arg-type]
        hits = run(retriever, k, allow, options)
        retriever.remember_model()  # a model named by flags: found again without them next time
    _print_hits(hits, as_json, options.get("min_confidence"))
    if grid is not None and hits:
        _draw(hits, grid, title)
        if not as_json:
            typer.echo(f"contact sheet: {grid}")


def _options(keep_identical: bool, dedup: float | None, min_confidence: float | None) -> dict[str, Any]:
    return {"fold_identical": not keep_identical, "dedup": dedup, "min_confidence": min_confidence}


def _composed(
    first: dict[str, Any], plus: list[str] | None, minus: list[str] | None
) -> tuple[list[Any], list[Any]] | None:
    """The query as parts when --plus or --minus is given (the query itself first, weight 1:
    ``first`` is its ``Term`` fields)."""
    if not plus and not minus:
        return None
    from retrieval.search.compose import Term

    return [Term(**first), *(Term.parse(p) for p in plus or [])], [Term.parse(m) for m in minus or []]


def search_text(
    query: Annotated[str, typer.Argument(help="The sentence to search for.")],
    index: IndexDirOpt = Path("indexes/default"),
    k: KOpt = 10,
    target: Annotated[str, typer.Option("--target", help="images or captions.")] = "images",
    where: WhereOpt = None,
    device: DeviceOpt = "auto",
    grid: GridOpt = None,
    plus: PlusOpt = None,
    minus: MinusOpt = None,
    dedup: DedupOpt = None,
    min_confidence: ConfidenceOpt = None,
    keep_identical: KeepOpt = False,
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: Json = False,
) -> None:
    """Top images (or captions) for a sentence, optionally with parts added or taken away."""
    parts = _composed({"text": query}, plus, minus)

    def run(retriever: Any, k: int, allow: Any, options: dict[str, Any]) -> Any:
        if parts is not None:
            return retriever.search_composed(parts[0], parts[1], k, target, allow, **options)
        return retriever.search_text(query, k, target, allow, **options)

    paths = model_paths(checkpoint, text_model, vision_model, trust_checkpoint)
    options = _options(keep_identical, dedup, min_confidence)
    _search(index, device, target, where, run, as_json, k, grid, f"search text: {query}", paths, options)


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
    plus: PlusOpt = None,
    minus: MinusOpt = None,
    dedup: DedupOpt = None,
    min_confidence: ConfidenceOpt = None,
    keep_identical: KeepOpt = False,
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: Json = False,
) -> None:
    """Top captions (or similar images) for an image, optionally with parts added or taken away."""
    parts = _composed({"image": image}, plus, minus)

    def run(retriever: Any, k: int, allow: Any, options: dict[str, Any]) -> Any:
        if parts is not None:
            return retriever.search_composed(parts[0], parts[1], k, target, allow, **options)
        return retriever.search_image(image, k, target, allow, **options)

    paths = model_paths(checkpoint, text_model, vision_model, trust_checkpoint)
    options = _options(keep_identical, dedup, min_confidence)
    _search(
        index, device, target, where, run, as_json, k, grid, f"search image: {image.name}", paths, options
    )
