"""How good a model and its indexes are: image-text recall in both directions, and zero-shot accuracy.

``evaluate(EvalConfig(...))`` runs the standard image-caption retrieval protocol. Text->image: each
distinct caption is a query, and the images it describes are its gold answers. Image->text: each
distinct image (by content) is a query, and its captions are the gold answers. Identical texts,
and identical image files, are one item: which of two equal answers comes first is not quality.

- Without an index, the pairs file is encoded with the given model and the candidates are the
  pairs' own images and captions: this measures **the model**.
- With ``index``, the candidates are the whole indexed collections, searched exactly (the model
  over this corpus) and through each built FAISS index (**the system**), plus each index's
  recall@10 against the exact search: a weak model and a lossy index are told apart.

With ``labels_column``, images are classified zero-shot against prompts built from the label
names, and each label is also run as a text query (precision@10 among the labelled images).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ConfigError, InputError
from retrieval.evaluation.metrics import RankSummary, exact_scan, gold_matrix, ranks_in_results, summarize
from retrieval.evaluation.sets import EvalSet, from_index, from_pairs
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.model.zeroshot import label_vectors
from retrieval.outcomes import Outcome
from retrieval.progress import Progress, Silent
from retrieval.store.location import ModelPaths

__all__ = [
    "DEFAULT_TEMPLATES",
    "DirectionResult",
    "EvalConfig",
    "EvalReport",
    "LabelResult",
    "MethodResult",
    "ZeroShotResult",
    "evaluate",
    "score",
]

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a drawing of a {}.", "{}")
CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class EvalConfig:
    """What ``retrieval eval`` measures: pairs and/or an index folder, and how."""

    pairs: Path | None = None
    index: Path | None = None
    images_root: Path | None = None  # relative image paths in ``pairs`` (default: the file's folder)
    model: ModelSpec = field(default_factory=ModelSpec)  # used without ``index``
    index_model: ModelPaths = field(default_factory=ModelPaths)  # with ``index``: files that moved
    labels_column: str | None = None
    ks: tuple[int, ...] = (1, 5, 10)
    depth: int = 100  # results fetched from an index per query
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None  # image decoding processes (0: in this process)


@dataclass(frozen=True)
class MethodResult:
    """One direction searched one way: ``exact``, or an index such as ``ivf nprobe=32``."""

    method: str
    summary: RankSummary
    curve: dict[int, float]  # recall@K for K in CURVE_KS (the plot)
    recall_vs_exact: float | None = None  # an index's recall@10 against the exact top 10


@dataclass(frozen=True)
class DirectionResult:
    direction: str  # "text_to_image" or "image_to_text"
    queries: int
    candidates: int
    methods: tuple[MethodResult, ...]


@dataclass(frozen=True)
class LabelResult:
    label: str
    images: int
    accuracy: float  # top-1 accuracy on the images with this label
    precision_at_10: float  # the label as a text query: share of its top 10 images that have it


@dataclass(frozen=True)
class ZeroShotResult:
    images: int
    top1: float
    top5: float
    mean_precision_at_10: float
    labels: tuple[LabelResult, ...]
    confusions: tuple[tuple[str, str, int], ...]  # (true, predicted, count), most frequent first
    templates: tuple[str, ...]


@dataclass(frozen=True)
class EvalReport:
    source: str  # the pairs file or index folder evaluated
    model: dict[str, Any]
    images: int
    captions: int
    pairs: int
    skipped: tuple[Outcome, ...]
    directions: tuple[DirectionResult, ...]
    zeroshot: ZeroShotResult | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [asdict(o) for o in self.skipped]
        return data


def evaluate(
    config: EvalConfig, progress: Progress | None = None, encoder: Encoder | None = None
) -> EvalReport:
    """Measure retrieval (and, with ``labels_column``, zero-shot classification) quality."""
    started = time.perf_counter()
    if config.pairs is None and config.index is None:
        raise ConfigError("give --pairs, --index or both")
    if not config.ks or min(config.ks) < 1:
        raise ConfigError("-k values must be positive")
    if config.depth < max(config.ks):
        raise ConfigError(f"the search depth ({config.depth}) must be at least the largest K")
    evalset = _open(config, progress or Silent(), encoder)
    try:
        report = score(evalset, config)
    finally:
        evalset.close()
    return replace(
        report,
        source=str(config.index if config.index is not None else config.pairs),
        seconds=round(time.perf_counter() - started, 3),
    )


def score(evalset: EvalSet, config: EvalConfig) -> EvalReport:
    """The figures of an ``EvalSet`` (however it was built): both directions, and zero-shot."""
    directions = tuple(d for d in (_text_to_image(evalset, config), _image_to_text(evalset, config)) if d)
    zeroshot = _zero_shot(evalset, config.templates) if config.labels_column is not None else None
    return EvalReport(
        source="",
        model=evalset.model,
        images=len(evalset.image_vectors),
        captions=len(evalset.text_vectors),
        pairs=evalset.pair_count,
        skipped=tuple(evalset.skipped),
        directions=directions,
        zeroshot=zeroshot,
        seconds=0.0,
    )


def _open(config: EvalConfig, progress: Progress, encoder: Encoder | None) -> EvalSet:
    if config.index is not None:
        return from_index(
            config.index,
            progress,
            pairs_path=config.pairs,
            images_root=config.images_root,
            labels_column=config.labels_column,
            device=config.device,
            precision=config.precision,
            encoder=encoder,
            model=config.index_model,
        )
    assert config.pairs is not None  # evaluate() checked that one of the two is given
    owned = encoder is None
    model = encoder or Encoder.load(config.model, device=config.device, precision=config.precision)
    try:
        evalset = from_pairs(
            config.pairs,
            model,
            progress,
            images_root=config.images_root,
            labels_column=config.labels_column,
            workers=config.workers,
        )
    except BaseException:
        if owned:
            model.close()
        raise
    if owned:
        evalset.close = model.close
    return evalset


# -- the two directions ---------------------------------------------------------------------------


def _text_to_image(s: EvalSet, config: EvalConfig) -> DirectionResult | None:
    if "images" not in s.candidates or len(s.text_vectors) == 0:
        return None
    linked = _group(s.links[:, 1], s.links[:, 0], len(s.text_vectors))  # text -> its images
    return _direction(
        "text_to_image",
        queries=s.text_vectors,
        gold=[np.concatenate([s.image_ids[i] for i in images]) for images in linked],
        best=np.array(
            [max(s.text_vectors[t] @ s.image_vectors[i] for i in linked[t]) for t in range(len(linked))]
        ),
        target="images",
        s=s,
        config=config,
    )


def _image_to_text(s: EvalSet, config: EvalConfig) -> DirectionResult | None:
    if "captions" not in s.candidates:
        return None
    linked = _group(s.links[:, 0], s.links[:, 1], len(s.image_vectors))  # image -> its texts
    queries, gold, best = [], [], []
    for image, texts in enumerate(linked):
        findable = [t for t in texts if len(s.text_ids[t])]
        if findable:  # an image none of whose captions is a candidate cannot be scored
            queries.append(image)
            gold.append(np.concatenate([s.text_ids[t] for t in findable]))
            best.append(max(s.image_vectors[image] @ s.text_vectors[t] for t in findable))
    if not queries:
        return None
    return _direction(
        "image_to_text",
        queries=s.image_vectors[queries],
        gold=gold,
        best=np.array(best),
        target="captions",
        s=s,
        config=config,
    )


def _direction(
    name: str,
    *,
    queries: np.ndarray,
    gold: Sequence[np.ndarray],
    best: np.ndarray,
    target: str,
    s: EvalSet,
    config: EvalConfig,
) -> DirectionResult:
    count, blocks = s.candidates[target]
    golds = gold_matrix([g.tolist() for g in gold])
    k10 = min(10, count)
    exact_ids, exact_scores, ranks = exact_scan(queries, blocks(), k10, golds, best.astype(np.float32))
    assert ranks is not None  # gold was given
    methods = [MethodResult("exact", summarize(ranks, config.ks), _curve(ranks, count))]
    index = s.indexes.get(target)
    if index is not None:
        from retrieval.ann.faiss_index import recall_at

        ids, scores = index.search(queries, min(config.depth, count))
        found = ranks_in_results(ids, scores, golds)
        vs_exact = recall_at(ids[:, :k10], exact_ids, scores[:, :k10], exact_scores)
        label = f"{index.kind} {index.param}={index.value}" if index.param else index.kind
        methods.append(
            MethodResult(
                label,
                summarize(found, config.ks, depth=config.depth),
                _curve(found, count),
                round(vs_exact, 4),
            )
        )
    return DirectionResult(name, len(queries), count, tuple(methods))


def _curve(ranks: np.ndarray, candidates: int) -> dict[int, float]:
    """Recall@K at the plot's K (those below the candidate count: beyond it recall is trivially 1)."""
    found = ranks > 0
    ks = [k for k in CURVE_KS if k < candidates] or [1]
    return {k: float(((ranks <= k) & found).mean()) if len(ranks) else 0.0 for k in ks}


def _group(keys: np.ndarray, values: np.ndarray, n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for key, value in zip(keys.tolist(), values.tolist(), strict=True):
        out[key].append(value)
    return out


# -- zero-shot ------------------------------------------------------------------------------------


def _zero_shot(s: EvalSet, templates: Sequence[str]) -> ZeroShotResult:
    label_of = {i: label for i, label in enumerate(s.image_labels) if label is not None}
    labelled = list(label_of)
    names = sorted(set(label_of.values()))
    if len(names) < 2:
        raise InputError(f"zero-shot needs at least two distinct labels, found {len(names)}")
    classes = label_vectors(s.encode_texts, names, templates)  # (L, D), the same path as classify
    vectors = s.image_vectors[labelled]  # (N, D)
    position = {name: c for c, name in enumerate(names)}
    truth = np.array([position[label_of[i]] for i in labelled])  # (N,)
    scores = vectors @ classes.T  # (N, L)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    top1 = ranked[:, 0] == truth
    top5 = (ranked[:, :5] == truth[:, None]).any(axis=1)
    per_label = []
    by_query = np.argsort(-(classes @ vectors.T), axis=1, kind="stable")[:, :10]  # (L, <=10)
    for c, name in enumerate(names):
        mine = truth == c
        per_label.append(
            LabelResult(
                name,
                int(mine.sum()),
                round(float(top1[mine].mean()), 4),
                round(float((truth[by_query[c]] == c).mean()), 4),
            )
        )
    wrong = Counter((names[t], names[p]) for t, p in zip(truth, ranked[:, 0], strict=True) if t != p)
    return ZeroShotResult(
        images=len(labelled),
        top1=round(float(top1.mean()), 4),
        top5=round(float(top5.mean()), 4),
        mean_precision_at_10=round(float(np.mean([r.precision_at_10 for r in per_label])), 4),
        labels=tuple(per_label),
        confusions=tuple((t, p, n) for (t, p), n in wrong.most_common(10)),
        templates=tuple(templates),
    )
