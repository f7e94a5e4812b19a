"""Search results as ``Hit``s: the row's fields beside the score, built-in fields never shadowed
by a caption file's own columns, and files of identical content folded into one result."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BUILT_IN_FIELDS", "Hit", "folded", "hits_of", "user_fields"]


@dataclass(frozen=True)
class Hit:
    """One result: rank (from 1), id, cosine score, the row's fields, and how unusual the score is
    (``confidence``: the fraction of random pairs of the query's kind and the collection that
    score lower; None when unknown)."""

    rank: int
    id: int
    score: float
    collection: str
    path: str | None = None  # images: absolute path
    text: str | None = None  # captions
    fields: dict[str, Any] = field(default_factory=dict)
    confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "id": self.id, "score": round(self.score, 6)}
        if self.confidence is not None:
            out["confidence"] = round(self.confidence, 9)
        out |= {"path": self.path} if self.path is not None else {"text": self.text}
        return out | self.fields


# Fields every caption hit has; a caption file's own column of one of these names is shown (and
# filtered) as ``meta.<name>`` instead, so it never hides the built-in value.
BUILT_IN_FIELDS = frozenset(
    {"rank", "id", "score", "collection", "path", "text", "source", "row", "image", "sha256", "size"}
    | {"mtime_ns", "width", "height", "flags", "metadata", "identical", "confidence", "near_duplicates"}
)


def user_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    """A caption row's own columns, renamed ``meta.<name>`` where they collide with built-in fields."""
    return {(f"meta.{k}" if k in BUILT_IN_FIELDS else k): v for k, v in metadata.items()}


def folded(hits: list[Hit]) -> list[Hit]:
    """Hits of identical content (same sha256) as one, the best; the others in its ``identical``."""
    groups: dict[str, list[Hit]] = {}
    for hit in hits:
        groups.setdefault(str(hit.fields.get("sha256", hit.id)), []).append(hit)
    folded = []
    for rank, (best, *rest) in enumerate(groups.values(), start=1):
        same = [h.path if h.path is not None else h.id for h in rest]
        fields = best.fields | ({"identical": same} if same else {})
        folded.append(dataclasses.replace(best, rank=rank, fields=fields))
    return folded


def hits_of(
    records: list[dict[str, Any]],
    scores: Sequence[float] | np.ndarray,
    collection: str,
    root: str | None,
    confidences: np.ndarray | None = None,
) -> list[Hit]:
    """Rows as a search reads them (``id`` and the result columns), in rank order, with their
    scores and confidences -> ``Hit``s: image paths joined to ``root``, a caption's own columns
    beside the built-in ones."""
    hits = []
    for rank, record in enumerate(records, start=1):
        record_id, score = int(record.pop("id")), float(scores[rank - 1])
        sure = None if confidences is None else float(confidences[rank - 1])
        if collection == "images":
            path = str(Path(root) / record.pop("path")) if root else record.pop("path")
            hits.append(Hit(rank, record_id, score, collection, path=path, fields=record, confidence=sure))
        else:
            metadata = user_fields(json.loads(record.pop("metadata") or "{}"))
            text = record.pop("text")
            fields = record | metadata
            hits.append(Hit(rank, record_id, score, collection, text=text, fields=fields, confidence=sure))
    return hits
