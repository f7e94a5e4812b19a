"""Request bodies of the API, validated by pydantic: a wrong type, a missing or unknown field is a
422 with a message before any handler runs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["BatchBody", "EmbedBody", "Part", "SearchBody"]

Collection = Literal["images", "captions"]
_MAX_QUERY_CHARS = 10_000  # a query is truncated to the tokenizer's limit anyway; this bounds the body
_MAX_IDS = 1_000_000


class Part(BaseModel):
    """A part of a composed query: one of ``text``, ``image`` (base64), ``vector`` or ``id`` (+
    ``collection``), and its weight."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=_MAX_QUERY_CHARS)
    image: str | None = None
    vector: list[float] | None = Field(None, max_length=8192)
    id: int | None = Field(None, ge=0)
    collection: Collection | None = None
    weight: float = Field(1.0, gt=0, le=1000)

    @model_validator(mode="after")
    def _one_part(self) -> Part:
        given = [name for name in ("text", "image", "vector", "id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a part is exactly one of text, image, vector or id (got {', '.join(given) or 'none'})"
            )
        if self.text is not None and not self.text.strip():
            raise ValueError("a part's text is empty")
        if self.collection is not None and self.id is None:
            raise ValueError("collection goes with id")
        return self


class SearchBody(BaseModel):
    """One search: exactly one of ``text``, ``image`` (base64), ``vector`` or ``id``."""

    model_config = ConfigDict(extra="forbid")

    index: str | None = None
    text: str | None = Field(None, max_length=_MAX_QUERY_CHARS)
    image: str | None = None  # base64 of an encoded image file
    vector: list[float] | None = Field(None, max_length=8192)
    id: int | None = Field(None, ge=0)
    collection: Collection | None = None  # with ``id``: the row's collection (default: target)
    target: Collection | None = None  # default: images, or captions for an image query
    k: int = Field(10, ge=1)
    where: list[str] | None = Field(None, max_length=32)
    allow_ids: list[int] | None = Field(None, max_length=_MAX_IDS)
    # Composed with the query: parts, or strings as texts ("2:a dog" weighted)
    plus: list[Part | str] | None = Field(None, max_length=16)
    minus: list[Part | str] | None = Field(None, max_length=16)
    dedup: float | None = Field(None, ge=-1.0, le=1.0)  # fold hits within this cosine of a better one
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_query(self) -> SearchBody:
        given = [name for name in ("text", "image", "vector", "id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of text, image, vector or id (got {', '.join(given) or 'none'})"
            )
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty: give some words to search for")
        if self.collection is not None and self.id is None:
            raise ValueError("collection goes with id")
        return self

    @property
    def resolved_target(self) -> Collection:
        if self.target is not None:
            return self.target
        if self.id is not None and self.collection is not None:
            return self.collection
        return "captions" if self.image is not None else "images"


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[SearchBody] = Field(..., min_length=1, max_length=1024)


class EmbedBody(BaseModel):
    """Texts or images (base64) to vectors, with an index's model."""

    model_config = ConfigDict(extra="forbid")

    index: str | None = None
    texts: list[str] | None = Field(None, min_length=1, max_length=1024)
    images: list[str] | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_kind(self) -> EmbedBody:
        if (self.texts is None) == (self.images is None):
            raise ValueError("give texts or images (one of them)")
        if self.texts is not None and any(not t.strip() for t in self.texts):
            raise ValueError("texts holds an empty text")
        return self
