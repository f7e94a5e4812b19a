"""What an evaluation runs on: distinct images and texts, their vectors, links and candidates.

Two sources. ``from_pairs`` encodes a pairs file with a model, and its own images and captions are
the candidates. ``from_index`` reads vectors from an index folder (its pairs, or a pairs file
matched to its rows), and the candidates are the indexed collections, searched exactly from the
shards or through the FAISS indexes. Identical image files (same sha256) and identical caption
texts are one item with all of their ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.durable import file_sha256
from retrieval.errors import ConfigError, InputError
from retrieval.ingest.pairs import Pair, PairSet, read_pairs
from retrieval.model.encoder import Encoder
from retrieval.outcomes import Outcome, Reason
from retrieval.progress import Progress
from retrieval.store.location import ModelPaths

__all__ = ["Blocks", "EvalSet", "encode_image_files", "from_index", "from_pairs"]

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


@dataclass
class EvalSet:
    """Distinct images and texts, linked; candidates are ``(count, blocks of (ids, vectors))``."""

    image_vectors: np.ndarray  # (I, D)
    image_ids: list[np.ndarray]  # candidate ids of each image (several when the file is duplicated)
    image_labels: list[str | None]
    text_vectors: np.ndarray  # (T, D)
    text_ids: list[np.ndarray]  # candidate ids of each text (empty: a query only)
    links: np.ndarray  # (L, 2) int64 distinct (image, text)
    candidates: dict[str, tuple[int, Blocks]]  # "images" / "captions"
    encode_texts: Callable[[Sequence[str]], np.ndarray]
    model: dict[str, Any]
    pair_count: int
    skipped: list[Outcome] = field(default_factory=list)
    indexes: dict[str, Any] = field(default_factory=dict)  # "images" / "captions" -> SearchIndex
    close: Callable[[], None] = lambda: None


class _Builder:
    """Collects distinct images (by content) and texts, and the links between them."""

    def __init__(self) -> None:
        self.images: dict[str, int] = {}  # content key -> image
        self.texts: dict[str, int] = {}
        self.links: set[tuple[int, int]] = set()
        self.labels: list[str | None] = []
        self.pairs = 0

    def add(self, content: str, text: str, label: str | None) -> None:
        image = self.images.setdefault(content, len(self.images))
        if image == len(self.labels):
            self.labels.append(label)
        self.labels[image] = self.labels[image] or label
        self.links.add((image, self.texts.setdefault(text, len(self.texts))))
        self.pairs += 1

    def link_array(self, source: object) -> np.ndarray:
        if not self.links:
            raise InputError(f"{source}: no image-caption pair to evaluate")
        return np.array(sorted(self.links), dtype=np.int64)


# -- a pairs file and a model ---------------------------------------------------------------------


def from_pairs(
    path: Path,
    encoder: Encoder,
    progress: Progress,
    *,
    images_root: Path | None = None,
    labels_column: str | None = None,
    workers: int | None = None,
) -> EvalSet:
    pairs = read_pairs(path, images_root=images_root, labels_column=labels_column)
    paths, shas, vectors, failures = encode_image_files(encoder, pairs, workers, progress)
    sha_of = dict(zip(paths, shas, strict=True))
    first: dict[str, int] = {}  # sha -> row of ``vectors``
    for row, sha in enumerate(shas):
        first.setdefault(sha, row)
    built = _Builder()
    for pair in pairs.pairs:
        if pair.image in sha_of:
            built.add(sha_of[pair.image], pair.caption, pair.label)
    links = built.link_array(path)
    image_vectors = vectors[[first[sha] for sha in built.images]]
    text_vectors = encoder.encode_texts(list(built.texts))
    return EvalSet(
        image_vectors=image_vectors,
        image_ids=[np.array([i]) for i in range(len(image_vectors))],
        image_labels=built.labels,
        text_vectors=text_vectors,
        text_ids=[np.array([t]) for t in range(len(text_vectors))],
        links=links,
        candidates={
            "images": (len(image_vectors), _in_memory(image_vectors)),
            "captions": (len(text_vectors), _in_memory(text_vectors)),
        },
        encode_texts=encoder.encode_texts,
        model=_describe(encoder),
        pair_count=built.pairs,
        skipped=list(pairs.outcomes) + failures,
    )


def encode_image_files(
    encoder: Encoder, pairs: PairSet, workers: int | None, progress: Progress
) -> tuple[list[str], list[str], np.ndarray, list[Outcome]]:
    """Decode (in worker processes, as the indexer does) and encode the images of ``pairs``.

    Returns the readable paths, their sha256, their vectors (same order) and an ``Outcome`` for
    every file that could not be used.
    """
    import torch

    from retrieval.ingest.reader import default_workers, read_images

    files, failures = pairs.image_files()
    paths: list[str] = []
    shas: list[str] = []
    chunks: list[np.ndarray] = []
    batch: list[torch.Tensor] = []
    progress.start("images", len(files) + len(failures))
    progress.advance(len(failures))

    def flush() -> None:
        if batch:
            pixels = torch.cat(batch)
            chunks.append(encoder.encode_pixels(pixels.numpy()))
            progress.advance(len(pixels))
            batch.clear()

    for group in read_images(pairs.root, files, encoder.preprocess, workers=default_workers(workers)):
        failures.extend(outcome for _, outcome in group.failures)
        progress.advance(len(group.failures))
        for decoded in group.images:
            paths.append(files[decoded.index].path)
            shas.append(decoded.sha256)
        batch.append(group.pixels)
        if sum(len(b) for b in batch) >= encoder.image_batch_size:
            flush()
    flush()
    progress.finish()
    vectors = np.concatenate(chunks) if chunks else np.empty((0, encoder.dim), np.float32)
    return paths, shas, vectors, failures


def _in_memory(vectors: np.ndarray, block: int = 65536) -> Blocks:
    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(vectors), block):
            part = vectors[start : start + block]
            yield np.arange(start, start + len(part), dtype=np.int64), part

    return blocks


def _describe(encoder: Encoder) -> dict[str, Any]:
    source = encoder.source
    return {
        "checkpoint": str(source.path) if source else None,
        "epoch": source.epoch if source else None,
        "global_step": source.global_step if source else None,
        "fingerprint": encoder.fingerprint.digest if encoder.fingerprint else None,
    }


# -- an index folder ------------------------------------------------------------------------------


def from_index(
    folder: Path,
    progress: Progress,
    *,
    pairs_path: Path | None = None,
    images_root: Path | None = None,
    labels_column: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    encoder: Encoder | None = None,
    model: ModelPaths | None = None,
) -> EvalSet:
    """Pairs found in (or matched to) an index folder; the model loads only if a text must be encoded
    (the one the index recorded; ``model`` names files that moved)."""
    from retrieval.ann.faiss_index import live_vectors
    from retrieval.search.retriever import Retriever

    retriever = Retriever.open(folder, device=device, precision=precision, encoder=encoder, model=model)
    try:
        store = retriever.store
        images = retriever.rows("images").table.select(["id", "path", "sha256"]).to_pydict()
        root = Path(store.state("images").root or ".")
        by_path = dict(zip(images["path"], images["id"], strict=True))
        sha_of = dict(zip(images["id"], images["sha256"], strict=True))
        ids_of_sha: dict[str, list[int]] = {}
        for image_id, sha in sha_of.items():
            ids_of_sha.setdefault(sha, []).append(image_id)
        has_captions = bool(store.state("captions").shards)
        captions = (
            _caption_rows(retriever)
            if has_captions
            else {"id": [], "text": [], "image": [], "source": [], "metadata": []}
        )
        ids_of_text: dict[str, list[int]] = {}
        for caption_id, text in zip(captions["id"], captions["text"], strict=True):
            ids_of_text.setdefault(text, []).append(caption_id)

        if pairs_path is not None:
            pairs = read_pairs(pairs_path, images_root=images_root, labels_column=labels_column)
            wanted = [
                (p, _match_file(pairs.path(p.image), p.image, root, by_path, sha_of, ids_of_sha))
                for p in pairs.pairs
            ]
            skipped = list(pairs.outcomes)
        else:
            wanted, skipped = _stored_pairs(captions, root, by_path, labels_column)
        built = _Builder()
        for pair, image_id in wanted:
            if image_id is None:
                skipped.append(
                    Outcome(pair.image, "skipped", "match", "image is not in the index", Reason.NO_IMAGE)
                )
            else:
                built.add(sha_of[image_id], pair.caption, pair.label)
        links = built.link_array(pairs_path or folder)

        image_ids = [np.array(ids_of_sha[sha], dtype=np.int64) for sha in built.images]
        image_vectors = _vectors(live_vectors(store, "images"), [ids[0] for ids in image_ids])
        text_ids = [np.array(ids_of_text.get(text, []), dtype=np.int64) for text in built.texts]
        stored = [t for t, ids in enumerate(text_ids) if len(ids)]
        dim = image_vectors.shape[1]
        text_vectors = np.zeros((len(text_ids), dim), dtype=np.float32)
        if stored:
            text_vectors[stored] = _vectors(live_vectors(store, "captions"), [text_ids[t][0] for t in stored])
        fresh = [t for t, ids in enumerate(text_ids) if not len(ids)]
        if fresh:  # captions of a pairs file that the index does not hold: encoded as queries
            texts = list(built.texts)
            text_vectors[fresh] = retriever.encode_texts([texts[t] for t in fresh])

        candidates: dict[str, tuple[int, Blocks]] = {
            "images": (len(images["id"]), lambda: live_vectors(store, "images"))
        }
        indexes = {}
        if store.state("images").index:
            indexes["images"] = retriever.index("images")
        if has_captions and len(captions["id"]):
            candidates["captions"] = (len(captions["id"]), lambda: live_vectors(store, "captions"))
            if store.state("captions").index:
                indexes["captions"] = retriever.index("captions")
        recorded = store.manifest.model if store.manifest else {}
        return EvalSet(
            image_vectors=image_vectors,
            image_ids=image_ids,
            image_labels=built.labels,
            text_vectors=text_vectors,
            text_ids=text_ids,
            links=links,
            candidates=candidates,
            encode_texts=retriever.encode_texts,
            model={
                "checkpoint": recorded.get("absolute", {}).get("checkpoint", recorded.get("checkpoint")),
                "fingerprint": recorded.get("fingerprint", {}).get("digest"),
            },
            pair_count=built.pairs,
            skipped=skipped,
            indexes=indexes,
            close=retriever.close,
        )
    except BaseException:
        retriever.close()
        raise


def _caption_rows(retriever: Any) -> dict[str, list[Any]]:
    return retriever.rows("captions").table.select(["id", "text", "image", "source", "metadata"]).to_pydict()


def _match_file(
    path: Path,
    name: str,
    root: Path,
    by_path: dict[str, int],
    sha_of: dict[int, str],
    ids_of_sha: dict[str, list[int]],
) -> int | None:
    """The indexed row of an image file: by its path under the index's root, else by content."""
    try:
        relative = path.resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        relative = name
    if relative in by_path:
        return by_path[relative]
    try:
        sha = file_sha256(path)
    except OSError:
        return None
    return ids_of_sha[sha][0] if sha in ids_of_sha else None


def _stored_pairs(
    captions: dict[str, list[Any]], root: Path, by_path: dict[str, int], labels_column: str | None
) -> tuple[list[tuple[Pair, int | None]], list[Outcome]]:
    """The index's own pairs: caption rows that name an image (sidecars, caption files)."""
    wanted: list[tuple[Pair, int | None]] = []
    seen_columns: set[str] = set()
    for text, image, source, metadata in zip(
        captions["text"], captions["image"], captions["source"], captions["metadata"], strict=True
    ):
        if not image:
            continue
        fields = json.loads(metadata or "{}")
        seen_columns.update(fields)
        value = fields.get(labels_column) if labels_column else None
        label = str(value).strip() if value is not None and str(value).strip() else None
        image_id = by_path.get(image)
        if image_id is None:  # a caption file's path: relative to the file, or absolute
            candidate = Path(image) if Path(image).is_absolute() else Path(source).parent / image
            try:
                image_id = by_path.get(candidate.resolve().relative_to(root.resolve()).as_posix())
            except (ValueError, OSError):
                image_id = None
        wanted.append((Pair(image, text, label), image_id))
    if not wanted:
        raise InputError("the index holds no captions paired with images: give --pairs")
    if labels_column is not None and labels_column not in seen_columns:
        raise ConfigError(
            f"no caption column {labels_column!r} for --labels-column "
            f"(columns: {', '.join(sorted(seen_columns)) or 'none'})"
        )
    return wanted, []


def _vectors(blocks: Iterable[tuple[np.ndarray, np.ndarray]], wanted: Sequence[int]) -> np.ndarray:
    """The vectors of ``wanted`` ids, in that order, picked while streaming ``blocks``."""
    order = {int(i): k for k, i in enumerate(wanted)}
    keys = np.fromiter(order, dtype=np.int64, count=len(order))
    out: np.ndarray | None = None
    for ids, vectors in blocks:
        if out is None:
            out = np.zeros((len(wanted), vectors.shape[1]), dtype=np.float32)
        hit = np.isin(ids, keys)
        for i, vector in zip(ids[hit].tolist(), vectors[hit], strict=True):
            out[order[i]] = vector
    return out if out is not None else np.zeros((len(wanted), 0), dtype=np.float32)
