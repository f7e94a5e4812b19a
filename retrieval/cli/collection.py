"""``retrieval neighbors`` and ``retrieval duplicates``: whole-collection work over an index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, cast

import typer

from retrieval.cli.common import Bar, Json, bars_wanted

IndexOpt = Annotated[Path, typer.Option("--index", help="Index folder.")]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method", help="exact (BLAS blocks) or index (the collection's FAISS index, recall measured)."
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="FAISS threads (default: all cores).")]


def neighbors(
    index: IndexOpt = Path("indexes/default"),
    source: Annotated[
        str, typer.Option("--source", help="Items whose neighbours are wanted: images or captions.")
    ] = "images",
    target: Annotated[
        str, typer.Option("--target", help="Where the neighbours come from: images or captions.")
    ] = "images",
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours an item.")] = 50,
    out: Annotated[
        Path, typer.Option("--out", help="Parquet file to write (id, neighbor_ids, scores).")
    ] = Path("neighbors.parquet"),
    method: MethodOpt = "exact",
    block_rows: Annotated[
        int, typer.Option("--block-rows", help="Items searched and checkpointed at a time.")
    ] = 16_384,
    threads: ThreadsOpt = None,
    as_json: Json = False,
) -> None:
    """Every item's top-k neighbours (itself left out), to Parquet; rerun after a stop to resume."""
    from retrieval.search.neighbors import Method, NeighborsConfig, write_neighbors
    from retrieval.search.retriever import Retriever

    config = NeighborsConfig(source, target, k, cast(Method, method), block_rows, threads=threads)
    with Retriever.open(index) as retriever:
        try:
            report = write_neighbors(retriever, out, config, Bar(enabled=bars_wanted(as_json)))
        except KeyboardInterrupt:
            saved = len(list(out.with_name(out.name + ".parts").glob("block-*.parquet")))
            typer.echo(f"interrupted: {saved:,} blocks saved; rerun the same command to resume", err=True)
            raise SystemExit(130) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    versions = ", ".join(f"{c} v{v}" for c, v in report.versions.items())
    how = (
        "exact" if report.recall is None else f"through the index, recall@{k} {report.recall:.3f} on a sample"
    )
    resumed = (
        f"; {report.resumed_blocks:,} of {report.blocks:,} blocks resumed" if report.resumed_blocks else ""
    )
    rate = report.rows / report.seconds if report.seconds else 0.0
    typer.echo(
        f"{report.out}: {report.rows:,} {source} x top-{k} {target} ({how}) from {versions} "
        f"in {report.seconds:.1f} s, {rate:,.0f} items/s{resumed}"
    )


def duplicates(
    index: IndexOpt = Path("indexes/default"),
    collection: Annotated[str, typer.Option("--collection", help="images or captions.")] = "images",
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Cosine at or above which two items are near-duplicates [default: from the collection].",
        ),
    ] = None,
    false_match_rate: Annotated[
        float,
        typer.Option(
            "--false-match-rate", help="Without --threshold: false partners an item by chance, at most."
        ),
    ] = 1e-3,
    out: Annotated[
        Path, typer.Option("--out", help="Parquet file to write (group, id, path, score).")
    ] = Path("duplicates.parquet"),
    grid_dir: Annotated[
        Path | None,
        typer.Option("--grid-dir", help="Also draw a contact sheet PNG per group in this folder."),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours looked at an item.")] = 32,
    method: MethodOpt = "exact",
    threads: ThreadsOpt = None,
    scratch: Annotated[
        Path | None,
        typer.Option("--scratch", help="Where the vectors are copied while it runs (N x D x 4 bytes)."),
    ] = None,
    as_json: Json = False,
) -> None:
    """Groups of near-duplicates: identical files first, then cosine >= T, each member within T of
    its group's representative."""
    from retrieval.search.duplicates import DuplicatesConfig, draw_groups, find_duplicates
    from retrieval.search.neighbors import Method
    from retrieval.search.retriever import Retriever

    config = DuplicatesConfig(
        collection, threshold, false_match_rate, k, cast(Method, method), threads=threads
    )
    with Retriever.open(index) as retriever:
        report = find_duplicates(retriever, config, Bar(enabled=bars_wanted(as_json)), scratch)
    report.write(out)
    sheets = draw_groups(report, grid_dir) if grid_dir is not None else []
    if as_json:
        typer.echo(json.dumps(report.to_dict() | {"out": str(out), "sheets": len(sheets)}, indent=2))
        return
    typer.echo(report.threshold.describe(collection))
    for group in report.groups[:10]:
        kind = "identical" if group.identical else "near"
        names = [_shown(report.labels[int(i)], collection) for i in group.ids[:4]]
        more = f", +{len(group.ids) - 4} more" if len(group.ids) > 4 else ""
        typer.echo(f"  group {group.number} ({len(group.ids)}, {kind}): {', '.join(names)}{more}")
    if len(report.groups) > 10:
        typer.echo(f"  ... {len(report.groups) - 10:,} more groups in {out}")
    if report.capped:
        typer.echo(
            f"warning: {report.capped:,} items have {k} or more near partners: a group they lead may be "
            f"cut; rerun with a larger -k",
            err=True,
        )
    drawn = f"; {_count(len(sheets), 'contact sheet')} in {grid_dir}" if grid_dir is not None else ""
    typer.echo(
        f"{out}: {_count(len(report.groups), 'group')}, {report.members:,} of {report.items:,} {collection} "
        f"({report.identical_files:,} files of identical content) in {report.seconds:.1f} s{drawn}"
    )


def _shown(label: str, collection: str) -> str:
    if collection == "images":
        from retrieval.cli.search import shown_path

        return shown_path(label)
    return repr(label if len(label) <= 30 else label[:27] + "...")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
