"""What an index recorded of its random pairs, for the confidence of search results, and the
one-line reason when a search has none to measure against."""

from __future__ import annotations

from pathlib import Path

from retrieval.ann.calibration import ScoreNull, readable
from retrieval.store.manifest import IndexRecord, Manifest

__all__ = ["null_of", "uncalibrated"]


def null_of(record: IndexRecord | None, queries: str) -> ScoreNull | None:
    """The null of ``queries``-like vectors against the index ``record`` serves (None: none
    recorded, or of another format)."""
    data = (record.calibration or {}).get(queries) if record is not None else None
    return ScoreNull.from_dict(data) if data is not None and readable(data) else None


def uncalibrated(folder: Path, manifest: Manifest, target: str, queries: str | None) -> str:
    """Why a search of ``queries``-like vectors (None: of no one kind) on ``target`` has no
    confidence."""
    if queries is None:
        return (
            "this query (a bare vector, or parts of both texts and images) has no random pairs of "
            "its own to measure its scores against: give a text, an image, or parts of one kind"
        )
    if queries not in manifest.collections:
        kind = "text" if queries == "captions" else "image"
        hint = ": index captions with the images (index build --captions ...)" if kind == "text" else ""
        return f"{folder} has no {queries} to measure {kind} queries on {target} against{hint}"
    return f"{folder}: no score calibration for {queries} queries on {target}: rerun `index build`"
