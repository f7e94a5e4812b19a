"""The planner: what a build must do, from the inputs and what the store already holds. No model.

``plan_images`` and ``plan_captions`` compare the walked inputs with a ``CollectionView`` (the
collection's live rows, outcomes and reserved ids, read by ``read_view``) and return a
``CollectionPlan``: the work items to encode, each input with its id, plus the rows that leave
search, the rows whose file stats change (touched, same bytes), and the outcomes known already.

Ids are assigned here, once. A new input takes the next free id; an input that an earlier build
planned but did not commit (it was stopped or killed) takes the id it was planned with, so work
items may complete and commit in any order and a rerun still ends with the ids of a build that
was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from retrieval.ingest.sources import (
    CaptionRecord,
    ImageFile,
    SidecarFile,
    read_caption_file,
    read_sidecar,
)
from retrieval.outcomes import Outcome, Reason
from retrieval.store.folder import Store
from retrieval.store.manifest import CollectionState

__all__ = [
    "CaptionInput",
    "CollectionPlan",
    "CollectionView",
    "ImageInput",
    "WorkItem",
    "plan_captions",
    "plan_images",
    "plan_table",
    "read_view",
]

_VIEW_COLUMNS = {
    "images": ["id", "path", "sha256", "size", "mtime_ns"],
    "captions": ["id", "source", "row", "text", "image", "metadata", "size", "mtime_ns"],
}


@dataclass(frozen=True)
class ImageInput:
    """An image file to decode and encode."""

    path: str  # relative to the root
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.path, self.size, self.mtime_ns)


@dataclass(frozen=True)
class CaptionInput:
    """A caption to encode: the record as read, its metadata as stored, its source's stats."""

    record: CaptionRecord
    metadata: str  # JSON, keys sorted
    size: int
    mtime_ns: int

    @property
    def sha256(self) -> str:
        """Of the text alone: identical captions share a vector."""
        return hashlib.sha256(self.record.text.encode()).hexdigest()

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            self.record.source,
            self.record.row,
            _digest(self.record.text, self.record.image, self.metadata),
        )


Input = ImageInput | CaptionInput


@dataclass(frozen=True)
class WorkItem:
    """Inputs encoded and committed together (one shard), each with its pre-assigned id."""

    collection: str
    number: int
    ids: tuple[int, ...]
    inputs: tuple[Input, ...]


@dataclass(frozen=True)
class CollectionView:
    """What the planner reads of one collection (``read_view``)."""

    state: CollectionState
    rows: pa.Table  # live rows, the planner's columns
    outcomes: list[Outcome]
    reserved: dict[tuple[Any, ...], int]  # inputs an earlier plan gave ids that no shard holds yet


@dataclass
class CollectionPlan:
    """One collection's build: the items to encode and what changes before and beside them."""

    collection: str
    items: list[WorkItem]
    deleted: list[int]  # ids leaving search: inputs gone or changed (committed before any item)
    restat: dict[int, tuple[int, int]]  # id -> new (size, mtime_ns): touched files, same content
    outcomes: list[Outcome]  # skipped and failed inputs known before encoding
    next_id: int  # the collection's next free id once this plan is committed
    root: str | None = None  # images: the folder paths are relative to
    sources: dict[str, list[int]] = field(default_factory=dict)  # caption sources done, with stats
    # Caption sources whose rows are in items: done once all these items are committed.
    waiting: dict[str, tuple[set[int], list[int]]] = field(default_factory=dict)
    sidecars: list[SidecarFile] = field(default_factory=list)  # found by the image walk
    kept_ids: int = 0  # inputs that kept the id an earlier, unfinished plan gave them

    @property
    def planned(self) -> int:
        return sum(len(item.ids) for item in self.items)


def read_view(store: Store, collection: str) -> CollectionView:
    """The live rows, outcomes and reserved ids of ``collection`` as the planner needs them."""
    state = store.state(collection)
    columns = _VIEW_COLUMNS[collection]
    tables = [t.select(columns) for _, t in store.live_rows(collection, columns)]
    rows = pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})
    reserved: dict[tuple[Any, ...], int] = {}
    if state.plan is not None:
        used = np.concatenate(
            [
                np.empty(0, np.int64),
                *(t.column("id").to_numpy() for _, t in store.iter_shards(collection, ["id"])),
            ]
        )
        planned = store.read_table(state.plan.file)
        keep = ~np.isin(planned.column("id").to_numpy(), used)
        for entry in planned.filter(pa.array(keep)).to_pylist():
            reserved[_plan_key(collection, entry)] = int(entry["id"])
    return CollectionView(state, rows, store.outcomes(collection), reserved)


def plan_table(plan: CollectionPlan) -> pa.Table:
    """Each planned input with its id: what the store keeps while the plan is in progress."""
    ids = [i for item in plan.items for i in item.ids]
    inputs = [x for item in plan.items for x in item.inputs]
    if plan.collection == "images":
        columns: dict[str, Any] = {
            "path": [x.path for x in inputs if isinstance(x, ImageInput)],
            "size": [x.size for x in inputs],
            "mtime_ns": [x.mtime_ns for x in inputs],
        }
    else:
        columns = {
            "source": [x.record.source for x in inputs if isinstance(x, CaptionInput)],
            "row": [x.record.row for x in inputs if isinstance(x, CaptionInput)],
            "digest": [x.key[2] for x in inputs if isinstance(x, CaptionInput)],
        }
    return pa.table({"id": pa.array(ids, pa.int64()), **columns})


# -- images ------------------------------------------------------------------------------------


def plan_images(
    walked: Iterable[ImageFile | SidecarFile | Outcome],
    root: Path,
    view: CollectionView,
    *,
    item_size: int,
    same_content: Callable[[str, str], bool],
) -> CollectionPlan:
    """Plan an image folder against ``view``.

    ``same_content(path, sha256)`` says whether a file whose mtime changed still has the bytes
    its row was made from (the pipeline hashes it; tests pass a fake).
    """
    files: list[ImageFile] = []
    sidecars: list[SidecarFile] = []
    outcomes: list[Outcome] = []
    for w in walked:
        if isinstance(w, ImageFile):
            files.append(w)
        elif isinstance(w, SidecarFile):
            sidecars.append(w)
        else:
            outcomes.append(w)
    state = view.state
    root_text = str(root.resolve())
    replacing = state.root not in (None, root_text)  # the pipeline refused this unless asked
    columns = (view.rows.column(c).to_pylist() for c in ("path", "id", "sha256", "size", "mtime_ns"))
    current = {} if replacing else {p: (i, h, s, m) for p, i, h, s, m in zip(*columns, strict=True)}
    previous = {o.source: o for o in view.outcomes if o.stage != "walk"}

    planned: list[ImageInput] = []
    stale: list[int] = [int(i) for i in view.rows.column("id").to_pylist()] if replacing else []
    restat: dict[int, tuple[int, int]] = {}
    seen = set()
    for f in files:
        seen.add(f.path)
        row = current.get(f.path)
        if row is not None and (row[2], row[3]) == (f.size, f.mtime_ns):
            continue
        if row is not None and row[2] == f.size and same_content(f.path, row[1]):
            restat[row[0]] = (f.size, f.mtime_ns)  # touched or copied over: the row and id stay
            continue
        if row is not None:
            stale.append(row[0])
        before = previous.get(f.path)
        if (
            before is not None
            and (before.size, before.mtime_ns) == (f.size, f.mtime_ns)
            and not before.code.retried
        ):
            outcomes.append(before)  # its content failed and has not changed: not tried again
            continue
        planned.append(ImageInput(f.path, f.size, f.mtime_ns))
    # A folder that could not be listed this time keeps its rows: absent is not removed.
    unlisted = tuple(
        "" if o.source == "." else o.source + "/" for o in outcomes if o.code is Reason.CANNOT_LIST
    )
    kept_away = unlisted or ("\0",)
    stale.extend(i for p, (i, *_) in current.items() if p not in seen and not p.startswith(kept_away))

    items, next_id, kept = _items("images", planned, view, item_size)
    return CollectionPlan(
        "images", items, stale, restat, outcomes, next_id, root=root_text, sidecars=sidecars, kept_ids=kept
    )


# -- captions ----------------------------------------------------------------------------------


Reader = Callable[[Path, str, str | None], Iterable[CaptionRecord | Outcome]]


def read_source(path: Path, source: str, image: str | None) -> Iterator[CaptionRecord | Outcome]:
    """A sidecar (``image`` given) or a caption file, as records and outcomes."""
    return read_sidecar(path, source, image) if image is not None else read_caption_file(path, source)


def plan_captions(
    sources: Sequence[tuple[str, Path, str | None]],
    view: CollectionView,
    *,
    item_size: int,
    keep_sidecars: bool,
    keep_files: bool,
    read: Reader = read_source,
) -> CollectionPlan:
    """Plan caption sources (``(name, path, image)``: a sidecar names its image) against ``view``.

    A row that reads as it was indexed keeps its id; a changed, new or moved row is planned and
    the row it replaces leaves search. ``keep_sidecars`` / ``keep_files``: a run without an image
    folder (or without caption files) leaves those sources' rows, outcomes and completion as
    they are.
    """
    state = view.state
    rows_of: dict[str, dict[int, tuple[int, tuple[Any, ...]]]] = {}
    stats_of: dict[str, set[tuple[int, int]]] = {}  # the file stats each source's rows were read with
    columns = ("id", "source", "row", "text", "image", "metadata", "size", "mtime_ns")
    for i, source, row, text, image, metadata, size, mtime in zip(
        *(view.rows.column(c).to_pylist() for c in columns), strict=True
    ):
        rows_of.setdefault(source, {})[row] = (i, (text, image, metadata))
        stats_of.setdefault(source, set()).add((size, mtime))
    outcomes_of: dict[str, list[Outcome]] = {}
    for o in view.outcomes:
        outcomes_of.setdefault(o.parent or o.source, []).append(o)

    outcomes: list[Outcome] = []
    planned: list[CaptionInput] = []
    stale: list[int] = []
    present: set[str] = set()
    files = {name for name, _, image in sources if image is None}
    # Caption files span items: one is done once every item holding its rows is committed
    # (``sources``). A sidecar's rows always share an item, so its rows' stats say it is done.
    done = {k: v for k, v in state.sources.items() if k in files}
    last_of: dict[str, tuple[int, list[int]]] = {}  # caption file -> (its last planned position, stats)
    for source, path, image in sources:
        present.add(source)
        existing = rows_of.get(source, {})
        try:
            info = path.stat()
        except OSError as e:
            why = f"cannot read: {e.strerror or e}"
            outcomes.append(Outcome(source, "failed", "read", why, Reason.UNREADABLE, parent=source))
            stale.extend(i for i, _ in existing.values())
            done.pop(source, None)
            continue
        stats = [info.st_size, info.st_mtime_ns]
        seen = stats_of.get(source, set()) | {(o.size, o.mtime_ns) for o in outcomes_of.get(source, [])}
        finished = done.get(source) == stats if image is None else seen == {(stats[0], stats[1])}
        if finished:
            outcomes.extend(outcomes_of.get(source, []))
            continue
        done.pop(source, None)
        kept: set[int] = set()
        for record in read(path, source, image):
            if isinstance(record, Outcome):
                outcomes.append(replace(record, size=stats[0], mtime_ns=stats[1], parent=source))
                continue
            metadata = json.dumps(record.metadata, sort_keys=True, ensure_ascii=False, default=str)
            old = existing.get(record.row)
            if old is not None and old[1] == (record.text, record.image, metadata):
                kept.add(record.row)  # the same row as indexed: it keeps its id
                continue
            planned.append(CaptionInput(record, metadata, stats[0], stats[1]))
        stale.extend(i for row, (i, _) in existing.items() if row not in kept)
        if image is not None:
            continue
        if planned and planned[-1].record.source == source:
            last_of[source] = (len(planned) - 1, stats)
        else:
            done[source] = stats
    known = {*rows_of, *state.sources, *(o.parent or o.source for o in view.outcomes)}
    carried = {
        source
        for source in known
        if source not in present
        and (
            (keep_sidecars and not Path(source).is_absolute()) or (keep_files and Path(source).is_absolute())
        )
    }
    present |= carried
    outcomes.extend(o for source in carried for o in outcomes_of.get(source, []))
    done.update({k: v for k, v in state.sources.items() if k in carried and Path(k).is_absolute()})
    stale.extend(i for source, rows in rows_of.items() if source not in present for i, _ in rows.values())

    # A sidecar's rows stay together in one item; a caption file's may be cut anywhere.
    units = [
        k == 0 or x.record.image is None or x.record.source != planned[k - 1].record.source
        for k, x in enumerate(planned)
    ]
    items, next_id, kept_ids = _items("captions", planned, view, item_size, units)
    item_of = [item.number for item in items for _ in item.ids]
    waiting: dict[str, tuple[set[int], list[int]]] = {}
    for position, planned_input in enumerate(planned):
        source = planned_input.record.source
        if source in last_of:
            waiting.setdefault(source, (set(), last_of[source][1]))[0].add(item_of[position])
    return CollectionPlan(
        "captions", items, stale, {}, outcomes, next_id, sources=done, waiting=waiting, kept_ids=kept_ids
    )


# -- ids and items -------------------------------------------------------------------------------


def _items(
    collection: str,
    planned: Sequence[Input],
    view: CollectionView,
    size: int,
    starts: Sequence[bool] | None = None,
) -> tuple[list[WorkItem], int, int]:
    """Give each planned input its id (reserved earlier, else the next free one) and cut items of
    ``size`` inputs, only where ``starts`` allows (an item may grow past ``size`` to keep a unit whole)."""
    reserved = dict(view.reserved)
    next_id = view.state.next_id
    ids, kept = [], 0
    for x in planned:
        reused = reserved.pop(x.key, None)
        if reused is None:
            reused, next_id = next_id, next_id + 1
        else:
            kept += 1
        ids.append(reused)
    cuts = [0]
    for k in range(1, len(planned)):
        if k - cuts[-1] >= size and (starts is None or starts[k]):
            cuts.append(k)
    bounds = list(zip(cuts, [*cuts[1:], len(planned)], strict=True)) if planned else []
    items = [
        WorkItem(collection, number, tuple(ids[a:b]), tuple(planned[a:b]))
        for number, (a, b) in enumerate(bounds)
    ]
    return items, next_id, kept


def _plan_key(collection: str, entry: dict[str, Any]) -> tuple[Any, ...]:
    if collection == "images":
        return (entry["path"], entry["size"], entry["mtime_ns"])
    return (entry["source"], entry["row"], entry["digest"])


def _digest(text: str, image: str | None, metadata: str) -> str:
    return hashlib.sha256(json.dumps([text, image, metadata]).encode()).hexdigest()
