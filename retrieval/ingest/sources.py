"""Finding inputs: image folders walked safely, caption files read row by row.

Every input becomes either a record to index or an ``Outcome`` that says why it was skipped or
failed: nothing is dropped silently.

The image walk is deterministic (sorted names), stays inside the root (a symlink may point
anywhere inside it, never outside), visits each directory once (no cycles) and yields only
regular files, so a FIFO named ``x.jpg`` cannot hang it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from retrieval.errors import InputError
from retrieval.outcomes import Outcome, Reason

__all__ = [
    "CAPTION_FORMATS",
    "IMAGE_EXTENSIONS",
    "CaptionRecord",
    "ImageFile",
    "SidecarFile",
    "read_caption_file",
    "read_sidecar",
    "walk_images",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_FORMATS = frozenset({".txt", ".csv", ".tsv", ".jsonl", ".parquet"})
_TEXT_COLUMNS = ("caption", "text")
_IMAGE_COLUMNS = ("image", "path", "file", "filename")


@dataclass(frozen=True)
class ImageFile:
    """A regular image file under the root: its path relative to the root (POSIX) and stats."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SidecarFile:
    """``<stem>.txt`` beside an image: that image's caption file."""

    path: str
    image: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class CaptionRecord:
    """One caption: where it came from (file and row), its text and the row's other columns."""

    source: str
    row: int
    text: str
    image: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def walk_images(root: Path) -> Iterator[ImageFile | SidecarFile | Outcome]:
    """Image files under ``root`` in sorted order, their sidecar captions, and outcomes for
    what cannot be walked."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist or is not a folder")
    real_root = root.resolve()
    seen: set[tuple[int, int]] = set()
    yield from _walk(real_root, real_root, "", seen)


def _walk(
    real_root: Path, folder: Path, prefix: str, seen: set[tuple[int, int]]
) -> Iterator[ImageFile | SidecarFile | Outcome]:
    try:
        info = folder.stat()
        key = (info.st_dev, info.st_ino)
        if key in seen:
            where = prefix.rstrip("/") or "."
            yield Outcome(
                where, "skipped", "walk", "folder already visited (symlink cycle)", Reason.LINK_LOOP
            )
            return
        seen.add(key)
        names = sorted(os.listdir(folder))
    except OSError as e:
        where = prefix.rstrip("/") or "."
        yield Outcome(where, "failed", "walk", f"cannot list folder: {e.strerror or e}", Reason.CANNOT_LIST)
        return
    # A sidecar pairs with the first image (in name order) that shares its stem.
    stems: dict[str, str] = {}
    for name in names:
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
            stems.setdefault(Path(name).stem, prefix + name)
    for name in names:
        rel = prefix + name
        path = folder / name
        if not _utf8(name):
            # Parquet and JSON need UTF-8: such a name could be stored only by renaming it.
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS or path.is_dir():
                shown = rel.encode("utf-8", "replace").decode()
                yield Outcome(shown, "skipped", "walk", "name is not valid UTF-8", Reason.BAD_NAME)
            continue
        suffix = Path(name).suffix.lower()
        try:
            is_link = path.is_symlink()
            target = path.resolve(strict=True) if is_link else path
            if is_link and not target.is_relative_to(real_root):
                if suffix in IMAGE_EXTENSIONS or target.is_dir():
                    yield Outcome(
                        rel, "skipped", "walk", "symlink points outside the root", Reason.OUTSIDE_ROOT
                    )
                continue
            info = target.stat()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop on older Pythons
            if suffix in IMAGE_EXTENSIONS or path.is_symlink():
                if path.is_symlink():
                    yield Outcome(rel, "skipped", "walk", "broken symlink or symlink loop", Reason.LINK_LOOP)
                else:
                    yield Outcome(rel, "skipped", "walk", f"cannot stat: {e}", Reason.UNREADABLE)
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _walk(real_root, target, rel + "/", seen)
        elif suffix in IMAGE_EXTENSIONS:
            if stat.S_ISREG(info.st_mode):
                yield ImageFile(rel, info.st_size, info.st_mtime_ns)
            else:
                yield Outcome(rel, "skipped", "walk", "not a regular file", Reason.NOT_A_FILE)
        elif suffix == ".txt" and Path(name).stem in stems and stat.S_ISREG(info.st_mode):
            yield SidecarFile(rel, stems[Path(name).stem], info.st_size, info.st_mtime_ns)


def read_sidecar(path: Path, source: str, image: str) -> Iterator[CaptionRecord | Outcome]:
    """An image's ``<stem>.txt``: one caption per non-empty line, each paired with the image.

    COCO-style data keeps several captions per image (five, or one per language), one a line.
    ``row`` is the line's number from 0, so blank lines between captions keep the others' rows.
    A line that is not valid UTF-8 fails on its own; a file with no text is one skipped outcome.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        yield Outcome(source, "failed", "read", f"cannot read: {e.strerror or e}", Reason.UNREADABLE)
        return
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    found = False
    for index, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        found = True
        if _has_bad_bytes(line):
            yield Outcome(
                f"{source}#{index}", "failed", "read", "caption is not valid UTF-8", Reason.BAD_TEXT
            )
        else:
            yield CaptionRecord(source, index, " ".join(line.split()), image=image)
    if not found:
        yield Outcome(source, "skipped", "read", "empty caption", Reason.EMPTY)


def read_caption_file(path: Path, source: str | None = None) -> Iterator[CaptionRecord | Outcome]:
    """Captions of a ``.txt`` (a line each), ``.csv``/``.tsv``/``.jsonl``/``.parquet`` file.

    Table formats need a ``caption`` or ``text`` column; an ``image`` (or ``path``/``file``)
    column pairs a caption with an image; all other columns are kept as metadata. A row that is
    empty or not valid UTF-8 becomes an ``Outcome``; a file that cannot be read raises
    ``InputError``. ``row`` counts from 0 over data rows (lines for ``.txt``).
    """
    path = Path(path)
    source = source or str(path)
    suffix = path.suffix.lower()
    if suffix not in CAPTION_FORMATS:
        raise InputError(
            f"{path}: unsupported caption format {suffix!r} (use {', '.join(sorted(CAPTION_FORMATS))})"
        )
    if suffix == ".parquet":
        yield from _parquet_rows(path, source)
        return
    try:
        handle = path.open("rb")
    except OSError as e:
        raise InputError(f"cannot read caption file {path}: {e.strerror or e}") from e
    # Read as a stream, a line at a time: memory holds one row, whatever the file's size.
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file.
    with io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="") as text:
        if suffix == ".txt":
            rows: Iterator[dict[str, Any]] = ({"caption": line} for line in _lines(text))
        elif suffix == ".jsonl":
            rows = _jsonl_rows(_lines(text), path)
        else:
            rows = _csv_rows(text, "\t" if suffix == ".tsv" else ",", path)
        try:
            for index, row in enumerate(rows):
                yield _record(row, source, index)
        except OSError as e:
            raise InputError(f"cannot read caption file {path}: {e.strerror or e}") from e


def _lines(text: io.TextIOBase) -> Iterator[str]:
    """Lines without their ending, split as ``str.splitlines`` splits them (so a lone ``\\r`` or a
    Unicode line separator also ends a line)."""
    carry = ""
    for chunk in text:
        parts = (carry + chunk).splitlines(keepends=True)
        carry = parts.pop() if parts and not parts[-1].endswith(("\n", "\r")) else ""
        for part in parts:
            yield part.splitlines()[0] if part.splitlines() else ""
    if carry:
        yield from carry.splitlines() or [""]


def _csv_rows(text: io.TextIOBase, delimiter: str, path: Path) -> Iterator[dict[str, Any]]:
    reader = csv.DictReader(text, delimiter=delimiter)
    try:
        _require_text_column(reader.fieldnames or [], path)
        for row in reader:
            yield {k: v for k, v in row.items() if k is not None}
    except csv.Error as e:  # e.g. a field over the csv module's size limit
        yield {"__error__": f"line {reader.line_num}: unreadable CSV ({e}); the rest of the file is not read"}


def _jsonl_rows(lines: Iterator[str], path: Path) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield {"__error__": f"line {number}: invalid JSON ({e.msg})"}
            continue
        yield value if isinstance(value, dict) else {"__error__": f"line {number}: not a JSON object"}


def _parquet_rows(path: Path, source: str) -> Iterator[CaptionRecord | Outcome]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"cannot read caption file {path}: {e}") from e
    _require_text_column(parquet.schema_arrow.names, path)
    index = 0
    for batch in parquet.iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            yield _record(row, source, index)
            index += 1


def _require_text_column(columns: Sequence[str], path: Path) -> None:
    if not any(c in columns for c in _TEXT_COLUMNS):
        raise InputError(f"{path}: no 'caption' or 'text' column (columns: {', '.join(map(str, columns))})")


def _record(row: dict[str, Any], source: str, index: int) -> CaptionRecord | Outcome:
    where = f"{source}#{index}"
    if "__error__" in row:
        return Outcome(where, "failed", "read", row["__error__"], Reason.BAD_TEXT)
    column = next((c for c in _TEXT_COLUMNS if c in row), None)
    value = row.get(column) if column else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return Outcome(where, "skipped", "read", "empty caption", Reason.EMPTY)
    text = str(value)
    if _has_bad_bytes(text):
        return Outcome(where, "failed", "read", "caption is not valid UTF-8", Reason.BAD_TEXT)
    image_column = next((c for c in _IMAGE_COLUMNS if c in row), None)
    metadata = {k: v for k, v in row.items() if k != column and k != image_column}
    bad_meta = [k for k, v in metadata.items() if isinstance(v, str) and _has_bad_bytes(v)]
    for key in bad_meta:  # a damaged metadata field is dropped, the caption still counts
        metadata[key] = None
    image = str(row[image_column]) if image_column and row[image_column] else None
    if image is not None and _has_bad_bytes(image):
        return Outcome(where, "failed", "read", "image name is not valid UTF-8", Reason.BAD_TEXT)
    metadata = {k: v for k, v in metadata.items() if isinstance(k, str) and _utf8(k)}
    return CaptionRecord(source, index, " ".join(text.split()), image=image, metadata=metadata)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _has_bad_bytes(text: str) -> bool:
    return not _utf8(text)
