"""Image-caption pairs for evaluation and training, read from a caption file with an image column.

A pairs file is a caption file (``.csv``/``.tsv``/``.jsonl``/``.parquet``) whose rows name an
``image`` (or ``path``/``file``/``filename``) next to the ``caption`` (or ``text``); an image may
have several rows. Relative image paths are taken from ``images_root`` (by default the pairs
file's folder). Rows that cannot be used are kept as ``Outcome``s with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import ConfigError, InputError
from retrieval.ingest.sources import CaptionRecord, ImageFile, read_caption_file
from retrieval.outcomes import Outcome, Reason

__all__ = ["Pair", "PairSet", "read_pairs"]


@dataclass(frozen=True)
class Pair:
    """One usable row: an image (relative to the set's root, or absolute) and its caption."""

    image: str
    caption: str
    label: str | None = None
    row: int = 0


@dataclass(frozen=True)
class PairSet:
    """The usable pairs of a file, in file order, and what happened to the other rows."""

    source: Path
    root: Path
    pairs: tuple[Pair, ...]
    outcomes: tuple[Outcome, ...]

    def path(self, image: str) -> Path:
        return self.root / image

    @property
    def images(self) -> list[str]:
        """The distinct images, in order of first appearance."""
        return list(dict.fromkeys(p.image for p in self.pairs))

    def image_files(self) -> tuple[list[ImageFile], list[Outcome]]:
        """The distinct images that exist (with their size and mtime), and an outcome for the rest."""
        files, missing = [], []
        for image in self.images:
            try:
                stat = self.path(image).stat()
            except OSError as e:
                missing.append(
                    Outcome(image, "failed", "read", f"cannot read: {e.strerror or e}", Reason.UNREADABLE)
                )
                continue
            files.append(ImageFile(image, stat.st_size, stat.st_mtime_ns))
        return files, missing


def read_pairs(path: Path, *, images_root: Path | None = None, labels_column: str | None = None) -> PairSet:
    """Read a pairs file; ``labels_column`` names a column that holds each image's class label."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs file {path} does not exist")
    root = Path(images_root) if images_root is not None else path.parent
    pairs: list[Pair] = []
    outcomes: list[Outcome] = []
    seen_columns: set[str] = set()
    for item in _rows(path):
        if isinstance(item, Outcome):
            outcomes.append(item)
            continue
        seen_columns.update(item.metadata)
        where = f"{item.source}#{item.row}"
        if item.image is None:
            outcomes.append(Outcome(where, "skipped", "pairs", "no image named in this row", Reason.NO_IMAGE))
            continue
        label = None
        if labels_column is not None:
            value = item.metadata.get(labels_column)
            label = str(value).strip() if value is not None and str(value).strip() else None
        pairs.append(Pair(_normal(item.image), item.text, label, item.row))
    if labels_column is not None and pairs and labels_column not in seen_columns:
        raise ConfigError(
            f"{path}: no column {labels_column!r} for --labels-column "
            f"(columns besides caption and image: {', '.join(sorted(seen_columns)) or 'none'})"
        )
    if not pairs:
        raise InputError(f"{path}: no usable image-caption pairs ({len(outcomes)} rows skipped)")
    return PairSet(path, root, tuple(pairs), tuple(outcomes))


def _rows(path: Path) -> Iterator[CaptionRecord | Outcome]:
    if path.suffix.lower() == ".txt":
        raise InputError(f"{path}: a pairs file needs an image column (use .csv, .tsv, .jsonl or .parquet)")
    yield from read_caption_file(path)


def _normal(image: str) -> str:
    """A stable key for an image path: separators and ``./`` normalised, absolute kept absolute."""
    return Path(os.path.normpath(image.replace("\\", "/"))).as_posix()
