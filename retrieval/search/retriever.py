"""``Retriever``: search an index folder by text, image, vector or id, from a pipeline or the CLI.

It is the library's one search object, so it stays one class: its methods are the public calls
and hold little of the work, which lives in ``ann`` (indexes), ``compose`` (composed queries,
folding), ``confidence``, ``hits``, ``rowsource`` and ``neighbors``.

Everything heavy loads on first use and is kept: the model (the one the index was built with,
checked by fingerprint), each collection's FAISS index (checked by sha256), and the rows that
results carry. Scores are cosine similarities. ``allow_ids`` restricts a search inside FAISS (an
``IDSelector``), so ``k`` results come back even when the allowed set is small.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from retrieval.ann.calibration import ScoreNull
from retrieval.ann.faiss_index import SearchIndex, load_index
from retrieval.errors import (
    ConfigError,
    IndexMismatchError,
    InputError,
    StaleIndexWarning,
    StoreError,
    TruncationWarning,
    UnknownIdError,
)
from retrieval.model.encoder import Encoder, ImageInput
from retrieval.search.compose import Term, compose_vector, fold_hits
from retrieval.search.confidence import null_of, uncalibrated
from retrieval.search.filters import Where, matching_ids, needed_columns, parse_where
from retrieval.search.hits import Hit, folded, hits_of
from retrieval.search.modelref import load_index_encoder
from retrieval.search.neighbors import Method, NeighborBlock, NeighborsConfig, neighbor_blocks
from retrieval.search.rowsource import RowSource
from retrieval.store.folder import Store
from retrieval.store.location import ModelPaths, remember_model
from retrieval.store.manifest import Manifest
from retrieval.vectors import embedding_matrix

__all__ = ["Hit", "Retriever", "Target", "Term", "parse_where"]

Target = Literal["images", "captions"]
FOLD_FETCH = 16_384  # hits a folded search reads at most (or 64 x k, if more)
_ROW_COLUMNS = {
    "images": ["id", "path", "sha256", "size", "width", "height", "flags"],
    "captions": ["id", "text", "source", "row", "image", "sha256", "flags", "metadata"],
}


@dataclass
class _Rows:
    ids: np.ndarray  # sorted ids
    table: pa.Table  # rows in the order of ``ids``


class Retriever:
    """Searches one index folder. Use ``Retriever.open(folder)``; close it (or use ``with``)."""

    def __init__(
        self,
        store: Store,
        *,
        device: str = "auto",
        precision: str = "auto",
        encoder: Encoder | None = None,
        model: ModelPaths | None = None,
    ):
        if store.manifest is None:
            raise StoreError(f"{store.folder} has no committed state")
        self.store = store
        self.manifest: Manifest = store.manifest
        self.device = device
        self.precision = precision
        self.model_paths = model or ModelPaths()
        self._encoder = encoder
        self._own_encoder = encoder is None
        self._indexes: dict[str, SearchIndex] = {}
        self._rows: dict[str, _Rows] = {}
        self._sources: dict[str, RowSource] = {}
        self._nulls: dict[tuple[str, str], ScoreNull | None] = {}

    @classmethod
    def open(
        cls,
        folder: str | Path,
        *,
        device: str = "auto",
        precision: str = "auto",
        encoder: Encoder | None = None,
        model: ModelPaths | None = None,
    ) -> Retriever:
        """Open an index folder. Its model loads on first use from where the index recorded it;
        ``model`` names files that moved (accepted when the fingerprint matches)."""
        return cls(Store.open(folder), device=device, precision=precision, encoder=encoder, model=model)

    def refresh(self) -> bool:
        """Move to the folder's newest published state (its newest FAISS indexes and table
        versions). Until then the retriever keeps answering from the versions it opened, whatever
        builds commit meanwhile. Returns whether anything changed."""
        fresh = Store.open(self.store.folder)
        if fresh.manifest == self.manifest:
            fresh.close()
            return False
        old = self.store
        self.store, self.manifest = fresh, fresh.manifest  # type: ignore[assignment]
        self._indexes, self._rows, self._sources, self._nulls = {}, {}, {}, {}
        if (
            self._encoder is not None
            and self._own_encoder
            and (
                self._encoder.fingerprint is None
                or self._encoder.fingerprint.digest != self.manifest.fingerprint
            )
        ):
            self._encoder.close()
            self._encoder = None  # a rebuild with another model: loaded again on first use
        old.close()
        return True

    # -- resources (lazy) ------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        """The model the index was built with, loaded on first use."""
        if self._encoder is None:
            self._encoder = load_index_encoder(
                self.store.folder,
                self.manifest,
                self.model_paths,
                device=self.device,
                precision=self.precision,
            )
        fingerprint = self._encoder.fingerprint
        if fingerprint is None or fingerprint.digest != self.manifest.fingerprint:
            raise IndexMismatchError(
                f"{self.store.folder} was built with another model than the one loaded "
                "(checkpoint or tower folders changed since)"
            )
        return self._encoder

    def remember_model(self) -> bool:
        """Record where the loaded model is now, if ``model`` named new paths; see ``remember_model``."""
        if not self.model_paths.given or self._encoder is None or self._encoder.spec is None:
            return False
        stat = self._encoder.source.stat if self._encoder.source else None
        return remember_model(self.store.folder, self._encoder.spec, stat)

    def index(self, target: Target) -> SearchIndex:
        if target not in self._indexes:
            state = self.store.state(target)
            committed = self.store.committed.collections.get(target) if self.store.committed else None
            waiting = committed.counts.get("indexed", 0) if committed else 0
            if state.index is None:
                if waiting:
                    raise StoreError(
                        f"{self.store.folder}: {waiting} {target} committed, not yet searchable: "
                        "rerun `index build` to finish"
                    )
                raise StoreError(f"{self.store.folder} has no {target} index (build it with `index build`)")
            if committed is not None and committed.index is not None and committed.awaiting_index:
                warnings.warn(
                    f"{self.store.folder}: {target} changed since its index was built (a build was "
                    "stopped or is running); searching the last published version: rerun `index build` "
                    "to finish",
                    StaleIndexWarning,
                    stacklevel=3,
                )
            self._indexes[target] = load_index(self.store, state.index)
        return self._indexes[target]

    def source(self, target: Target) -> RowSource:
        """Rows of ``target`` by id, read from only the data files that hold them."""
        if target not in self._sources:
            self._sources[target] = RowSource(self.store, target, _ROW_COLUMNS[target])
        return self._sources[target]

    def _vector_source(self, collection: Target) -> RowSource:
        key = f"{collection}/embedding"
        if key not in self._sources:
            # Vectors are 1 KB a row at 256-d: a few files kept, not the result columns' 256.
            self._sources[key] = RowSource(self.store, collection, ["embedding"], cached_files=8)
        return self._sources[key]

    def rows(self, target: Target) -> _Rows:
        """Every row of ``target`` (result columns), read whole: for evaluation over a collection.
        Searches read only their hits' rows (``source``)."""
        if target not in self._rows:
            tables = [t for _, t in self.store.iter_shards(target, _ROW_COLUMNS[target])]
            if not tables:
                raise StoreError(f"{self.store.folder} has no {target}")
            table = pa.concat_tables(tables).sort_by("id")
            table = table.combine_chunks()  # one chunk: a take of k rows stays a few microseconds
            self._rows[target] = _Rows(table.column("id").to_numpy(), table)
        return self._rows[target]

    # -- encoding ----------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (n, D), unit norm, with the index's model."""
        return self.encoder.encode_texts(texts)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self.encoder.encode_images(images)

    # -- rows by id --------------------------------------------------------------------------------

    def contains(self, ids: Sequence[int] | np.ndarray, collection: Target = "images") -> np.ndarray:
        """bool (n,): whether each of ``ids`` is a live row of ``collection``."""
        return self.source(_target(collection)).contains(np.asarray(ids, dtype=np.int64))

    def vectors(self, ids: Sequence[int] | np.ndarray, collection: Target = "images") -> np.ndarray:
        """The stored vectors of ``ids`` -> float32 (n, D), unit norm; ``InputError`` names any id
        that is not a live row of ``collection``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._require(ids, collection)
        dim = int(self.manifest.model["fingerprint"]["dim"])
        column = self._vector_source(collection).take(ids).column("embedding")
        return embedding_matrix(column, dim)

    def item(self, id: int, collection: Target = "images") -> dict[str, Any]:
        """One live row as results show it (``id``, ``path`` or ``text``, its fields)."""
        self._require(np.array([id], dtype=np.int64), collection)
        hit = self.hits(np.array([id], dtype=np.int64), np.array([1.0], np.float32), collection)[0]
        out = hit.to_dict()
        del out["rank"], out["score"]
        return {"collection": collection} | out

    def image_file(self, id: int, root: str | Path | None = None) -> Path:
        """The file an image row names, under ``root`` (default: the folder it was indexed from).

        Only a row's own path is ever joined to the root, and one that would leave it (absolute,
        or climbing with ``..``) is refused: callers serve files by id, never by a path they were sent.
        """
        self._require(np.array([id], dtype=np.int64), "images")
        relative = str(self.source("images").take(np.array([id], dtype=np.int64)).column("path")[0])
        base = Path(root if root is not None else self.store.state("images").root or ".").resolve()
        path = (base / relative).resolve()
        if Path(relative).is_absolute() or not path.is_relative_to(base):
            raise InputError(f"image {id}: its path {relative!r} leaves the image folder")
        return path

    def _require(self, ids: np.ndarray, collection: Target) -> None:
        missing = ids[~self.contains(ids, collection)]
        if len(missing):
            raise UnknownIdError(f"no {collection} with id {', '.join(map(str, missing[:5].tolist()))}")

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

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Search queries -> float32 (n, D): refused when empty, a warning when cut to the limit.

        An empty or whitespace-only query raises ``InputError``; a query longer than the text
        tower's limit is truncated as the model would, with a ``TruncationWarning``.
        """
        for number, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                where = "" if len(texts) == 1 else f" (query {number})"
                raise InputError(f"empty query{where}: give some words to search for")
        encoder = self.encoder
        ids, cut = encoder.text_batcher.tokenize_flagged(list(texts))
        for number in map(int, np.flatnonzero(cut)):
            words = len(texts[number].split())
            limit = encoder.text_batcher.max_length
            warnings.warn(
                f"query {_quote(texts[number])} ({words:,} words) is longer than the model's "
                f"{limit} tokens: only its beginning is searched",
                TruncationWarning,
                stacklevel=3,
            )
        return encoder.encode_text_ids(ids)

    def search_texts(
        self,
        texts: Sequence[str],
        k: int = 100,
        target: Target = "images",
        allow_ids: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries (see ``encode_queries``) -> ids (n, k) int64 and scores (n, k) float32."""
        return self.search_vectors(self.encode_queries(texts), k, target, allow_ids)

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
        *,
        fold_identical: bool = False,
        dedup: float | None = None,
        min_confidence: float | None = None,
    ) -> list[Hit]:
        """The top ``k`` as ``Hit``s, each with its ``confidence`` (see ``search_vector``)."""
        vector = self.encode_queries([text])
        return self.search_vector(
            vector[0],
            k,
            target,
            allow_ids,
            fold_identical=fold_identical,
            dedup=dedup,
            min_confidence=min_confidence,
            query_from="captions",
        )

    def search_image(
        self,
        image: ImageInput,
        k: int = 10,
        target: Target = "captions",
        allow_ids: Sequence[int] | np.ndarray | None = None,
        *,
        fold_identical: bool = False,
        dedup: float | None = None,
        min_confidence: float | None = None,
    ) -> list[Hit]:
        vector = self.encode_images([image])
        return self.search_vector(
            vector[0],
            k,
            target,
            allow_ids,
            fold_identical=fold_identical,
            dedup=dedup,
            min_confidence=min_confidence,
            query_from="images",
        )

    def search_composed(
        self,
        plus: Sequence[Term | str],
        minus: Sequence[Term | str] = (),
        k: int = 10,
        target: Target = "images",
        allow_ids: Sequence[int] | np.ndarray | None = None,
        *,
        fold_identical: bool = False,
        dedup: float | None = None,
        min_confidence: float | None = None,
    ) -> list[Hit]:
        """The top ``k`` for the normalised weighted sum of ``plus`` minus ``minus`` (``Term``s, or
        strings as ``Term.parse`` reads them: ``"2:a dog"``, ``"photo.jpg"``). Confidence is
        measured when all parts are of one kind (texts: as text queries); a query mixing texts and
        images has no random pairs of its own, and no confidence."""
        plus_terms = [t if isinstance(t, Term) else Term.parse(t) for t in plus]
        minus_terms = [t if isinstance(t, Term) else Term.parse(t) for t in minus]
        kinds = {t.modality for t in [*plus_terms, *minus_terms]}
        return self.search_vector(
            self.compose(plus_terms, minus_terms),
            k,
            target,
            allow_ids,
            fold_identical=fold_identical,
            dedup=dedup,
            min_confidence=min_confidence,
            query_from=kinds.pop() if len(kinds) == 1 else None,  # type: ignore[arg-type]
        )

    def compose(self, plus: Sequence[Term], minus: Sequence[Term] = ()) -> np.ndarray:
        """The query vector (D,) float32 of ``plus`` minus ``minus``: texts encoded in one forward,
        images in another."""
        dim = int(self.manifest.model["fingerprint"]["dim"])
        return compose_vector(plus, minus, self.encode_queries, self.encode_images, dim)

    def search_vector(
        self,
        vector: np.ndarray,
        k: int = 10,
        target: Target = "images",
        allow_ids: Sequence[int] | np.ndarray | None = None,
        *,
        fold_identical: bool = False,
        dedup: float | None = None,
        min_confidence: float | None = None,
        query_from: Target | None = None,
    ) -> list[Hit]:
        """One query vector (D,) -> its top ``k`` ``Hit``s.

        ``fold_identical``: files of identical content (and equal captions) count once, as their
        best hit, the others listed in its ``identical``. ``dedup`` T: hits within cosine T of a
        better one are folded into the best such (their ids in its ``near_duplicates``), and more
        are fetched until ``k`` remain; the folded are those ranked above the last hit returned.
        ``query_from``: the collection the query is like ("captions" for a text, "images" for an
        image): each hit's ``confidence`` is then the fraction of random pairs of that direction
        its score beats; ``min_confidence`` keeps only hits at or above it (an empty list: no good
        match).
        """
        null = self.calibration(target, query_from) if query_from is not None else None
        if min_confidence is not None:
            if not 0.0 <= min_confidence <= 1.0:
                raise ConfigError(f"a confidence is a fraction in [0, 1], got {min_confidence}")
            if null is None:
                raise ConfigError(uncalibrated(self.store.folder, self.manifest, target, query_from))
        if dedup is not None and not -1.0 <= dedup <= 1.0:
            raise ConfigError(f"dedup is a cosine in [-1, 1], got {dedup}")
        fetch = k if not (fold_identical or dedup is not None) else 2 * k
        # Folding fetches more until k remain, but never past a bound: a low dedup on a clustered
        # collection would otherwise read it whole for one query. Fewer than k come back then.
        most = max(FOLD_FETCH, 64 * k)
        while True:
            ids, scores = self.search_vectors(vector, fetch, target, allow_ids)
            hits = self.hits(ids[0], scores[0], target, null)
            if fold_identical:
                hits = folded(hits)
            if dedup is not None and hits:
                hits = fold_hits(hits, self.vectors(np.array([h.id for h in hits]), target), dedup, k)
            done = fetch == k or (ids[0] < 0).any() or fetch >= min(most, self.size(target))
            if len(hits) >= k or done:
                break
            fetch = min(fetch * 4, most)
        hits = hits[:k]
        if min_confidence is not None:
            hits = [h for h in hits if h.confidence is not None and h.confidence >= min_confidence]
        return hits

    def calibration(self, target: Target, queries: Target) -> ScoreNull | None:
        """How random pairs of ``queries`` items and ``target`` items score, as the index recorded
        it when it was built (None for an index built before calibration)."""
        key = (_target(target), queries)
        if key not in self._nulls:  # parsed once: searches ask for it on every query
            self._nulls[key] = null_of(self.store.state(key[0]).index, queries)
        return self._nulls[key]

    def neighbors(
        self,
        k: int = 50,
        source: Target = "images",
        target: Target = "images",
        *,
        method: Method = "exact",
        block_rows: int = 16_384,
        distinct: bool = False,
        scratch: str | Path | None = None,
    ) -> Iterator[NeighborBlock]:
        """Every live ``source`` row's top ``k`` in ``target`` (itself left out), a ``NeighborBlock``
        of ``block_rows`` source rows at a time, ids ascending: exact (BLAS blocks) or through the
        target's FAISS index. ``distinct``: files of identical content count once. The vectors are
        copied under ``scratch`` (default: the system's temporary folder) while it runs. For a file
        on disk, resumable, see ``retrieval.search.neighbors.write_neighbors``."""
        config = NeighborsConfig(source, target, k, method, block_rows, distinct=distinct)
        return neighbor_blocks(self, config, Path(scratch) if scratch is not None else None)

    def size(self, target: Target) -> int:
        """How many rows ``target`` has in search."""
        return self.source(target).count

    def hits(
        self, ids: np.ndarray, scores: np.ndarray, target: Target, null: ScoreNull | None = None
    ) -> list[Hit]:
        """One row of a search result -> ``Hit``s with the rows' fields (padding dropped), and with
        ``null`` (``calibration``), each score's confidence."""
        valid = ids >= 0
        records = self.source(target).take(ids[valid]).to_pylist()
        confidences = null.percentile(scores[valid]) if null is not None else None
        return hits_of(records, scores[valid], target, self.store.state("images").root, confidences)

    def filter_ids(self, target: Target, where: Sequence[Where]) -> np.ndarray:
        """Ids whose fields match every ``(field, op, value)``; op is ``=`` (equal) or ``~`` (glob).

        ``path`` matches the path as stored (relative to the image folder), as results print it
        (absolute), or relative to the working folder, so a pasted path finds its file.
        """
        files = self.source(target).scan(needed_columns(target, where))
        return matching_ids(target, files, where, self.store.state("images").root)

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
        self._indexes.clear()
        self._rows.clear()
        self._sources.clear()
        self.store.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quote(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def _target(target: str) -> Target:
    if target not in ("images", "captions"):
        raise ConfigError(f"target must be images or captions, got {target!r}")
    return target  # type: ignore[return-value]
