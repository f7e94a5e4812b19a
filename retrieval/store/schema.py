"""One schema per collection: the columns of its Delta table and the frozen row type that fills them.

The writer builds data files only through ``shard_table``, readers and ``index verify`` take their
column lists from here, and the README's description of the index folder follows these two
schemas. ``embedding`` is unit norm, D float32 values per row: on disk a ``list<float32>`` (Delta's
``array<float>``, which duckdb, polars and Spark read; Delta has no fixed-size list type), and
``fixed_size_list<float32>[D]`` once the store has read and checked it. The Parquet metadata of each
file names the schema version, the collection and the model fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval.store.manifest import SCHEMA_VERSION
from retrieval.vectors import check_vectors, embedding_array

__all__ = [
    "CAPTION_COLUMNS",
    "IMAGE_COLUMNS",
    "CaptionRow",
    "ImageRow",
    "Row",
    "file_metadata",
    "schema",
    "shard_table",
    "stored_embedding",
    "stored_table",
    "table_description",
]


@dataclass(frozen=True)
class ImageRow:
    """An image file as indexed (its id and vector travel beside it)."""

    path: str  # relative to the collection's root, POSIX
    sha256: str
    size: int
    mtime_ns: int
    width: int
    height: int
    flags: tuple[str, ...] = ()  # "reduced_on_load": decoded at a reduced DCT scale


@dataclass(frozen=True)
class CaptionRow:
    """A caption as indexed: its text, where it came from, the image it names, its own columns."""

    text: str
    source: str  # the caption file (absolute) or sidecar (relative to the image root)
    row: int  # data row (line) in the source, from 0
    image: str | None
    sha256: str  # of the text: identical captions share a vector
    size: int  # of the source file when read
    mtime_ns: int
    flags: tuple[str, ...] = ()  # "truncated": cut to the tokenizer's limit
    metadata: str = "{}"  # the source row's other columns, JSON with sorted keys

    @property
    def fields(self) -> dict[str, Any]:
        return json.loads(self.metadata)


Row = ImageRow | CaptionRow
_ROW_TYPES: dict[str, type[ImageRow] | type[CaptionRow]] = {"images": ImageRow, "captions": CaptionRow}
_ARROW: dict[str, pa.DataType] = {
    "path": pa.string(),
    "text": pa.string(),
    "source": pa.string(),
    "image": pa.string(),
    "sha256": pa.string(),
    "metadata": pa.string(),
    "row": pa.int64(),
    "size": pa.int64(),
    "mtime_ns": pa.int64(),
    "width": pa.int32(),
    "height": pa.int32(),
    "flags": pa.list_(pa.string()),
}
IMAGE_COLUMNS = ("id", *(f.name for f in dataclasses.fields(ImageRow)), "embedding")
CAPTION_COLUMNS = ("id", *(f.name for f in dataclasses.fields(CaptionRow)), "embedding")


def schema(collection: str, dim: int) -> pa.Schema:
    """The schema of ``collection``'s table (``dim``-wide vectors, stored as a list)."""
    row_type = _ROW_TYPES[collection]
    fields = [pa.field("id", pa.int64())]
    fields += [pa.field(f.name, _ARROW[f.name]) for f in dataclasses.fields(row_type)]
    fields.append(pa.field("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


def stored_embedding(fixed: pa.FixedSizeListArray) -> pa.ListArray:
    """Vectors as a table stores them: ``fixed_size_list<float32>[D]`` -> ``list<float32>``."""
    dim = fixed.type.list_size
    offsets = pa.array(np.arange(0, (len(fixed) + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, fixed.flatten())


def stored_table(table: pa.Table, collection: str, fingerprint: dict[str, Any]) -> pa.Table:
    """Rows read back (or from an older format) as a data file is written: this schema, the
    vectors as a list, this schema version's metadata."""
    column = stored_embedding(table.column("embedding").combine_chunks())
    table = table.set_column(table.schema.get_field_index("embedding"), "embedding", column)
    target = schema(collection, int(fingerprint["dim"]))
    return table.cast(target).replace_schema_metadata(file_metadata(collection, fingerprint))


def table_description(collection: str, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a collection's Delta table records as its description: schema version and model."""
    return {
        "schema_version": SCHEMA_VERSION,
        "collection": collection,
        "dim": int(fingerprint["dim"]),
        "fingerprint": fingerprint.get("digest"),
    }


def file_metadata(collection: str, fingerprint: dict[str, Any]) -> dict[bytes, bytes]:
    """What every shard's Parquet metadata carries: schema version, collection, model fingerprint."""
    return {
        b"retrieval.schema_version": str(SCHEMA_VERSION).encode(),
        b"retrieval.collection": collection.encode(),
        b"retrieval.fingerprint": json.dumps(fingerprint).encode(),
    }


def shard_table(
    collection: str,
    ids: Sequence[int] | np.ndarray,
    rows: Sequence[Row],
    vectors: np.ndarray,
    fingerprint: dict[str, Any],
) -> pa.Table:
    """Rows, their ids and vectors -> a shard table of ``collection``'s schema, metadata included.

    Refuses vectors that are not finite unit-norm float32 of the fingerprint's dimension.
    """
    dim = int(fingerprint["dim"])
    check_vectors(vectors, dim)
    target = schema(collection, dim)
    columns: dict[str, Any] = {"id": pa.array(np.asarray(ids, dtype=np.int64), pa.int64())}
    for f in dataclasses.fields(_ROW_TYPES[collection]):
        values = [getattr(r, f.name) for r in rows]
        if f.name == "flags":
            values = [list(v) for v in values]
        columns[f.name] = pa.array(values, _ARROW[f.name])
    columns["embedding"] = stored_embedding(embedding_array(vectors))
    return pa.table(columns, schema=target).replace_schema_metadata(file_metadata(collection, fingerprint))
