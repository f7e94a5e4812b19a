"""The build's parts on their own, without a model: the planner, the committer, their ids."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from retrieval.build.commit import Committer, Target
from retrieval.build.execute import ItemResult
from retrieval.build.image_items import ImageItems
from retrieval.build.plan import (
    CaptionInput,
    CaptionItems,
    CollectionView,
    ImageInput,
    WorkItem,
    plan_captions,
    plan_images,
    plan_table,
    read_source,
    read_view,
)
from retrieval.errors import InputError
from retrieval.ingest.sources import ImageFile
from retrieval.model.fingerprint import ModelFingerprint
from retrieval.outcomes import Outcome, Reason
from retrieval.store.folder import Store
from retrieval.store.manifest import CollectionState
from retrieval.store.schema import ImageRow

DIM = 4
MODEL = {"fingerprint": ModelFingerprint("0" * 64, "text", "vision", "tokenizer", "pixels", DIM).to_dict()}


def empty_view(next_id: int = 0) -> CollectionView:
    rows = pa.table(
        {
            c: pa.array([], t)
            for c, t in [
                ("id", pa.int64()),
                ("path", pa.string()),
                ("sha256", pa.string()),
                ("size", pa.int64()),
                ("mtime_ns", pa.int64()),
            ]
        }
    )
    return CollectionView(CollectionState(next_id=next_id), rows, [], {})


def files(n: int) -> list[ImageFile]:
    return [ImageFile(f"{i:03d}.png", 100 + i, 1_000 + i) for i in range(n)]


def never(path: str, sha: str) -> bool:
    raise AssertionError("nothing here needs hashing")


def test_the_planner_numbers_inputs_in_walk_order_and_cuts_items(tmp_path: Path) -> None:
    plan = plan_images(files(10), tmp_path, empty_view(next_id=7), item_size=4, same_content=never)
    assert [item.ids for item in plan.items] == [(7, 8, 9, 10), (11, 12, 13, 14), (15, 16)]
    assert [x.path for x in plan.items[0].inputs] == ["000.png", "001.png", "002.png", "003.png"]
    assert plan.next_id == 17 and plan.planned == 10 and plan.deleted == [] and plan.kept_ids == 0


def test_the_planner_keeps_unchanged_rows_refreshes_touched_ones_and_deletes_the_rest(tmp_path: Path) -> None:
    rows = pa.table(
        {
            "id": [0, 1, 2, 3],
            "path": ["a.png", "b.png", "c.png", "gone.png"],
            "sha256": ["sa", "sb", "sc", "sg"],
            "size": [10, 20, 30, 40],
            "mtime_ns": [1, 2, 3, 4],
        }
    )
    state = CollectionState(next_id=4, root=str(tmp_path.resolve()))
    view = CollectionView(state, rows, [], {})
    walked = [
        ImageFile("a.png", 10, 1),  # unchanged
        ImageFile("b.png", 20, 99),  # touched: same size, same bytes
        ImageFile("c.png", 30, 99),  # same size, other bytes
        ImageFile("new.png", 50, 5),
    ]
    hashed = []

    def same(path: str, sha: str) -> bool:
        hashed.append(path)
        return (path, sha) == ("b.png", "sb")

    plan = plan_images(walked, tmp_path, view, item_size=10, same_content=same)
    assert hashed == ["b.png", "c.png"]
    assert plan.restat == {1: (20, 99)}
    assert sorted(plan.deleted) == [2, 3]  # c changed, gone.png went
    assert [(x.path, i) for item in plan.items for x, i in zip(item.inputs, item.ids, strict=True)] == [
        ("c.png", 4),
        ("new.png", 5),
    ]


def test_a_large_walk_is_planned_in_walk_order_against_the_indexed_rows(tmp_path: Path) -> None:
    # More files than one chunk of the walk's columns, in folders whose walk order is not the
    # paths' string order ("a/..." is walked before "a-b/..."): ids follow the walk.
    walked = [ImageFile(f"a/{i:06d}.png", 10, i) for i in range(40_000)]
    walked += [ImageFile(f"a-b/{i:06d}.png", 10, i) for i in range(40_000)]
    indexed = walked[::2]  # every other file is indexed already, unchanged
    rows = pa.table(
        {
            "id": list(range(len(indexed))),
            "path": [f.path for f in indexed],
            "sha256": ["s"] * len(indexed),
            "size": [10] * len(indexed),
            "mtime_ns": [f.mtime_ns for f in indexed],
        }
    )
    state = CollectionState(next_id=len(indexed), root=str(tmp_path.resolve()))
    plan = plan_images(
        walked, tmp_path, CollectionView(state, rows, [], {}), item_size=4096, same_content=never
    )
    assert plan.deleted == [] and plan.restat == {}
    assert plan.planned == 40_000 and len(plan.items) == 10
    planned = [(i, x.path) for item in plan.items for i, x in zip(item.ids, item.inputs, strict=True)]
    assert planned == [(len(indexed) + k, f.path) for k, f in enumerate(walked[1::2])]
    assert plan_table(plan).column("path").to_pylist() == [f.path for f in walked[1::2]]


def test_rows_under_a_folder_that_could_not_be_listed_stay(tmp_path: Path) -> None:
    rows = pa.table(
        {
            "id": [0, 1, 2],
            "path": ["locked/a.png", "open/b.png", "lockedness/c.png"],
            "sha256": ["sa", "sb", "sc"],
            "size": [1, 2, 3],
            "mtime_ns": [1, 2, 3],
        }
    )
    state = CollectionState(next_id=3, root=str(tmp_path.resolve()))
    unlisted = Outcome("locked", "failed", "walk", "cannot list folder", Reason.CANNOT_LIST)
    plan = plan_images(
        [unlisted], tmp_path, CollectionView(state, rows, [], {}), item_size=4, same_content=never
    )
    assert sorted(plan.deleted) == [1, 2]  # "lockedness/" is not under "locked/"
    assert plan.outcomes == [unlisted] and plan.planned == 0


def test_compact_image_items_keep_the_numbers_of_items_given_as_objects() -> None:
    items = [
        WorkItem("images", 5, (50, 51), (ImageInput("x.png", 1, 2), ImageInput("y.png", 3, 4))),
        WorkItem("images", 2, (20,), (ImageInput("z.png", 5, 6),)),
    ]
    compact = ImageItems.of(items)
    assert list(compact) == items and compact.sizes == [2, 1]
    assert compact.place(2) == (1, 0) and compact.input(1) == ImageInput("y.png", 3, 4)
    files = pickle.loads(pickle.dumps(compact.files()))  # as decoding workers receive them
    assert [files[k] for k in range(len(files))] == [
        ImageFile("x.png", 1, 2),
        ImageFile("y.png", 3, 4),
        ImageFile("z.png", 5, 6),
    ]


def test_failures_are_retried_by_their_reason_code_not_their_wording(tmp_path: Path) -> None:
    failed = [
        Outcome("slow.png", "failed", "decode", "took long", Reason.TIMEOUT, 1, 1),
        Outcome("bad.png", "failed", "decode", "cannot read: whatever the words", Reason.UNDECODABLE, 2, 2),
        Outcome("locked.png", "failed", "decode", "no such words", Reason.UNREADABLE, 3, 3),
    ]
    view = CollectionView(empty_view().state, empty_view().rows, failed, {})
    walked = [ImageFile("slow.png", 1, 1), ImageFile("bad.png", 2, 2), ImageFile("locked.png", 3, 3)]
    plan = plan_images(walked, tmp_path, view, item_size=10, same_content=never)
    assert sorted(x.path for item in plan.items for x in item.inputs) == ["locked.png", "slow.png"]
    assert [o.source for o in plan.outcomes] == ["bad.png"]  # the content failed and did not change


def test_caption_rows_keep_their_ids_where_they_read_the_same(tmp_path: Path) -> None:
    source = tmp_path / "c.txt"
    source.write_text("one\ntwo\nthree\n")
    rows = pa.table(
        {
            "id": [0, 1, 2],
            "source": [str(source)] * 3,
            "row": [0, 1, 2],
            "text": ["one", "TWO", "three"],
            "image": [None, None, None],
            "metadata": ["{}"] * 3,
            "size": [14] * 3,
            "mtime_ns": [1] * 3,
        }
    )
    view = CollectionView(CollectionState(next_id=3), rows, [], {})
    plan = plan_captions(
        [(str(source), source, None)], view, item_size=10, keep_sidecars=True, keep_files=False
    )
    assert plan.deleted == [1]
    assert [
        (x.record.text, i) for item in plan.items for x, i in zip(item.inputs, item.ids, strict=True)
    ] == [("two", 3)]
    assert set(plan.waiting) == {str(source)}


def test_a_sidecar_stays_in_one_item_and_is_done_by_its_rows(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    for name in names:
        (tmp_path / f"{name}.txt").write_text("".join(f"{name} caption {k}\n" for k in range(5)))
    sources = [(f"{n}.txt", tmp_path / f"{n}.txt", f"{n}.png") for n in names]
    empty = pa.table(
        {
            c: pa.array([], t)
            for c, t in [
                ("id", pa.int64()),
                ("source", pa.string()),
                ("row", pa.int64()),
                ("text", pa.string()),
                ("image", pa.string()),
                ("metadata", pa.string()),
                ("size", pa.int64()),
                ("mtime_ns", pa.int64()),
            ]
        }
    )
    view = CollectionView(CollectionState(), empty, [], {})
    plan = plan_captions(sources, view, item_size=4, keep_sidecars=False, keep_files=True)
    # Items of at least 4 rows, cut only between sidecars: 5 + 5 + 5 rows.
    assert [len(item.ids) for item in plan.items] == [5, 5, 5]
    assert plan.waiting == {} and plan.sources == {}  # sidecars are not tracked in the counters
    stats = (tmp_path / "a.txt").stat()
    rows = pa.table(
        {
            "id": list(range(5)),
            "source": ["a.txt"] * 5,
            "row": list(range(5)),
            "text": [f"a caption {k}" for k in range(5)],
            "image": ["a.png"] * 5,
            "metadata": ["{}"] * 5,
            "size": [stats.st_size] * 5,
            "mtime_ns": [stats.st_mtime_ns] * 5,
        }
    )
    read: list[str] = []

    def reader(path: Path, source: str, image: str | None) -> list:  # type: ignore[type-arg]
        read.append(source)
        return list(read_source(path, source, image))

    again = plan_captions(
        sources,
        CollectionView(CollectionState(next_id=5), rows, [], {}),
        item_size=4,
        keep_sidecars=False,
        keep_files=True,
        read=reader,
    )
    assert read == ["b.txt", "c.txt"]  # a.txt's rows carry its current stats: not read again
    assert [i for item in again.items for i in item.ids] == list(range(5, 15))


def caption_view(next_id: int = 0) -> CollectionView:
    columns = [("id", pa.int64()), ("source", pa.string()), ("row", pa.int64()), ("text", pa.string())]
    columns += [("image", pa.string()), ("metadata", pa.string()), ("size", pa.int64())]
    columns += [("mtime_ns", pa.int64())]
    return CollectionView(
        CollectionState(next_id=next_id), pa.table({c: pa.array([], t) for c, t in columns}), [], {}
    )


def test_a_caption_plan_holds_ids_and_row_numbers_and_reads_its_rows_when_taken(tmp_path: Path) -> None:
    source = tmp_path / "c.csv"
    source.write_text("caption,n\n" + "".join(f"caption {k},{k}\n" for k in range(10)))
    plan = plan_captions(
        [(str(source), source, None)], caption_view(3), item_size=4, keep_sidecars=True, keep_files=False
    )
    assert isinstance(plan.items, CaptionItems) and plan.items.sizes == [4, 4, 2] and plan.planned == 10
    assert plan.items.ids.dtype == np.int64 and plan.items.rows.tolist() == list(range(10))
    taken = list(plan.items)
    assert [item.ids for item in taken] == [(3, 4, 5, 6), (7, 8, 9, 10), (11, 12)]
    texts = [x.record.text for item in taken for x in item.inputs if isinstance(x, CaptionInput)]
    assert texts == [f"caption {k}" for k in range(10)]
    assert plan.items[1].ids == (7, 8, 9, 10) and plan.waiting[str(source)][0] == {0, 1, 2}
    table = plan_table(plan)
    assert table.column("id").to_pylist() == list(range(3, 13)) and table.column("digest").type == pa.int64()


def test_a_caption_file_changed_after_planning_is_refused_not_misread(tmp_path: Path) -> None:
    source = tmp_path / "c.txt"
    source.write_text("".join(f"line {k}\n" for k in range(6)))
    plan = plan_captions(
        [(str(source), source, None)], caption_view(), item_size=2, keep_sidecars=True, keep_files=False
    )
    items = iter(plan.items)
    assert [x.record.text for x in next(items).inputs if isinstance(x, CaptionInput)] == ["line 0", "line 1"]
    source.write_text("another\n" + source.read_text())  # a line inserted above: every row moves
    with pytest.raises(InputError, match="changed while it was being indexed"):
        list(plan.items)


def test_planning_reads_the_text_of_changed_sources_only_and_in_one_pass(tmp_path: Path) -> None:
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("a\nb\n")
    two.write_text("c\nd\n")
    stats = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in (one, two)}
    columns = {"id": [0, 1, 2, 3], "source": [str(one)] * 2 + [str(two)] * 2, "row": [0, 1, 0, 1]}
    columns |= {"size": [stats[str(one)][0]] * 2 + [stats[str(two)][0]] * 2}
    columns |= {"mtime_ns": [stats[str(one)][1]] * 2 + [stats[str(two)][1]] * 2}
    rows = pa.table(columns)  # no text: what the rows read comes from ``content`` when needed
    asked: list[set[str]] = []

    def content(sources: set[str]) -> pa.Table:
        asked.append(set(sources))
        table = rows.append_column("text", pa.array(["a", "b", "c", "d"]))
        table = table.append_column("image", pa.array([None] * 4, pa.string()))
        return table.append_column("metadata", pa.array(["{}"] * 4)).select(
            ["id", "source", "row", "text", "image", "metadata"]
        )

    state = CollectionState(next_id=4, sources=stats)
    view = CollectionView(state, rows, [], {}, content)
    files = [(str(p), p, None) for p in (one, two)]
    plan = plan_captions(files, view, item_size=10, keep_sidecars=True, keep_files=False)
    assert asked == [] and len(plan.items) == 0 and plan.deleted == []  # unchanged: no text read
    two.write_text("c\nD\n")
    plan = plan_captions(files, view, item_size=10, keep_sidecars=True, keep_files=False)
    assert asked == [{str(two)}]  # one pass, for the changed file only
    assert plan.deleted == [3] and [x.record.text for x in plan.items[0].inputs] == ["D"]


def result_for(item: WorkItem, failing: str = "007.png") -> ItemResult:
    """What an executor would return for an image item: a row per input (``failing`` fails)."""
    result = ItemResult(item, complete=True)
    for i, x in zip(item.ids, item.inputs, strict=True):
        assert isinstance(x, ImageInput)
        if x.path == failing:
            result.outcomes.append(
                Outcome(x.path, "failed", "decode", "bad", Reason.UNDECODABLE, x.size, x.mtime_ns)
            )
            continue
        vector = np.zeros(DIM, dtype=np.float32)
        vector[i % DIM] = 1.0
        result.ids.append(i)
        result.rows.append(ImageRow(x.path, f"sha-{x.path}", x.size, x.mtime_ns, 8, 8))
        result.vectors.append(vector)
        result.encoded += 1
    return result


def committed_rows(folder: Path) -> list[tuple[int, str]]:
    with Store.open(folder, write=True) as store:
        view = store.viewing(store.manifest)
        rows = [t for _, t in view.live_rows("images", ["id", "path"])]
    table = pa.concat_tables(rows).sort_by("id")
    return list(zip(table.column("id").to_pylist(), table.column("path").to_pylist(), strict=True))


def run_items(folder: Path, images: Path, order: list[int], stop_after: int | None = None) -> None:
    with Store.open(folder, write=True) as store:
        target = Target(store, MODEL, rebuild=False)
        plan = plan_images(
            files(10), images, read_view(target.view(), "images"), item_size=3, same_content=never
        )
        committer = Committer(target)
        committer.begin(plan)
        by_number = {item.number: item for item in plan.items}
        for count, number in enumerate(order):
            if number not in by_number:
                continue
            if stop_after is not None and count == stop_after:
                return  # killed: the rest is never committed
            committer.add(result_for(by_number[number]))
        committer.end("images")


@pytest.mark.parametrize("order", [[3, 1, 0, 2], [2, 3, 0, 1]])
def test_results_committed_in_any_order_keep_the_planned_ids(tmp_path: Path, order: list[int]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    run_items(tmp_path / "in-order", images, [0, 1, 2, 3])
    run_items(tmp_path / "shuffled", images, order)
    assert committed_rows(tmp_path / "shuffled") == committed_rows(tmp_path / "in-order")
    assert len(committed_rows(tmp_path / "in-order")) == 9  # one input of item 2 failed


def test_a_build_killed_between_out_of_order_commits_resumes_with_the_planned_ids(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    run_items(tmp_path / "clean", images, [0, 1, 2, 3])
    killed = tmp_path / "killed"
    run_items(killed, images, [3, 1, 0, 2], stop_after=2)  # items 3 and 1 committed, then killed
    partial = committed_rows(killed)
    assert [i for i, _ in partial] == [3, 4, 5, 9]
    with Store.open(killed, write=True) as store:
        view = read_view(store.viewing(store.manifest), "images")
        assert len(view.reserved) == 6  # items 0 and 2, planned and not committed
        plan = plan_images(files(10), images, view, item_size=3, same_content=never)
        assert plan.kept_ids == 6 and [x.path for item in plan.items for x in item.inputs][:1] == ["000.png"]
    run_items(killed, images, [0, 1])  # the rerun's own items: the planned ones left over
    assert committed_rows(killed) == committed_rows(tmp_path / "clean")
