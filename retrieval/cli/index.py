"""``index build``, ``info``, ``verify``, ``vacuum`` and ``migrate``."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

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


def index_build(
    images: Annotated[Path | None, typer.Argument(help="Folder of images, walked recursively.")] = None,
    captions: Annotated[
        list[Path] | None,
        typer.Option("--captions", help="Caption file (.txt/.csv/.tsv/.jsonl/.parquet); repeatable."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Index folder.")] = Path("indexes/default"),
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per model batch.")] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Decoding processes (default: all cores but one, at least two)."),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    index_type: Annotated[
        str,
        typer.Option(
            "--index-type", help="flat, ivf, hnsw, ivfsq, ivfpq or auto (by size and memory budget)."
        ),
    ] = "auto",
    target_recall: Annotated[
        float, typer.Option("--target-recall", help="Recall@10 against exact search the index is tuned to.")
    ] = 0.95,
    memory_budget: Annotated[
        float | None,
        typer.Option(
            "--memory-budget",
            help="GB the index may take (default: half the available memory); auto picks IVF-PQ above it.",
        ),
    ] = None,
    shard_rows: Annotated[
        int, typer.Option("--shard-rows", help="Images per shard (captions: 16x); a crash redoes one shard.")
    ] = 4096,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Start the index over (needed to change model).")
    ] = False,
    replace_root: Annotated[
        bool,
        typer.Option("--replace-root", help="Index IMAGES_DIR in place of the image folder the index holds."),
    ] = False,
    engine: Annotated[
        str, typer.Option("--engine", help="local (this machine) or ray (a Ray cluster: see the README).")
    ] = "local",
    decode: Annotated[
        str,
        typer.Option("--decode", help="Where JPEGs are decoded: auto (the GPU on a CUDA host), gpu or cpu."),
    ] = "auto",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", help="Join this Ray cluster (auto: the one running here); default: start one."
        ),
    ] = None,
    encode_workers: Annotated[
        int | None,
        typer.Option("--encode-workers", help="Ray: model workers (default: one per GPU, else one)."),
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option("--gpus-per-worker", help="Ray: GPUs per model worker (default: 1 with GPUs, else 0)."),
    ] = None,
    trust_checkpoint: TrustOpt = False,
    as_json: Json = False,
) -> None:
    """Encode an image folder and caption files into the index folder (incremental, resumable)."""
    from retrieval.ann.faiss_index import IndexConfig
    from retrieval.build.config import ClusterConfig
    from retrieval.build.pipeline import BuildConfig, build_index
    from retrieval.errors import BuildInterrupted
    from retrieval.store.location import index_model

    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"{engine!r}: use local or ray", param_hint="--engine")
    if decode not in ("auto", "cpu", "gpu"):
        raise typer.BadParameter(f"{decode!r}: use auto, gpu or cpu", param_hint="--decode")
    if engine == "local" and (ray_address or encode_workers or gpus_per_worker is not None):
        raise typer.BadParameter("--ray-address, --encode-workers and --gpus-per-worker need --engine ray")
    config = BuildConfig(
        out=out,
        images=images,
        captions=tuple(captions or ()),
        # Flags not given: the model the index already has (a rerun needs none), else the defaults.
        model=model_paths(checkpoint, text_model, vision_model, trust_checkpoint).over(index_model(out)),
        device=device,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        rebuild=rebuild,
        replace_root=replace_root,
        image_shard_rows=shard_rows,
        caption_shard_rows=16 * shard_rows,
        index=IndexConfig(
            kind=index_type,  # type: ignore[arg-type]
            target_recall=target_recall,
            memory_budget=int(memory_budget * 1e9) if memory_budget else None,
        ),
        engine=engine,  # type: ignore[arg-type]
        decode=decode,  # type: ignore[arg-type]
        cluster=ClusterConfig(ray_address, encode_workers, gpus_per_worker),
    )
    with stop_on_signals() as (stop, received):
        try:
            report = build_index(config, progress=Bar(enabled=bars_wanted(as_json)), stop=stop)
        except BuildInterrupted as e:
            _stopped(e.report, as_json, received[0] if received else signal.SIGINT)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    parts = []
    for name, c in report.collections.items():
        rate = f", {c.encoded / c.seconds:.1f}/s encoded" if c.encoded and c.seconds > 0 else ""
        notes = "".join(
            f"; {count} {what}"
            for count, what in (
                (c.refreshed, "touched, kept"),
                (c.truncated, "cut to the tokenizer's limit"),
            )
            if count
        )
        parts.append(
            f"{name}: {c.indexed} indexed ({c.added} new: {c.encoded} encoded, {c.reused} reused; "
            f"{c.deleted} removed{notes}), {c.skipped} skipped, {c.failed} failed{rate}"
        )
        if c.stages:
            rates = ", ".join(
                f"{s.name} {s.capacity:,.0f}/s on {s.workers}" for s in c.stages if s.inputs and s.busy > 0
            )
            restarted = sum(s.restarts for s in c.stages)
            again = f"; {restarted} workers restarted, their work redone" if restarted else ""
            parts.append(f"{name} stages: {rates}{again}; {c.verdict}")
    for name, record in report.indexes.items():
        tuned = f", {record.param}={record.value}" if record.param else ""
        why = f" ({record.reason})" if record.reason and record.requested != "auto" else ""
        parts.append(
            f"{name} index {record.kind}{tuned}{why}: recall@10 {record.recall_at_10:.3f} vs exact "
            f"({record.queries} queries), {record.latency_ms:.2f} ms/query"
        )
    typer.echo(f"{out}: " + "; ".join(parts) + f" in {report.seconds:.1f} s")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[tuple[threading.Event, list[int]]]:
    """Ctrl-C or SIGTERM sets the event (the build stops at its next safe point); a second one
    stops at once. The previous handlers come back afterwards."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        typer.echo("stopping after the work in hand (Ctrl-C again to stop at once) ...", err=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop, received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stopped(report: Any, as_json: bool, signum: int) -> NoReturn:
    """What an interrupted build committed and how to finish it; exit 130 (SIGINT) or 143 (SIGTERM)."""
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    changed = {name: c for name, c in report.collections.items() if c.added or c.deleted or c.refreshed}
    counts = ", ".join(f"{name} {c.indexed} indexed ({c.added} new this run)" for name, c in changed.items())
    program = Path(sys.argv[0]).name
    command = ["python", sys.argv[0]] if program.endswith(".py") else [program]
    again = shlex.join([*command, *sys.argv[1:]])
    state = f"{counts} committed, not yet searchable" if counts else "nothing new committed"
    typer.echo(f"interrupted: {report.out}: {state}: rerun `{again}` to finish", err=True)
    raise SystemExit(128 + signum)


def index_info(
    folder: Annotated[Path, typer.Argument(help="Index folder.")] = Path("indexes/default"),
    as_json: Json = False,
) -> None:
    """Describe an index folder: model, counts, failures."""
    from retrieval.store.folder import Store

    with Store.open(folder) as store:
        info = store.describe()
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    fingerprint = info["model"].get("fingerprint", {}).get("digest", "")
    typer.echo(f"{folder}  generation {info['generation']}  model {fingerprint[:16]}")
    for name, c in info["collections"].items():
        typer.echo(
            f"  {name:<9} {c['indexed']} indexed, {c['skipped']} skipped, {c['failed']} failed "
            f"({c['shards']} files, table version {c['table_version']})"
        )
        if c["awaiting_index"]:
            searchable = f"{c['searchable']} searchable" if c["index"] else "not yet searchable"
            typer.echo(f"    committed, {searchable}: rerun `index build` to finish")
        if c["index"]:
            index = c["index"]
            tuned = f" {index['param']}={index['value']}" if index["param"] else ""
            why = f" ({index['reason']})" if index.get("reason") else ""
            typer.echo(
                f"    index {index['kind']}{tuned}{why}: recall@10 {index['recall_at_10']} vs exact "
                f"({index['queries']} queries), {index['latency_ms']} ms/query"
            )
        for f in c["failures"][:20]:
            typer.echo(f"    failed  {f['source']}: {f['reason']}")
        if len(c["failures"]) > 20:
            typer.echo(f"    ... {len(c['failures']) - 20} more (--json lists all)")


def index_verify(
    folder: Annotated[Path, typer.Argument(help="Index folder.")] = Path("indexes/default"),
    as_json: Json = False,
) -> None:
    """Check an index folder against its tables and catalog: files, rows, ids, vectors, FAISS ids, model.

    Exit 0 only when every check holds; otherwise each problem is listed and the exit code is 2.
    """
    from retrieval.build.verify import verify_index

    report = verify_index(folder)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for note in report.notes:
            typer.echo(f"note: {note}")
        for problem in report.problems:
            typer.echo(f"problem: {problem}", err=True)
        counts = ", ".join(
            f"{name} {c.live} live of {c.rows} rows in {c.files} files"
            for name, c in report.collections.items()
        )
        verdict = "ok" if report.ok else f"{len(report.problems)} problems"
        where = f"generation {report.generation}; {counts or 'empty'}"
        typer.echo(f"{folder}: {verdict} ({where}) in {report.seconds:.2f} s")
    if not report.ok:
        raise typer.Exit(2)


def index_vacuum(
    folder: Annotated[Path, typer.Argument(help="Index folder.")] = Path("indexes/default"),
    retain: Annotated[
        str,
        typer.Option("--retain", help="Keep every file a version younger than this needs (30m, 24h, 7d)."),
    ] = "24h",
    as_json: Json = False,
) -> None:
    """Delete the files no reader can still need: the only command that removes data files.

    Readers pin the table versions they opened; a vacuum keeps every file of a version younger
    than --retain, of the versions the FAISS indexes cover, and of builds in progress.
    """
    from retrieval.store.folder import Store

    hours = _hours(retain)
    with Store.open(folder, write=True) as store:
        removed = store.vacuum(retain_hours=hours)
    if as_json:
        typer.echo(json.dumps({"folder": str(folder), "retain_hours": hours, "removed": removed}, indent=2))
        return
    typer.echo(f"{folder}: {len(removed)} files removed (kept what versions younger than {retain} need)")


def index_migrate(
    folder: Annotated[Path, typer.Argument(help="Index folder of the earlier format (manifest.json).")],
    as_json: Json = False,
) -> None:
    """Convert an index folder of the earlier format to Delta tables and a catalog, in place."""
    from retrieval.store.migrate import migrate_folder

    report = migrate_folder(folder)
    if as_json:
        typer.echo(json.dumps(vars(report), indent=2))
        return
    if report.already:
        typer.echo(f"{folder}: already in the current format")
        return
    rows = ", ".join(f"{name} {n} rows" for name, n in report.rows.items()) or "no rows"
    kept = ", ".join(report.indexes_kept) or "none (the next `index build` builds them)"
    typer.echo(f"{folder}: migrated to Delta tables ({rows}); FAISS indexes kept: {kept}")


def _hours(text: str) -> float:
    from retrieval.errors import ConfigError

    units = {"m": 1 / 60, "h": 1.0, "d": 24.0}
    value, unit = text[:-1], text[-1:].lower()
    try:
        hours = float(value) * units[unit]
    except (KeyError, ValueError):
        raise ConfigError(f"--retain {text!r}: give a number and a unit, e.g. 30m, 24h or 7d") from None
    if hours < 0:
        raise ConfigError("--retain must not be negative")
    return hours
