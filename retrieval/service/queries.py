"""A batch of search queries run together: one encoder forward per kind of input, one FAISS search
per (snapshot, target), then each query's hits.

This is the work the coalescer hands to the model thread. Queries of one batch may come from
different requests, ask for different ``k`` and targets, and hold different snapshots (a swap
happened between them): they are grouped so that every group is one library call. A query with an
allow-list is searched on its own (its ``IDSelector`` is its own). A group that fails is run again
one query at a time, so one bad query fails alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from retrieval.search.compose import Term
from retrieval.search.hits import Hit
from retrieval.search.retriever import Target
from retrieval.service.snapshots import Snapshot

__all__ = ["Answer", "Query", "run_queries"]

Observe = Callable[[str, float], None]  # (stage, seconds)


@dataclass(frozen=True, eq=False)
class Query:
    """One search: exactly one of ``text``, ``image``, ``vector`` or ``item`` (collection, id), and
    the parts composed with it."""

    snapshot: Snapshot
    target: Target
    k: int
    text: str | None = None
    image: Image.Image | None = None
    vector: np.ndarray | None = None  # (D,) float32, unit norm
    item: tuple[Target, int] | None = None  # search by a row's own vector; the row is left out
    allow: np.ndarray | None = None  # int64 ids
    plus: tuple[Term, ...] = ()  # parts added to the query (weighted), and taken away
    minus: tuple[Term, ...] = ()
    dedup: float | None = None
    min_confidence: float | None = None

    @property
    def kind(self) -> str:
        if self.text is not None:
            return "text"
        if self.image is not None:
            return "image"
        return "vector" if self.vector is not None else "item"

    @property
    def alone(self) -> bool:
        """Searched on its own: an allow-list, folding or a confidence floor are its own."""
        return self.allow is not None or self.dedup is not None or self.min_confidence is not None

    @property
    def query_from(self) -> Target | None:
        """The collection this query is like, for its hits' confidence (None for a bare vector,
        or parts of both texts and images)."""
        own: Target | None = {"text": "captions", "image": "images"}.get(self.kind)  # type: ignore[assignment]
        if self.item is not None:
            own = self.item[0]
        kinds = {own} | {t.modality for t in (*self.plus, *self.minus)}
        return kinds.pop() if len(kinds) == 1 else None  # type: ignore[return-value]


@dataclass(frozen=True)
class Answer:
    hits: list[Hit]
    version: dict


def run_queries(queries: Sequence[Query], observe: Observe | None = None) -> list[Answer | Exception]:
    """Each query's ``Answer``, or the exception that query raised, in order."""
    observe = observe or (lambda stage, seconds: None)
    vectors: list[np.ndarray | Exception] = _vectors(queries, observe)
    results: list[Answer | Exception] = [v if isinstance(v, Exception) else Answer([], {}) for v in vectors]
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for number, (query, vector) in enumerate(zip(queries, vectors, strict=True)):
        if not isinstance(vector, Exception):
            key = (id(query.snapshot), query.target) if not query.alone else (-number - 1, query.target)
            groups[key].append(number)
    started = time.perf_counter()
    for members in groups.values():
        found = _each(members, lambda chosen: _search(queries, vectors, chosen))
        for number, answer in zip(members, found, strict=True):
            results[number] = answer
    observe("search", time.perf_counter() - started)
    return results


def _each(members: list[int], run: Callable[[list[int]], list]) -> list:
    """``run(members)``, or, if it raises, ``run([m])`` for each member, its error kept as its result."""
    try:
        return run(members)
    except Exception as e:
        if len(members) == 1:
            return [e]
    out = []
    for member in members:
        try:
            out += run([member])
        except Exception as e:
            out.append(e)
    return out


def _vectors(queries: Sequence[Query], observe: Observe) -> list[np.ndarray | Exception]:
    """Each query's vector: texts and images encoded in one forward per model, items looked up."""
    out: list[np.ndarray | Exception] = [np.empty(0)] * len(queries)
    by_model: dict[tuple[int, str], list[int]] = defaultdict(list)
    for number, query in enumerate(queries):
        if query.vector is not None:
            out[number] = query.vector
        else:
            by_model[(id(query.snapshot.encoder), query.kind)].append(number)
    for (_, kind), members in by_model.items():
        started = time.perf_counter()

        def encode(chosen: list[int], kind: str = kind) -> list[np.ndarray]:
            retriever = queries[chosen[0]].snapshot.retriever
            if kind == "text":
                encoded = retriever.encode_queries([str(queries[n].text) for n in chosen])
            elif kind == "image":
                encoded = retriever.encode_images([queries[n].image for n in chosen])  # type: ignore[misc]
            else:  # rows by id: each from its own snapshot and collection
                encoded = np.stack([_item_vector(queries[n]) for n in chosen])
            return list(encoded)

        for number, vector in zip(members, _each(members, encode), strict=True):
            out[number] = vector
        observe("encode" if kind != "item" else "lookup", time.perf_counter() - started)
    for number, query in enumerate(queries):
        vector = out[number]
        if (query.plus or query.minus) and not isinstance(vector, Exception):
            try:
                base = Term(vector=np.asarray(vector, dtype=np.float32), like=query.query_from)
                out[number] = query.snapshot.retriever.compose([base, *query.plus], query.minus)
            except Exception as e:
                out[number] = e
    return out


def _item_vector(query: Query) -> np.ndarray:
    collection, row = query.item  # type: ignore[misc]
    return query.snapshot.retriever.vectors([row], collection)[0]


def _search(queries: Sequence[Query], vectors: Sequence, chosen: list[int]) -> list[Answer]:
    first = queries[chosen[0]]
    retriever, target = first.snapshot.retriever, first.target
    if first.alone:
        return [_search_alone(first, vectors[chosen[0]])]
    # An item query asks for one more: its own row comes first and is dropped.
    wanted = [queries[n].k + _finds_itself(queries[n]) for n in chosen]
    k = min(max(wanted), max(retriever.size(target), 1))
    matrix = np.stack([vectors[n] for n in chosen]).astype(np.float32, copy=False)  # (n, D)
    ids, scores = retriever.search_vectors(matrix, k, target, first.allow)  # (n, k) each
    answers = []
    for row, number in enumerate(chosen):
        query = queries[number]
        keep = ids[row] >= 0
        if query.item is not None and _finds_itself(query):
            keep &= ids[row] != query.item[1]
        top_ids, top_scores = ids[row][keep][: query.k], scores[row][keep][: query.k]
        null = retriever.calibration(target, query.query_from) if query.query_from else None
        answers.append(Answer(retriever.hits(top_ids, top_scores, target, null), query.snapshot.version))
    return answers


def _search_alone(query: Query, vector: np.ndarray) -> Answer:
    """A query with its own allow-list, folding or confidence floor: one library search."""
    retriever = query.snapshot.retriever
    itself = _finds_itself(query)
    hits = retriever.search_vector(
        vector,
        query.k + itself,
        query.target,
        query.allow,
        dedup=query.dedup,
        min_confidence=query.min_confidence,
        query_from=query.query_from,
    )
    if itself and query.item is not None:
        hits = [h for h in hits if h.id != query.item[1]][: query.k]
        hits = [dataclasses.replace(h, rank=rank) for rank, h in enumerate(hits, start=1)]
    return Answer(hits, query.snapshot.version)


def _finds_itself(query: Query) -> bool:
    """Whether an item query searches its own collection (its row would be its first hit)."""
    return query.item is not None and query.item[0] == query.target
