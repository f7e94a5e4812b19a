"""Near-duplicate groups of a collection: identical content first, then cosine >= T.

1. Files of identical bytes (equal sha256) are one *unit*, represented by their smallest id.
2. Every unit's top-k neighbours among the units (``NeighborSearch``, exact or through the index)
   give the pairs scoring at least T.
3. Groups are stars: the unit with the most such pairs (then the highest total score, then the
   smallest id) becomes a representative, and takes every ungrouped unit within T of it; the
   next most connected ungrouped unit follows, and so on. Every member is within T of its
   representative, so two members are within ``2T² - 1`` of each other (0.805 at T = 0.95): a
   chain of near matches cannot join unrelated images, as connected components let it. Complete
   linkage (every pair within T) would score every pair of a group and split a set of copies as
   soon as two crops of one original fall just under T of each other, though both are near it.

Without a threshold, T is the score a random pair of the collection exceeds with probability
``false_match_rate / N`` (``ScoreNull``: every pair of a 4,096-vector sample, its tail fitted),
so that about ``false_match_rate`` of the items would find a false partner by chance.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.ann.calibration import SAMPLE, ScoreNull, score_null
from retrieval.durable import atomic_write
from retrieval.errors import ConfigError
from retrieval.progress import Progress, Silent
from retrieval.search.neighbors import Method, NeighborsConfig, NeighborSearch
from retrieval.search.vectorfile import content_keys

if TYPE_CHECKING:
    from retrieval.search.retriever import Retriever

__all__ = [
    "DuplicateGroup",
    "DuplicateReport",
    "DuplicatesConfig",
    "Threshold",
    "draw_groups",
    "find_duplicates",
    "star_groups",
]


@dataclass(frozen=True)
class DuplicatesConfig:
    """``threshold`` None: from the collection's random pairs at ``false_match_rate`` (expected
    false partners an item); ``k``: neighbours looked at an item (a group's representative takes
    at most ``k`` distinct contents; ``DuplicateReport.capped`` counts those that may have more)."""

    collection: str = "images"
    threshold: float | None = None
    false_match_rate: float = 1e-3
    k: int = 32
    method: Method = "exact"
    block_rows: int = 16_384
    threads: int | None = None
    seed: int = 0

    def check(self) -> None:
        if self.collection not in ("images", "captions"):
            raise ConfigError(f"the collection is images or captions, got {self.collection!r}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"the threshold is a cosine in [-1, 1], got {self.threshold}")
        if not 0.0 < self.false_match_rate < 1.0:
            raise ConfigError(f"the false-match rate must be in (0, 1), got {self.false_match_rate}")


@dataclass(frozen=True)
class Threshold:
    """The T used: given, or chosen from random pairs (``pair_rate``: their chance to exceed it)."""

    value: float
    auto: bool
    pair_rate: float  # P(random pair > value), from the collection's null
    item_rate: float  # expected false partners an item: pair_rate x (N - 1)
    pairs: int  # random pairs the null was measured on
    wanted: float | None = None  # auto: the false partners an item asked for

    @property
    def met(self) -> bool:
        """Whether the threshold meets the false-match rate asked for (auto only)."""
        return self.wanted is None or self.item_rate <= self.wanted * 1.001

    def describe(self, collection: str) -> str:
        how = "chosen" if self.auto else "given"
        shown = f"{self.value:.4f}" if self.value < 0.9999 or self.value == 1.0 else f"{self.value:.7f}"
        text = (
            f"threshold {shown} ({how}: a random pair of {collection} scores above it with "
            f"probability {self.pair_rate:.1e}, from {self.pairs:,} pairs; about {self.item_rate:.1e} "
            "false partners an item)"
        )
        if not self.met:
            text += (
                f"; no threshold meets {self.wanted:g} false partners an item: this model puts "
                "unrelated items at the same vector"
            )
        return text


@dataclass(frozen=True)
class DuplicateGroup:
    """``ids`` (m,) int64, the representative first; ``scores`` (m,) float32, each member's cosine
    to the representative (1.0 for it and for files of its content); ``identical``: only files of
    one content."""

    number: int
    ids: np.ndarray
    scores: np.ndarray
    identical: bool

    @property
    def representative(self) -> int:
        return int(self.ids[0])


@dataclass
class DuplicateReport:
    collection: str
    versions: dict[str, int]
    threshold: Threshold
    groups: list[DuplicateGroup]
    items: int  # live rows
    identical_files: int  # rows whose content another row also has
    capped: int  # items whose k-th neighbour still scores >= T: a group they lead may be cut
    seconds: float
    labels: dict[int, str]  # id -> path (images, absolute) or text (captions), for the members

    @property
    def members(self) -> int:
        return sum(len(g.ids) for g in self.groups)

    def table(self) -> pa.Table:
        """One row per member: ``group`` int64, ``id`` int64, ``path`` (or ``text``), ``score``."""
        groups = [np.full(len(g.ids), g.number, np.int64) for g in self.groups]
        ids = np.concatenate([g.ids for g in self.groups]) if self.groups else np.empty(0, np.int64)
        scores = np.concatenate([g.scores for g in self.groups]) if self.groups else np.empty(0, np.float32)
        label = "path" if self.collection == "images" else "text"
        return pa.table(
            {
                "group": pa.array(np.concatenate(groups) if groups else np.empty(0, np.int64)),
                "id": pa.array(ids, pa.int64()),
                label: pa.array([self.labels[int(i)] for i in ids], pa.string()),
                "score": pa.array(scores, pa.float32()),
            }
        )

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        table = self.table()
        atomic_write(out, lambda tmp: pq.write_table(table, tmp))
        return out

    def to_dict(self, limit: int = 100) -> dict[str, Any]:
        """Counts, threshold and the first ``limit`` groups with their members."""
        return {
            "collection": self.collection,
            "versions": self.versions,
            "threshold": dataclasses.asdict(self.threshold),
            "items": self.items,
            "groups": len(self.groups),
            "members": self.members,
            "identical_files": self.identical_files,
            "capped": self.capped,
            "seconds": self.seconds,
            "first_groups": [
                {
                    "group": g.number,
                    "identical": g.identical,
                    "members": [
                        {"id": int(i), "score": round(float(s), 6), "label": self.labels[int(i)]}
                        for i, s in zip(g.ids, g.scores, strict=True)
                    ],
                }
                for g in self.groups[:limit]
            ],
        }


def find_duplicates(
    retriever: Retriever,
    config: DuplicatesConfig | None = None,
    progress: Progress | None = None,
    scratch: str | Path | None = None,
) -> DuplicateReport:
    """Groups of near-duplicates of ``config.collection`` (see the module's description). The
    collection's vectors are copied into a temporary folder under ``scratch`` (default: the
    system's; N x D x 4 bytes) and removed at the end."""
    config = config or DuplicatesConfig()
    config.check()
    progress = progress or Silent()
    started = time.perf_counter()
    collection = config.collection
    ids, digests = _contents(retriever, collection)
    neighbors = NeighborsConfig(
        collection,
        collection,
        config.k,
        config.method,
        config.block_rows,
        threads=config.threads,
        distinct=True,
        seed=config.seed,
    )
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="duplicates-", dir=scratch) as folder:
        search = NeighborSearch(
            retriever.store,
            neighbors,
            Path(folder),
            retriever.index(collection) if config.method == "index" else None,  # type: ignore[arg-type]
            progress,
        )
        null = _null(search, collection, config.seed)
        threshold = _threshold(null, config, search.rows)  # contents: what the null was drawn over
        progress.start("neighbors", search.rows)
        pairs, capped = [], 0
        for block in search.blocks():
            near = block.scores >= threshold.value
            rows, cols = np.nonzero(near)
            pairs.append((block.ids[rows], block.neighbor_ids[rows, cols], block.scores[rows, cols]))
            capped += int(near[:, -1].sum()) if near.shape[1] else 0
            progress.advance(len(block.ids))
        progress.finish()
    first = np.concatenate([p[0] for p in pairs] + [np.empty(0, np.int64)])
    second = np.concatenate([p[1] for p in pairs] + [np.empty(0, np.int64)])
    score = np.concatenate([p[2] for p in pairs] + [np.empty(0, np.float32)])
    units = _units(ids, digests)
    stars = star_groups(first, second, score)
    groups = _expand(stars, units)
    labels = _labels(retriever, collection, np.concatenate([g.ids for g in groups]) if groups else None)
    return DuplicateReport(
        collection,
        search.versions,
        threshold,
        groups,
        len(ids),
        sum(len(m) for m in units.values()),
        capped,
        time.perf_counter() - started,
        labels,
    )


def star_groups(
    first: np.ndarray, second: np.ndarray, scores: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs ``first[i]``-``second[i]`` scoring ``scores[i]`` (all >= T) -> star groups, each as
    (ids with the representative first, their scores to it); see the module's description."""
    if not len(first):
        return []
    a = np.concatenate([first, second])
    b = np.concatenate([second, first])
    s = np.concatenate([scores, scores])
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    keep = np.ones(len(a), dtype=bool)
    keep[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])  # a pair found from both ends counts once
    a, b, s = a[keep], b[keep], s[keep]
    nodes, starts, degree = np.unique(a, return_index=True, return_counts=True)
    total = np.add.reduceat(s.astype(np.float64), starts)
    taken: set[int] = set()
    groups = []
    for n in np.lexsort((nodes, -total, -degree)):
        leader = int(nodes[n])
        if leader in taken:
            continue
        span = slice(starts[n], starts[n] + degree[n])
        free = np.array([int(m) not in taken for m in b[span]], dtype=bool)
        if not free.any():
            continue
        members, member_scores = b[span][free], s[span][free]
        best = np.argsort(-member_scores, kind="stable")
        members, member_scores = members[best], member_scores[best]
        taken.add(leader)
        taken.update(int(m) for m in members)
        groups.append(
            (
                np.concatenate([[leader], members]).astype(np.int64),
                np.concatenate([[1.0], member_scores]).astype(np.float32),
            )
        )
    return groups


def draw_groups(
    report: DuplicateReport, folder: str | Path, limit: int = 1_000, tiles: int = 40
) -> list[Path]:
    """A contact sheet per group (the first ``limit`` groups, ``tiles`` members each at most):
    ``<folder>/group-000001.png``, ..., each member labelled with its id, score and file name."""
    from retrieval.search.sheet import Tile, contact_sheet

    folder = Path(folder)
    written = []
    for group in report.groups[:limit]:
        shown = []
        for i, s in zip(group.ids[:tiles], group.scores[:tiles], strict=True):
            label = report.labels[int(i)]
            name = Path(label).name if report.collection == "images" else ""
            text = f"{int(i)} {float(s):.3f} {name}".rstrip()
            if report.collection == "images":
                shown.append(Tile(text, image=label))
            else:
                shown.append(Tile(text, text=label))
        more = f" (+{len(group.ids) - tiles} more)" if len(group.ids) > tiles else ""
        kind = "identical content" if group.identical else f"cosine >= {report.threshold.value:.3f}"
        title = f"group {group.number}: {len(group.ids)} {report.collection}, {kind}{more}"
        written.append(contact_sheet(shown, folder / f"group-{group.number:06d}.png", title=title))
    return written


def _contents(retriever: Retriever, collection: str) -> tuple[np.ndarray, np.ndarray]:
    """Every live row's id and content key (``content_keys`` of its sha256)."""
    id_parts, digest_parts = [], []
    for table in retriever.source(collection).scan(["id", "sha256"]):  # type: ignore[arg-type]
        id_parts.append(table.column("id").to_numpy())
        digest_parts.append(content_keys(table.column("sha256")))
    if not id_parts:
        return np.empty(0, np.int64), np.empty(0, np.uint64)
    return np.concatenate(id_parts), np.concatenate(digest_parts)


def _units(ids: np.ndarray, digests: np.ndarray) -> dict[int, np.ndarray]:
    """Rows sharing a content: smallest id -> all their ids ascending (contents of one row left out)."""
    recorded = digests != 0
    ids, digests = ids[recorded], digests[recorded]
    order = np.lexsort((ids, digests))
    ids, digests = ids[order], digests[order]
    if not len(ids):
        return {}
    starts = np.flatnonzero(np.concatenate([[True], digests[1:] != digests[:-1]]))
    sizes = np.diff(np.concatenate([starts, [len(ids)]]))
    return {int(ids[s]): ids[s : s + n] for s, n in zip(starts, sizes, strict=True) if n > 1}


def _expand(stars: list[tuple[np.ndarray, np.ndarray]], units: dict[int, np.ndarray]) -> list[DuplicateGroup]:
    """Star groups of contents -> groups of rows: each content's other files beside it, at its
    score; contents with several files and no near partner as groups of their own."""
    groups: list[tuple[np.ndarray, np.ndarray, bool]] = []
    grouped: set[int] = set()
    for members, scores in stars:
        ids, values = [], []
        for m, s in zip(members, scores, strict=True):
            copies = units.get(int(m), np.array([m], np.int64))
            ids.append(copies)
            values.append(np.full(len(copies), s, np.float32))
            grouped.add(int(m))
        groups.append((np.concatenate(ids), np.concatenate(values), False))
    for first, copies in units.items():
        if first not in grouped:
            groups.append((copies, np.ones(len(copies), np.float32), True))
    groups.sort(key=lambda g: (-len(g[0]), int(g[0][0])))
    return [DuplicateGroup(n, ids, scores, same) for n, (ids, scores, same) in enumerate(groups, start=1)]


def _null(search: NeighborSearch, collection: str, seed: int) -> ScoreNull:
    rng = np.random.default_rng(seed)
    count = len(search.targets)
    rows = np.sort(rng.choice(count, min(SAMPLE, count), replace=False))
    sample = np.ascontiguousarray(search.targets.vectors[rows], dtype=np.float32)
    return score_null(sample, sample, (collection, collection), same=True)


def _threshold(null: ScoreNull, config: DuplicatesConfig, items: int) -> Threshold:
    others = max(items - 1, 1)
    if config.threshold is not None:
        rate = float(null.survival(config.threshold))
        return Threshold(config.threshold, False, rate, rate * others, null.pairs)
    value = null.threshold(config.false_match_rate / others)
    rate = float(null.survival(value))
    return Threshold(value, True, rate, rate * others, null.pairs, config.false_match_rate)


def _labels(retriever: Retriever, collection: str, ids: np.ndarray | None) -> dict[int, str]:
    if ids is None or not len(ids):
        return {}
    ids = np.unique(ids)
    hits = retriever.hits(ids, np.ones(len(ids), np.float32), collection)  # type: ignore[arg-type]
    return {h.id: (h.path if h.path is not None else h.text or "") for h in hits}
