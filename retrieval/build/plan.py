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

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.build.caption_items import CaptionItems, CaptionPlanning, IndexedCaptions
from retrieval.build.image_items import ImageItems
from retrieval.build.items import (
    CaptionInput,
    CollectionView,
    CutItems,
    ImageInput,
    Reader,
    WorkItem,
    metadata_text,
    row_digest,
)
from retrieval.ingest.sources import (
    CaptionRecord,
    ImageFile,
    SidecarFile,
    read_caption_file,
    read_sidecar,
)
from retrieval.outcomes import Outcome, Reason
from retrieval.store.folder import Store

__all__ = [
    "CaptionInput",
    "CaptionItems",
    "CollectionPlan",
    "CollectionView",
    "ImageInput",
    "WorkItem",
    "collection_of",
    "item_sizes",
    "plan_captions",
    "plan_images",
    "plan_table",
    "read_view",
]

_VIEW_COLUMNS = {
    "images": ["id", "path", "sha256", "size", "mtime_ns"],
    "captions": ["id", "source", "row", "size", "mtime_ns"],
}
_CAPTION_CONTENT = ["id", "source", "row", "text", "image", "metadata"]  # read for changed sources


@dataclass
class CollectionPlan:
    """One collection's build: the items to encode and what changes before and beside them."""

    collection: str
    items: Sequence[WorkItem]  # ImageItems or CaptionItems: compact, an item made when taken
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
        return sum(item_sizes(self.items))


def item_sizes(items: Sequence[WorkItem]) -> list[int]:
    """How many inputs each item holds, without reading a caption plan's rows."""
    if isinstance(items, CutItems):
        return items.sizes
    return [len(item.ids) for item in items]


def collection_of(items: Sequence[WorkItem]) -> str:
    """The collection a non-empty sequence of work items belongs to."""
    return items.collection if isinstance(items, CutItems) else items[0].collection


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

    def content(sources: set[str]) -> pa.Table:
        wanted = pa.array(sorted(sources), pa.string())
        parts = [
            t.select(_CAPTION_CONTENT).filter(pc.is_in(t.column("source"), value_set=wanted))
            for _, t in store.live_rows(collection, _CAPTION_CONTENT)
        ]
        return pa.concat_tables(parts) if parts else pa.table({c: [] for c in _CAPTION_CONTENT})

    reader = content if collection == "captions" else None
    return CollectionView(state, rows, store.outcomes(collection), reserved, reader)


def plan_table(plan: CollectionPlan) -> pa.Table:
    """Each planned input with its id: what the store keeps while the plan is in progress."""
    items = plan.items
    if isinstance(items, CutItems):
        return items.table()
    return ImageItems.of(items).table()


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

    The walk is taken as a stream into columns, and compared with the indexed rows as one Arrow
    join on the path: no Python object a file is kept, so a folder of tens of millions of images
    plans in bounded memory (the walk's columns and the join, about 150 bytes a file).
    ``same_content(path, sha256)`` says whether a file whose mtime changed still has the bytes
    its row was made from (the pipeline hashes it; tests pass a fake).
    """
    found, sidecars, outcomes = _walked_columns(walked)
    state = view.state
    root_text = str(root.resolve())
    replacing = state.root not in (None, root_text)  # the pipeline refused this unless asked
    columns = {"path": ("path", pa.string()), "id": ("id", pa.int64())}
    columns |= {"old_size": ("size", pa.int64()), "old_mtime": ("mtime_ns", pa.int64())}
    indexed = pa.table({name: view.rows.column(c).cast(t) for name, (c, t) in columns.items()})
    indexed = indexed.append_column("row", pa.array(np.arange(len(indexed), dtype=np.int64)))
    joined = found.join(indexed.slice(0, 0) if replacing else indexed, keys="path", join_type="left outer")
    joined = joined.take(pc.sort_indices(joined, [("at", "ascending")]))  # back in walk order

    has_row = pc.is_valid(joined.column("id")).to_numpy(zero_copy_only=False)
    size, mtime = (joined.column(c).to_numpy() for c in ("size", "mtime_ns"))
    old_size, old_mtime = (joined.column(c).fill_null(-1).to_numpy() for c in ("old_size", "old_mtime"))
    same_size = has_row & (old_size == size)
    unchanged = same_size & (old_mtime == mtime)
    planned = ~unchanged
    stale: list[int] = [int(i) for i in view.rows.column("id").to_pylist()] if replacing else []
    restat: dict[int, tuple[int, int]] = {}
    ids = joined.column("id").fill_null(-1).to_numpy()
    rows = joined.column("row").fill_null(-1).to_numpy()
    hashes = view.rows.column("sha256")
    paths = joined.column("path")
    for k in np.flatnonzero(same_size & ~unchanged).tolist():
        if same_content(paths[k].as_py(), hashes[int(rows[k])].as_py()):
            restat[int(ids[k])] = (int(size[k]), int(mtime[k]))  # touched or copied: row and id stay
            planned[k] = False
    stale.extend(ids[planned & has_row].tolist())

    # A failure whose file has not changed since is not tried again (unless its reason is retried).
    previous = {o.source: o for o in view.outcomes if o.stage != "walk"}
    if previous:
        failed = pc.is_in(paths, value_set=pa.array(list(previous), pa.string())).to_numpy(
            zero_copy_only=False
        )
        for k in np.flatnonzero(planned & failed).tolist():
            before = previous[paths[k].as_py()]
            if (before.size, before.mtime_ns) == (int(size[k]), int(mtime[k])) and not before.code.retried:
                outcomes.append(before)
                planned[k] = False

    # Rows whose file is gone leave search, except under a folder that could not be listed this
    # time: absent is not removed.
    if not replacing:
        gone = indexed.join(found.select(["path"]), keys="path", join_type="left anti")
        unlisted = [
            "" if o.source == "." else o.source + "/" for o in outcomes if o.code is Reason.CANNOT_LIST
        ]
        keep = np.zeros(len(gone), dtype=bool)
        for prefix in unlisted:
            keep |= pc.starts_with(gone.column("path"), prefix).to_numpy(zero_copy_only=False)
        stale.extend(gone.column("id").filter(pa.array(~keep)).to_pylist())

    take = pa.array(np.flatnonzero(planned))
    items, next_id, kept = _image_items(
        paths.take(take).combine_chunks(), size[planned], mtime[planned], view, item_size
    )
    return CollectionPlan(
        "images", items, stale, restat, outcomes, next_id, root=root_text, sidecars=sidecars, kept_ids=kept
    )


_WALK_CHUNK = 65_536  # walked files gathered as Python objects before they become columns


def _walked_columns(
    walked: Iterable[ImageFile | SidecarFile | Outcome],
) -> tuple[pa.Table, list[SidecarFile], list[Outcome]]:
    """The walk's image files as a table (path, size, mtime_ns and ``at``, the walk position),
    its sidecars and its outcomes."""
    chunks: list[pa.Array] = []
    paths: list[str] = []
    sizes, mtimes = array("q"), array("q")
    sidecars: list[SidecarFile] = []
    outcomes: list[Outcome] = []
    for w in walked:
        if isinstance(w, ImageFile):
            paths.append(w.path)
            sizes.append(w.size)
            mtimes.append(w.mtime_ns)
            if len(paths) == _WALK_CHUNK:
                chunks.append(pa.array(paths, pa.string()))
                paths = []
        elif isinstance(w, SidecarFile):
            sidecars.append(w)
        else:
            outcomes.append(w)
    chunks.append(pa.array(paths, pa.string()))
    count = len(sizes)
    table = pa.table(
        {
            "path": pa.chunked_array(chunks, pa.string()),
            "size": pa.array(np.frombuffer(sizes, np.int64) if count else np.empty(0, np.int64)),
            "mtime_ns": pa.array(np.frombuffer(mtimes, np.int64) if count else np.empty(0, np.int64)),
            "at": pa.array(np.arange(count, dtype=np.int64)),
        }
    )
    return table, sidecars, outcomes


def _image_items(
    paths: pa.Array, sizes: np.ndarray, mtimes: np.ndarray, view: CollectionView, size: int
) -> tuple[ImageItems, int, int]:
    """Give each planned file its id (reserved by an earlier plan, else the next free one)."""
    next_id = view.state.next_id
    ids = np.arange(next_id, next_id + len(paths), dtype=np.int64)
    kept = 0
    if view.reserved:
        reserved = dict(view.reserved)
        ids = np.empty(len(paths), np.int64)
        for k, path in enumerate(paths.to_pylist()):
            reused = reserved.pop((path, int(sizes[k]), int(mtimes[k])), None)
            if reused is None:
                reused, next_id = next_id, next_id + 1
            else:
                kept += 1
            ids[k] = reused
        return ImageItems(paths, sizes, mtimes, ids, size), next_id, kept
    return ImageItems(paths, sizes, mtimes, ids, size), next_id + len(paths), kept


# -- captions ----------------------------------------------------------------------------------


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
    they are. The sources are read as a stream and the plan keeps 28 bytes a planned row
    (``CaptionItems``): its items read their rows again when the executor takes them.
    """
    state = view.state
    indexed = IndexedCaptions(view.rows, view.content)
    outcomes_of: dict[str, list[Outcome]] = {}
    for o in view.outcomes:
        outcomes_of.setdefault(o.parent or o.source, []).append(o)

    outcomes: list[Outcome] = []
    planning = CaptionPlanning(view, item_size, read)
    stale: list[int] = []
    present: set[str] = set()
    files = {name for name, _, image in sources if image is None}
    # Caption files span items: one is done once every item holding its rows is committed
    # (``sources``). A sidecar's rows always share an item, so its rows' stats say it is done.
    done = {k: v for k, v in state.sources.items() if k in files}
    waiting_stats: dict[str, list[int]] = {}
    checked: dict[str, list[int] | OSError] = {}
    finished: set[str] = set()
    for source, path, image in sources:
        try:
            info = path.stat()
        except OSError as e:
            checked[source] = e
            continue
        stats = checked[source] = [info.st_size, info.st_mtime_ns]
        seen = indexed.stats(source) | {(o.size, o.mtime_ns) for o in outcomes_of.get(source, [])}
        if (done.get(source) == stats) if image is None else (seen == {(stats[0], stats[1])}):
            finished.add(source)
    # What the rows of the sources to read again hold, in one pass over the table: an unchanged
    # corpus reads no text at all.
    indexed.prepare({source for source, stats in checked.items() if source not in finished})
    for source, path, image in sources:
        present.add(source)
        stats_or_error = checked[source]
        if isinstance(stats_or_error, OSError):
            why = f"cannot read: {stats_or_error.strerror or stats_or_error}"
            outcomes.append(Outcome(source, "failed", "read", why, Reason.UNREADABLE, parent=source))
            stale.extend(indexed.ids(source))
            done.pop(source, None)
            continue
        stats = stats_or_error
        if source in finished:
            outcomes.extend(outcomes_of.get(source, []))
            continue
        done.pop(source, None)
        existing = indexed.rows(source)  # row -> (id, digest), in row order
        kept: set[int] = set()
        before = planning.count
        for record in read(path, source, image):
            if isinstance(record, Outcome):
                outcomes.append(replace(record, size=stats[0], mtime_ns=stats[1], parent=source))
                continue
            digest = row_digest(record.text, record.image, metadata_text(record.metadata))
            old = existing.get(record.row)
            if old is not None and old[1] == digest:
                kept.add(record.row)  # the same row as indexed: it keeps its id
                continue
            planning.add(source, path, image, stats, record.row, digest)
        stale.extend(i for row, (i, _) in existing.items() if row not in kept)
        if image is not None:
            continue
        if planning.count > before:
            waiting_stats[source] = stats
        else:
            done[source] = stats
    known = {*indexed.sources, *state.sources, *(o.parent or o.source for o in view.outcomes)}
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
    stale.extend(i for source in indexed.sources if source not in present for i in indexed.ids(source))

    items = planning.items()
    waiting = {source: (items.numbers_of(source), stats) for source, stats in waiting_stats.items()}
    return CollectionPlan(
        "captions",
        items,
        stale,
        {},
        outcomes,
        planning.next_id,
        sources=done,
        waiting=waiting,
        kept_ids=planning.kept,
    )


def _plan_key(collection: str, entry: dict[str, Any]) -> tuple[Any, ...]:
    if collection == "images":
        return (entry["path"], entry["size"], entry["mtime_ns"])
    return (entry["source"], entry["row"], entry["digest"])
