"""Commands about the model: ``version``, ``model info``, ``classify`` and ``embed``."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Annotated, Any

import typer

from retrieval import __version__
from retrieval.cli.common import (
    CheckpointOpt,
    DeviceOpt,
    Json,
    ModelIndexOpt,
    PrecisionOpt,
    TextModelOpt,
    TrustOpt,
    VisionModelOpt,
    emit,
    model_paths,
    open_encoder,
)


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
    emit(data, as_json, list(data.items()))


def model_info(
    index: ModelIndexOpt = None,
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
    as_json: Json = False,
) -> None:
    """Load a checkpoint into its towers (strictly) and describe it."""
    paths = model_paths(checkpoint, text_model, vision_model, trust_checkpoint)
    with open_encoder(index, paths, "cpu") as encoder:
        description = describe(encoder)
    rows = [(k, v) for k, v in description.items() if not isinstance(v, dict)]
    rows.append(("fingerprint", description["fingerprint"]["digest"]))
    emit(description, as_json, rows)


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


def classify(
    images: Annotated[list[Path], typer.Argument(help="Images to classify.")],
    labels: Annotated[str | None, typer.Option("--labels", help="Comma-separated labels.")] = None,
    labels_file: Annotated[Path | None, typer.Option("--labels-file", help="A label per line.")] = None,
    template: Annotated[
        list[str] | None,
        typer.Option("--template", help="Prompt, {} is the label; repeatable (the prompts are averaged)."),
    ] = None,
    top: Annotated[int, typer.Option("--top", help="Labels shown per image.")] = 5,
    index: ModelIndexOpt = None,
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    as_json: Json = False,
) -> None:
    """Zero-shot classification: rank labels for each image, with softmax probabilities."""
    from retrieval.errors import ConfigError
    from retrieval.model.zeroshot import DEFAULT_TEMPLATE
    from retrieval.model.zeroshot import classify as zero_shot

    if (labels is None) == (labels_file is None):
        raise ConfigError("give --labels or --labels-file (one of them)")
    names = labels.split(",") if labels is not None else labels_file.read_text(encoding="utf-8").splitlines()  # type: ignore[union-attr]
    paths = model_paths(checkpoint, text_model, vision_model, trust_checkpoint)
    with open_encoder(index, paths, device) as encoder:
        ranked = zero_shot(encoder, images, names, tuple(template or [DEFAULT_TEMPLATE]))
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


def embed(
    modality: Annotated[str, typer.Argument(help="text or image.")],
    inputs: Annotated[list[str], typer.Argument(help="Texts, or image paths.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write vectors to FILE.npy or FILE.parquet.")
    ] = None,
    index: ModelIndexOpt = None,
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    as_json: Json = False,
) -> None:
    """Feature extraction: unit-norm vectors for texts or images, with the model's preprocessing."""
    from retrieval.errors import ConfigError
    from retrieval.model.export import write_vectors

    if modality not in ("text", "image"):
        raise ConfigError(f"modality must be text or image, got {modality!r}")
    paths = model_paths(checkpoint, text_model, vision_model, trust_checkpoint)
    with open_encoder(index, paths, device, precision) as encoder:
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
