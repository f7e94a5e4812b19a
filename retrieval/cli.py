"""The command line: typer apps that parse, call one library function and format the result.

``retrieval`` holds every command; ``index`` and ``search`` are its two groups as console scripts
of their own. Library errors become one line on stderr and exit code 2 (the traceback only with
``--debug``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from retrieval import __version__
from retrieval.errors import RetrievalError

__all__ = ["app", "index_app", "main", "run", "search_app"]

EXIT_ERROR = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def _group(name: str, help_text: str) -> typer.Typer:
    return typer.Typer(
        name=name,
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )


app = _group("retrieval", "Multimodal retrieval with a BERT + ViT dual-encoder checkpoint.")
index_app = _group("index", "Build and inspect index folders.")
search_app = _group("search", "Search an index by text, image or vector.")
model_app = _group("model", "Inspect a model checkpoint and its towers.")
app.add_typer(index_app)
app.add_typer(search_app)
app.add_typer(model_app)

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
CheckpointOpt = Annotated[
    Path, typer.Option("--checkpoint", help="The seed-format checkpoint (.pt).", show_default=True)
]
TextModelOpt = Annotated[Path, typer.Option("--text-model", help="Folder of the BERT tower and tokenizer.")]
VisionModelOpt = Annotated[
    Path, typer.Option("--vision-model", help="Folder of the ViT tower and image processor.")
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


def _accept_debug(debug: Debug = False) -> None:
    """``--debug`` is read by ``run`` before parsing; declaring it here documents and accepts it."""


for _app in (app, index_app, search_app):
    _app.callback()(_accept_debug)


# -- output ------------------------------------------------------------------------------------


def _emit(data: Any, as_json: bool, rows: Sequence[tuple[str, Any]]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {'-' if value is None else value}")


# -- commands ----------------------------------------------------------------------------------


@app.command()
def version(as_json: Json = False) -> None:
    """Print the versions of the engine and the libraries it runs on."""
    import faiss
    import torch
    import transformers

    data = {
        "retrieval": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "faiss": faiss.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    _emit(data, as_json, list(data.items()))


@model_app.command("info")
def model_info(
    checkpoint: CheckpointOpt = Path("checkpoints/best_checkpoint.pt"),
    text_model: TextModelOpt = Path("models/bert-base-uncased"),
    vision_model: VisionModelOpt = Path("models/vit-base-patch16-224"),
    trust_checkpoint: TrustOpt = False,
    as_json: Json = False,
) -> None:
    """Load a checkpoint into its towers (strictly) and describe it."""
    from retrieval.encoder import Encoder, ModelSpec

    spec = ModelSpec(checkpoint, text_model, vision_model, trust_checkpoint=trust_checkpoint)
    with Encoder.load(spec, device="cpu") as encoder:
        description = describe(encoder)
    rows = [(k, v) for k, v in description.items() if not isinstance(v, dict)]
    rows.append(("fingerprint", description["fingerprint"]["digest"]))
    _emit(description, as_json, rows)


def describe(encoder: Any) -> dict[str, Any]:
    """A JSON-ready description of a loaded ``Encoder``."""
    model = encoder.model
    text, vision = model.text_encoder.config, model.visual_encoder.config
    source = encoder.source
    return {
        "checkpoint": str(source.path) if source else None,
        "sha256": source.sha256 if source else None,
        "epoch": source.epoch if source else None,
        "global_step": source.global_step if source else None,
        "best_loss": source.best_loss if source else None,
        "text_tower": f"{text.model_type} {text.num_hidden_layers}x{text.hidden_size}",
        "vision_tower": (
            f"{vision.model_type} {vision.num_hidden_layers}x{vision.hidden_size} "
            f"{vision.image_size}px/{vision.patch_size}"
        ),
        "dim": encoder.dim,
        "temperature": round(encoder.temperature, 6),
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_text_tokens": encoder.text_batcher.max_length,
        "image_size": f"{encoder.preprocess.height}x{encoder.preprocess.width}",
        "fingerprint": encoder.fingerprint.to_dict() if encoder.fingerprint else None,
    }


# -- index -------------------------------------------------------------------------------------


class _Bar:
    """tqdm progress for the library's ``Progress`` protocol (on stderr, rate and ETA)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, stage: str, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=f"encoding {stage}", unit=stage[:-1] if stage.endswith("s") else stage
            )

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@index_app.command("build")
def index_build(
    images: Annotated[Path | None, typer.Argument(help="Folder of images, walked recursively.")] = None,
    captions: Annotated[
        list[Path] | None,
        typer.Option("--captions", help="Caption file (.txt/.csv/.tsv/.jsonl/.parquet); repeatable."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Index folder.")] = Path("indexes/default"),
    checkpoint: CheckpointOpt = Path("checkpoints/best_checkpoint.pt"),
    text_model: TextModelOpt = Path("models/bert-base-uncased"),
    vision_model: VisionModelOpt = Path("models/vit-base-patch16-224"),
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per model batch.")] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Decoding processes (default: all cores but one, at least two)."),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    index_type: Annotated[
        str, typer.Option("--index-type", help="flat, ivf, hnsw, ivfpq or auto (by size and memory budget).")
    ] = "auto",
    target_recall: Annotated[
        float, typer.Option("--target-recall", help="Recall@10 against exact search the index is tuned to.")
    ] = 0.95,
    memory_budget: Annotated[
        float | None,
        typer.Option("--memory-budget", help="GB the index may take (auto picks IVF-PQ above it)."),
    ] = None,
    shard_rows: Annotated[
        int, typer.Option("--shard-rows", help="Images per shard (captions: 4x); a crash redoes one shard.")
    ] = 4096,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Start the index over (needed to change model).")
    ] = False,
    trust_checkpoint: TrustOpt = False,
    as_json: Json = False,
) -> None:
    """Encode an image folder and caption files into the index folder (incremental, resumable)."""
    from retrieval.encoder import ModelSpec
    from retrieval.index import IndexConfig
    from retrieval.indexer import BuildConfig, build_index

    config = BuildConfig(
        out=out,
        images=images,
        captions=tuple(captions or ()),
        model=ModelSpec(checkpoint, text_model, vision_model, trust_checkpoint=trust_checkpoint),
        device=device,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        rebuild=rebuild,
        image_shard_rows=shard_rows,
        caption_shard_rows=4 * shard_rows,
        index=IndexConfig(
            kind=index_type,  # type: ignore[arg-type]
            target_recall=target_recall,
            memory_budget=int(memory_budget * 1e9) if memory_budget else None,
        ),
    )
    report = build_index(
        config, progress=_Bar(enabled=(not as_json and sys.stderr.isatty()) or _force_bars())
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    parts = []
    for name, c in report.collections.items():
        rate = f", {c.encoded / c.seconds:.1f}/s encoded" if c.encoded and c.seconds > 0 else ""
        parts.append(
            f"{name}: {c.indexed} indexed ({c.added} new: {c.encoded} encoded, {c.reused} reused; "
            f"{c.deleted} removed), {c.skipped} skipped, {c.failed} failed{rate}"
        )
    for name, record in report.indexes.items():
        tuned = f", {record.param}={record.value}" if record.param else ""
        parts.append(
            f"{name} index {record.kind}{tuned}: recall@10 {record.recall_at_10:.3f} vs exact "
            f"({record.queries} queries), {record.latency_ms:.2f} ms/query"
        )
    typer.echo(f"{out}: " + "; ".join(parts) + f" in {report.seconds:.1f} s")


def _force_bars() -> bool:
    return os.environ.get("RETRIEVAL_PROGRESS") == "1"


@index_app.command("info")
def index_info(
    folder: Annotated[Path, typer.Argument(help="Index folder.")] = Path("indexes/default"),
    as_json: Json = False,
) -> None:
    """Describe an index folder: model, counts, failures."""
    from retrieval.store import Store

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
            f"({c['shards']} shards, {c['deleted']} deleted rows)"
        )
        if c["index"]:
            index = c["index"]
            tuned = f" {index['param']}={index['value']}" if index["param"] else ""
            typer.echo(
                f"    index {index['kind']}{tuned}: recall@10 {index['recall_at_10']} vs exact "
                f"({index['queries']} queries), {index['latency_ms']} ms/query"
            )
        for f in c["failures"][:20]:
            typer.echo(f"    failed  {f['source']}: {f['reason']}")
        if len(c["failures"]) > 20:
            typer.echo(f"    ... {len(c['failures']) - 20} more (--json lists all)")


# -- search ------------------------------------------------------------------------------------

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


@search_app.command("text")
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


@search_app.command("image")
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


# -- classify and embed -------------------------------------------------------------------------


@app.command()
def classify(
    images: Annotated[list[Path], typer.Argument(help="Images to classify.")],
    labels: Annotated[str | None, typer.Option("--labels", help="Comma-separated labels.")] = None,
    labels_file: Annotated[Path | None, typer.Option("--labels-file", help="A label per line.")] = None,
    template: Annotated[
        str, typer.Option("--template", help="Prompt; {} is the label.")
    ] = "a photo of a {}.",
    top: Annotated[int, typer.Option("--top", help="Labels shown per image.")] = 5,
    checkpoint: CheckpointOpt = Path("checkpoints/best_checkpoint.pt"),
    text_model: TextModelOpt = Path("models/bert-base-uncased"),
    vision_model: VisionModelOpt = Path("models/vit-base-patch16-224"),
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: Json = False,
) -> None:
    """Zero-shot classification: rank labels for each image, with softmax probabilities."""
    from retrieval.encoder import Encoder, ModelSpec
    from retrieval.errors import ConfigError
    from retrieval.zeroshot import classify as zero_shot

    if (labels is None) == (labels_file is None):
        raise ConfigError("give --labels or --labels-file (one of them)")
    names = labels.split(",") if labels is not None else labels_file.read_text(encoding="utf-8").splitlines()  # type: ignore[union-attr]
    spec = ModelSpec(checkpoint, text_model, vision_model, trust_checkpoint=trust_checkpoint)
    with Encoder.load(spec, device=device) as encoder:
        ranked = zero_shot(encoder, images, names, template)
    result = [
        {"image": str(path), "labels": [vars(s) for s in scores[:top]]}
        for path, scores in zip(images, ranked, strict=True)
    ]
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for path, scores in zip(images, ranked, strict=True):
        typer.echo(str(path))
        for score in scores[:top]:
            typer.echo(f"  {score.probability:6.1%}  {score.label}  (cosine {score.score:.3f})")


@app.command()
def embed(
    modality: Annotated[str, typer.Argument(help="text or image.")],
    inputs: Annotated[list[str], typer.Argument(help="Texts, or image paths.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write vectors to FILE.npy or FILE.parquet.")
    ] = None,
    checkpoint: CheckpointOpt = Path("checkpoints/best_checkpoint.pt"),
    text_model: TextModelOpt = Path("models/bert-base-uncased"),
    vision_model: VisionModelOpt = Path("models/vit-base-patch16-224"),
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    as_json: Json = False,
) -> None:
    """Feature extraction: unit-norm vectors for texts or images, with the model's preprocessing."""
    from retrieval.embed import write_vectors
    from retrieval.encoder import Encoder, ModelSpec
    from retrieval.errors import ConfigError

    if modality not in ("text", "image"):
        raise ConfigError(f"modality must be text or image, got {modality!r}")
    spec = ModelSpec(checkpoint, text_model, vision_model, trust_checkpoint=trust_checkpoint)
    with Encoder.load(spec, device=device, precision=precision) as encoder:
        vectors = encoder.encode_texts(inputs) if modality == "text" else encoder.encode_images(inputs)
        digest = encoder.fingerprint.digest if encoder.fingerprint else ""
    if out is not None:
        write_vectors(out, inputs, vectors, "text" if modality == "text" else "path", digest)
    if as_json:
        key = "text" if modality == "text" else "path"
        typer.echo(
            json.dumps([{key: i, "embedding": v.tolist()} for i, v in zip(inputs, vectors, strict=True)])
        )
    elif out is not None:
        typer.echo(f"{len(inputs)} vectors of dimension {vectors.shape[1]} -> {out}")
    else:
        for item, vector in zip(inputs, vectors, strict=True):
            typer.echo(f"{item}: [{', '.join(f'{x:.4f}' for x in vector[:6])}, ...] ({len(vector)} dims)")


# -- entry points ------------------------------------------------------------------------------


def run(typer_app: typer.Typer, argv: Sequence[str] | None = None) -> None:
    """Run ``typer_app``, turning errors into one line and an exit code (unless ``--debug``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # towers load from local folders only
    if not debug:
        import transformers

        transformers.logging.set_verbosity_error()
    try:
        typer_app(args=args, prog_name=typer_app.info.name, standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        if debug:
            raise
        if isinstance(e, RetrievalError | OSError):
            typer.echo(f"error: {e}", err=True)
            raise SystemExit(EXIT_ERROR) from None
        typer.echo(
            f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True
        )
        raise SystemExit(EXIT_INTERNAL) from None


def main() -> None:
    """Console script ``retrieval``."""
    run(app)
