"""``Retriever``: search an index folder by text, image, vector or id, from a pipeline or the CLI.

Everything heavy loads on first use and is kept: the model (the one the index was built with,
checked by fingerprint), each collection's FAISS index (checked by sha256), and the rows that
results carry. Scores are cosine similarities. ``allow_ids`` restricts a search inside FAISS (an
``IDSelector``), so ``k`` results come back even when the allowed set is small.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa

from retrieval.encoder import Encoder, ImageInput, ModelSpec
from retrieval.errors import ConfigError, IndexMismatchError, StoreError
from retrieval.index import IndexRecord, SearchIndex, load_index
from retrieval.store import Manifest, Store

__all__ = ["Hit", "Retriever", "Target", "parse_where"]

Target = Literal["images", "captions"]
# FAISS switches exact search to BLAS only from this many queries (500 at d=256 by default);
# batched queries from a pipeline are usually fewer, and BLAS is several times faster for them.
_BLAS_THRESHOLD = 16
_ROW_COLUMNS = {
    "images": ["id", "path", "sha256", "size", "width", "height", "flags"],
    "captions": ["id", "text", "source", "row", "image", "flags", "metadata"],
}


@dataclass(frozen=True)
class Hit:
    """One result: rank (from 1), id, cosine score, and the row's fields."""

    rank: int
    id: int
    score: float
    collection: str
    path: str | None = None  # images: absolute path
    text: str | None = None  # captions
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "id": self.id, "score": round(self.score, 6)}
        out |= {"path": self.path} if self.path is not None else {"text": self.text}
        return out | self.fields


@dataclass
class _Rows:
    ids: np.ndarray  # sorted ids
    table: pa.Table  # rows in the order of ``ids``


class Retriever:
    """Searches one index folder. Use ``Retriever.open(folder)``; close it (or use ``with``)."""

    def __init__(
        self, store: Store, *, device: str = "auto", precision: str = "auto", encoder: Encoder | None = None
    ):
        if store.manifest is None:
            raise StoreError(f"{store.folder} has no committed state")
        self.store = store
        self.manifest: Manifest = store.manifest
        self.device = device
        self.precision = precision
        self._encoder = encoder
        self._indexes: dict[str, SearchIndex] = {}
        self._rows: dict[str, _Rows] = {}
        faiss.cvar.distance_compute_blas_threshold = min(
            faiss.cvar.distance_compute_blas_threshold, _BLAS_THRESHOLD
        )

    @classmethod
    def open(
        cls,
        folder: str | Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        encoder: Encoder | None = None,
    ) -> Retriever:
        return cls(Store.open(folder), device=device, precision=precision, encoder=encoder)

    # -- resources (lazy) ------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        """The model the index was built with, loaded on first use."""
        if self._encoder is None:
            model = self.manifest.model
            spec = ModelSpec(
                Path(model["checkpoint"]), Path(model["text_model"]), Path(model["vision_model"])
            )
            self._encoder = Encoder.load(spec, device=self.device, precision=self.precision)
        fingerprint = self._encoder.fingerprint
        if fingerprint is None or fingerprint.digest != self.manifest.fingerprint:
            raise IndexMismatchError(
                f"{self.store.folder} was built with another model than the one loaded "
                "(checkpoint or tower folders changed since)"
            )
        return self._encoder

    def index(self, target: Target) -> SearchIndex:
        if target not in self._indexes:
            state = self.store.state(target)
            if state.index is None:
                raise StoreError(f"{self.store.folder} has no {target} index (build it with `index build`)")
            self._indexes[target] = load_index(self.store, IndexRecord.from_dict(state.index))
        return self._indexes[target]

    def rows(self, target: Target) -> _Rows:
        if target not in self._rows:
            deleted = self.store.deleted_ids(target)
            tables = [t for _, t in self.store.iter_shards(target, _ROW_COLUMNS[target])]
            if not tables:
                raise StoreError(f"{self.store.folder} has no {target}")
            table = pa.concat_tables(tables)
            table = table.filter(pa.array(~np.isin(table.column("id").to_numpy(), deleted))).sort_by("id")
            table = table.combine_chunks()  # one chunk: a take of k rows stays a few microseconds
            self._rows[target] = _Rows(table.column("id").to_numpy(), table)
        return self._rows[target]

    # -- encoding ----------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, D), unit norm, with the index's model."""
        return self.encoder.encode_texts(texts)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self.encoder.encode_images(images)

    # -- search ------------------------------------------------------------------------------------

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 10,
        target: Target = "images",
        allow_ids: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Query vectors (n, D) -> ids (n, k) int64 and scores (n, k) float32; -1 pads missing hits."""
        if k < 1:
            raise ConfigError("k must be at least 1")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        dim = int(self.manifest.model["fingerprint"]["dim"])
        if vectors.ndim != 2 or vectors.shape[1] != dim or not np.all(np.isfinite(vectors)):
            raise ConfigError(f"query vectors must be finite float32 (n, {dim}), got {vectors.shape}")
        allow = None if allow_ids is None else np.asarray(allow_ids, dtype=np.int64)
        return self.index(_target(target)).search(vectors, k, allow)

    def search_texts(
        self,
        texts: Sequence[str],
        k: int = 100,
        target: Target = "images",
        allow_ids: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.search_vectors(self.encode_texts(texts), k, target, allow_ids)

    def search_images(
        self,
        images: Sequence[ImageInput],
        k: int = 100,
        target: Target = "captions",
        allow_ids: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.search_vectors(self.encode_images(images), k, target, allow_ids)

    def search_text(
        self,
        text: str,
        k: int = 10,
        target: Target = "images",
        allow_ids: Sequence[int] | np.ndarray | None = None,
    ) -> list[Hit]:
        ids, scores = self.search_texts([text], k, target, allow_ids)
        return self.hits(ids[0], scores[0], target)

    def search_image(
        self,
        image: ImageInput,
        k: int = 10,
        target: Target = "captions",
        allow_ids: Sequence[int] | np.ndarray | None = None,
    ) -> list[Hit]:
        ids, scores = self.search_images([image], k, target, allow_ids)
        return self.hits(ids[0], scores[0], target)

    def hits(self, ids: np.ndarray, scores: np.ndarray, target: Target) -> list[Hit]:
        """One row of a search result -> ``Hit``s with the rows' fields (padding dropped)."""
        rows = self.rows(target)
        valid = ids >= 0
        positions = np.searchsorted(rows.ids, ids[valid])
        records = rows.table.take(pa.array(positions)).to_pylist()
        root = self.store.state("images").root
        hits = []
        for rank, (record, score) in enumerate(zip(records, scores[valid], strict=True), start=1):
            record_id = int(record.pop("id"))
            if target == "images":
                path = str(Path(root) / record.pop("path")) if root else record.pop("path")
                hits.append(Hit(rank, record_id, float(score), target, path=path, fields=record))
            else:
                metadata = json.loads(record.pop("metadata") or "{}")
                hits.append(
                    Hit(
                        rank,
                        record_id,
                        float(score),
                        target,
                        text=record.pop("text"),
                        fields=record | metadata,
                    )
                )
        return hits

    def filter_ids(self, target: Target, where: Sequence[tuple[str, str, str]]) -> np.ndarray:
        """Ids whose fields match every ``(field, op, value)``; op is ``=`` (equal) or ``~`` (glob)."""
        rows = self.rows(target)
        records = rows.table.to_pylist()
        if target == "captions":
            records = [r | json.loads(r.get("metadata") or "{}") for r in records]
        known = set().union(*records) if records else set()
        for name, _, _ in where:
            if name not in known:
                raise ConfigError(
                    f"--where: no field {name!r} in {target} (fields: {', '.join(sorted(known))})"
                )
        keep = np.ones(len(records), dtype=bool)
        for i, record in enumerate(records):
            for name, op, value in where:
                text = "" if record.get(name) is None else str(record[name])
                if name not in record or not (
                    text == value if op == "=" else fnmatch.fnmatchcase(text, value)
                ):
                    keep[i] = False
                    break
        return rows.ids[keep]

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
        self._indexes.clear()
        self._rows.clear()
        self.store.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _target(target: str) -> Target:
    if target not in ("images", "captions"):
        raise ConfigError(f"target must be images or captions, got {target!r}")
    return target  # type: ignore[return-value]


def parse_where(expressions: Sequence[str]) -> list[tuple[str, str, str]]:
    """``FIELD=VALUE`` (equal) or ``FIELD~GLOB`` (shell pattern) -> ``(field, op, value)``."""
    parsed = []
    for expression in expressions:
        match = re.fullmatch(r"\s*([\w.-]+)\s*([=~])\s*(.*)", expression)
        if not match:
            raise ConfigError(f"--where {expression!r}: expected FIELD=VALUE or FIELD~PATTERN")
        parsed.append((match.group(1), match.group(2), match.group(3)))
    return parsed
