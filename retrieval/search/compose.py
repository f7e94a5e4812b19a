"""Queries made of several parts, and results with near-duplicates folded.

A composed query is the normalised weighted sum of its parts' vectors, the ``minus`` parts
subtracted: ``"a dog" + 2 x pool.jpg - "grass"``. Texts and images may be mixed; each is encoded
by the index's model, so the sum lives in the same space as the collection. Folding keeps the best
of every set of results within cosine T of each other, greedily in rank order: a result within T
of one already kept is counted under the best such one instead of shown.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import ConfigError, InputError
from retrieval.model.encoder import ImageInput
from retrieval.search.hits import Hit

__all__ = ["Term", "combine", "compose_vector", "fold_hits", "fold_near", "split_weight"]

_WEIGHTED = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*:(.*)$", re.DOTALL)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Term:
    """One part of a composed query: a ``text``, an ``image`` or a ``vector`` (D,), and its weight.
    ``like``: for a vector, the collection whose vectors it is like (a stored row's), if known."""

    text: str | None = None
    image: ImageInput | None = None
    vector: np.ndarray | None = None
    weight: float = 1.0
    like: str | None = None

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.text, self.image, self.vector))
        if given != 1:
            raise InputError("a query part is one text, one image or one vector")
        if not np.isfinite(self.weight) or self.weight <= 0:
            raise InputError(f"a query part's weight must be positive, got {self.weight} (use minus)")
        if self.text is not None and not self.text.strip():
            raise InputError("a query part's text is empty")

    @classmethod
    def parse(cls, spec: str) -> Term:
        """``"a dog"``, ``"2:a dog"``, ``"photo.jpg"`` or ``"0.5:photo.jpg"``: a leading number and a
        colon is the weight; what names an existing file is an image, anything else a text."""
        weight, spec = split_weight(spec)
        if Path(spec).is_file():
            return cls(image=Path(spec), weight=weight)
        if Path(spec).suffix.lower() in _IMAGE_SUFFIXES and " " not in spec:
            raise InputError(f"{spec}: no such image file (a part names an image only where the file exists)")
        return cls(text=spec, weight=weight)

    @property
    def modality(self) -> str | None:
        """The collection whose vectors this part is like: captions for a text, images for an
        image, ``like`` for a vector."""
        if self.text is not None:
            return "captions"
        return "images" if self.image is not None else self.like


def split_weight(spec: str) -> tuple[float, str]:
    """``"2:a dog"`` -> (2.0, "a dog"); ``"a dog"`` -> (1.0, "a dog"). Only a leading number and a
    colon is a weight: "note: a dog" is a text."""
    match = _WEIGHTED.match(spec)
    if match:
        return float(match.group(1)), match.group(2).strip()
    return 1.0, spec


def combine(
    plus: Sequence[tuple[float, np.ndarray]], minus: Sequence[tuple[float, np.ndarray]]
) -> np.ndarray:
    """(weight, unit vector (D,)) parts -> the unit (D,) float32 of ``sum(plus) - sum(minus)``."""
    if not plus:
        raise InputError("a composed query needs at least one part to search for")
    total = np.zeros_like(np.asarray(plus[0][1], dtype=np.float64))
    for weight, vector in plus:
        total += weight * np.asarray(vector, dtype=np.float64)
    for weight, vector in minus:
        total -= weight * np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise InputError("the query's parts cancel out: nothing is left to search for")
    return (total / norm).astype(np.float32)


def fold_near(vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """Results' vectors (n, D), in rank order -> groups of their positions, each led by the one
    kept: every other result within ``threshold`` of a kept one joins the best-ranked such one."""
    groups: list[list[int]] = []
    kept: list[int] = []
    for position in range(len(vectors)):
        if kept:
            near = np.flatnonzero(vectors[kept] @ vectors[position] >= threshold)
            if len(near):
                groups[int(near[0])].append(position)
                continue
        kept.append(position)
        groups.append([position])
    return groups


def compose_vector(
    plus: Sequence[Term],
    minus: Sequence[Term],
    encode_texts: Callable[[list[str]], np.ndarray],
    encode_images: Callable[[list[ImageInput]], np.ndarray],
    dim: int,
) -> np.ndarray:
    """The query vector (D,) float32 of ``plus`` minus ``minus``: texts encoded in one call,
    images in another, vectors as given (checked to be ``dim`` wide)."""
    terms = [*plus, *minus]
    vectors: list[np.ndarray | None] = [t.vector for t in terms]
    texts = [n for n, t in enumerate(terms) if t.text is not None]
    images = [n for n, t in enumerate(terms) if t.image is not None]
    if texts:
        for n, v in zip(texts, encode_texts([str(terms[n].text) for n in texts]), strict=True):
            vectors[n] = v
    if images:
        for n, v in zip(images, encode_images([terms[n].image for n in images]), strict=True):  # type: ignore[misc]
            vectors[n] = v
    for v in vectors:
        if v is None or np.asarray(v).shape != (dim,):
            raise ConfigError(f"a query part's vector must be ({dim},) float32")
    parts = [(t.weight, v) for t, v in zip(terms, vectors, strict=True)]
    return combine(parts[: len(plus)], parts[len(plus) :])  # type: ignore[arg-type]


def fold_hits(hits: list[Hit], vectors: np.ndarray, threshold: float, k: int) -> list[Hit]:
    """``hits`` in rank order and their stored vectors (n, D) -> the first ``k`` not within
    ``threshold`` of a better one, renumbered, each listing in ``near_duplicates`` the hits folded
    into it that rank above the last of them (all of those given, when fewer than ``k`` remain)."""
    groups = fold_near(vectors, threshold)
    # With k kept, what ranks below the last of them would not have been shown: not listed.
    last = groups[k - 1][0] if len(groups) >= k else len(hits)
    out = []
    for rank, (first, *others) in enumerate(groups[:k], start=1):
        best = hits[first]
        folded_ids = [hits[m].id for m in others if m < last]
        fields = best.fields | ({"near_duplicates": folded_ids} if folded_ids else {})
        out.append(dataclasses.replace(best, rank=rank, fields=fields))
    return out
