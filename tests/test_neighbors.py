"""Whole-collection neighbours and near-duplicate groups, each against a numpy oracle."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from stores import seeded_store

from retrieval import BuildConfig, ModelSpec, Retriever, Store, StoreError, build_index
from retrieval.ann.calibration import score_null
from retrieval.ann.exact import recall_at
from retrieval.ann.faiss_index import IndexConfig, build_collection_index
from retrieval.search.duplicates import DuplicatesConfig, find_duplicates, star_groups
from retrieval.search.neighbors import NeighborsConfig, read_neighbors_metadata, write_neighbors

DATA = Path(__file__).resolve().parents[1] / "data" / "images"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim))
    return unit(centres[rng.integers(0, 30, n)] + 0.8 * rng.normal(size=(n, dim)))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """2,500 clustered vectors, ids 5, 8, 11, ... in shards of 400, an IVF index over them."""
    vectors = clustered(2_500, 24, seed=3)
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 5
    folder = seeded_store(
        tmp_path_factory.mktemp("seeded") / "index", vectors, ids=ids, shard_rows=400, kind="ivf"
    )
    return folder, vectors, ids


def oracle(vectors: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row's top-k among the others by a full score matrix."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, 1)


def read_lists(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    return (
        table.column("id").to_numpy(),
        np.array(table.column("neighbor_ids").to_pylist()),
        np.array(table.column("scores").to_pylist(), dtype=np.float32),
    )


def test_exact_neighbors_are_numpys(seeded: tuple, tmp_path: Path) -> None:
    folder, vectors, ids = seeded
    with Retriever.open(folder) as retriever:
        report = write_neighbors(retriever, tmp_path / "knn.parquet", NeighborsConfig(k=15, block_rows=700))
        version = retriever.store.state("images").version
        blocks = list(retriever.neighbors(k=15, block_rows=1_000))
    assert (report.rows, report.blocks, report.resumed_blocks, report.recall) == (2_500, 4, 0, None)
    assert not (tmp_path / "knn.parquet.parts").exists()  # the checkpoints go once the file is whole
    got_ids, got, got_scores = read_lists(tmp_path / "knn.parquet")
    np.testing.assert_array_equal(got_ids, ids)  # one row per item, by id
    truth, truth_scores = oracle(vectors, ids, 15)
    np.testing.assert_allclose(got_scores, truth_scores, atol=1e-5)
    # Each listed neighbour really scores what is listed (so equal scores mean the same top-k, ties
    # aside), and an item is never its own neighbour.
    position = {int(i): p for p, i in enumerate(ids)}
    actual = np.einsum("nd,nkd->nk", vectors, vectors[np.vectorize(position.get)(got)])
    np.testing.assert_allclose(got_scores, actual, atol=1e-5)
    assert not (got == ids[:, None]).any()
    assert recall_at(got, truth) > 0.999
    assert read_neighbors_metadata(tmp_path / "knn.parquet") | {"fingerprint": None} == {
        "source": "images",
        "target": "images",
        "k": 15,
        "method": "exact",
        "distinct": False,
        "versions": {"images": version},
        "fingerprint": None,
        "recall_at_k": None,
        "index": None,
    }
    # The library's blocks: the same lists.
    np.testing.assert_array_equal(np.concatenate([b.ids for b in blocks]), ids)
    np.testing.assert_array_equal(np.concatenate([b.neighbor_ids for b in blocks]), got)


def test_neighbors_through_the_index_report_their_recall(seeded: tuple, tmp_path: Path) -> None:
    folder, vectors, ids = seeded
    with Retriever.open(folder) as retriever:
        report = write_neighbors(retriever, tmp_path / "ann.parquet", NeighborsConfig(k=10, method="index"))
    _, got, got_scores = read_lists(tmp_path / "ann.parquet")
    truth, truth_scores = oracle(vectors, ids, 10)
    measured = recall_at(got, truth, got_scores, truth_scores)
    assert report.recall is not None and 0.5 < measured < 1.0  # IVF at its tuned nprobe misses some
    assert abs(report.recall - measured) < 0.05  # the sample's recall is the whole's
    assert read_neighbors_metadata(tmp_path / "ann.parquet")["recall_at_k"] == report.recall


def test_fewer_items_than_k(tmp_path: Path) -> None:
    vectors = clustered(5, 8, seed=1)
    folder = seeded_store(tmp_path / "index", vectors)
    with Retriever.open(folder) as retriever:
        write_neighbors(retriever, tmp_path / "knn.parquet", NeighborsConfig(k=10))
    got_ids, _, _ = read_lists(tmp_path / "knn.parquet")
    lists = pq.read_table(tmp_path / "knn.parquet").column("neighbor_ids").to_pylist()
    assert [sorted(n) for n in lists] == [sorted(set(range(5)) - {int(i)}) for i in got_ids]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "retrieval"), *args],
        capture_output=True,
        text=True,
        env=os.environ | (env or {}),
        timeout=300,
    )


def test_a_killed_run_resumes_from_its_blocks(seeded: tuple, tmp_path: Path) -> None:
    folder, _, _ = seeded
    out = tmp_path / "knn.parquet"
    args = (
        "neighbors",
        "--index",
        str(folder),
        "-k",
        "8",
        "--block-rows",
        "300",
        "--out",
        str(out),
        "--json",
    )
    # Writes: the job (1), the vectors' description (2), then one per block: killed in the fourth.
    killed = run_cli(*args, env={"RETRIEVAL_CRASH_AT_WRITE": "6"})
    assert killed.returncode != 0 and not out.exists()
    assert len(list((tmp_path / "knn.parquet.parts").glob("block-*.parquet"))) == 3
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert (report["blocks"], report["resumed_blocks"]) == (9, 3)
    with Retriever.open(folder) as retriever:
        whole = write_neighbors(retriever, tmp_path / "whole.parquet", NeighborsConfig(k=8, block_rows=300))
        assert whole.resumed_blocks == 0
        assert pq.read_table(out).equals(pq.read_table(tmp_path / "whole.parquet"))
        # Other arguments over a killed run's checkpoints: started over, nothing of it reused.
        run_cli(*args, env={"RETRIEVAL_CRASH_AT_WRITE": "6"})
        again = write_neighbors(retriever, out, NeighborsConfig(k=9, block_rows=300))
    assert again.resumed_blocks == 0
    assert {len(n) for n in pq.read_table(out).column("neighbor_ids").to_pylist()} == {9}


def test_captions_to_images_on_a_built_index(config: BuildConfig, tmp_path: Path) -> None:
    build_index(config)
    with Retriever.open(config.out) as retriever:
        report = write_neighbors(
            retriever, tmp_path / "c2i.parquet", NeighborsConfig(source="captions", target="images", k=3)
        )
        images, captions = retriever.rows("images").ids, retriever.rows("captions").ids
        image_vectors, caption_vectors = (
            retriever.vectors(images, "images"),
            retriever.vectors(captions, "captions"),
        )
    assert report.versions.keys() == {"captions", "images"}
    got_ids, _got, got_scores = read_lists(tmp_path / "c2i.parquet")
    np.testing.assert_array_equal(got_ids, captions)
    scores = caption_vectors @ image_vectors.T  # nothing to leave out: two collections
    order = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, order, 1), atol=1e-5)


# -- duplicates ------------------------------------------------------------------------------------


def oracle_groups(vectors: np.ndarray, ids: np.ndarray, digests: list[str], t: float) -> set[tuple]:
    """Star groups by brute force: identical contents as one, the full score matrix, in Python."""
    first: dict[str, int] = {}
    for i, d in sorted(zip(ids.tolist(), digests, strict=True)):
        first.setdefault(d, i)
    copies: dict[int, list[int]] = {}
    for i, d in sorted(zip(ids.tolist(), digests, strict=True)):
        copies.setdefault(first[d], []).append(i)
    units = sorted(copies)
    position = {int(i): p for p, i in enumerate(ids)}
    unit_vectors = vectors[[position[u] for u in units]]
    score = unit_vectors @ unit_vectors.T
    np.fill_diagonal(score, -np.inf)
    near = {a: [b for b in np.flatnonzero(score[a] >= t)] for a in range(len(units))}
    order = sorted(near, key=lambda a: (-len(near[a]), -sum(float(score[a, b]) for b in near[a]), units[a]))
    taken: set[int] = set()
    groups = set()
    for a in order:
        free = [b for b in near[a] if b not in taken]
        if a in taken or not free:
            continue
        taken |= {a, *free}
        members = [(c, 1.0) for c in copies[units[a]]]
        members += [(c, round(float(score[a, b]), 4)) for b in free for c in copies[units[b]]]
        groups.add(tuple(sorted(members)))
    for n, u in enumerate(units):
        if n not in taken and len(copies[u]) > 1:
            groups.add(tuple((c, 1.0) for c in copies[u]))
    return groups


def groups_of(report) -> set[tuple]:  # type: ignore[no-untyped-def]
    return {
        tuple(sorted((int(i), round(float(s), 4)) for i, s in zip(g.ids, g.scores, strict=True)))
        for g in report.groups
    }


def test_duplicate_groups_are_the_oracles(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    vectors = clustered(1_200, 16, seed=5)
    digests = [f"{rng.integers(1 << 62):064x}" for _ in range(len(vectors))]
    for copy in (40, 41):  # byte-identical copies of row 7
        vectors[copy], digests[copy] = vectors[7], digests[7]
    for base in range(100, 160, 6):  # near copies, some of them several deep
        for j in range(1, 1 + base % 3 + 1):
            vectors[base + j] = unit(vectors[base] + 0.12 * rng.normal(size=16))
    ids = np.arange(len(vectors), dtype=np.int64) + 1_000
    folder = seeded_store(tmp_path / "index", vectors, ids=ids, digests=digests, shard_rows=250)
    with Retriever.open(folder) as retriever:
        report = find_duplicates(retriever, DuplicatesConfig(threshold=0.9, k=32, block_rows=500))
    assert groups_of(report) == oracle_groups(vectors, ids, digests, 0.9)
    assert report.threshold.value == 0.9 and not report.threshold.auto
    assert report.identical_files == 3 and report.capped == 0
    identical = [g for g in report.groups if g.identical]
    assert [g.ids.tolist() for g in identical] == [[1_007, 1_040, 1_041]]
    position = {int(i): p for p, i in enumerate(ids)}
    for group in report.groups:  # every member within T of its representative, as its score says
        rep = vectors[position[group.representative]]
        member = vectors[[position[int(i)] for i in group.ids]]
        np.testing.assert_allclose(member @ rep, group.scores, atol=1e-5)
        assert (group.scores >= 0.9).all()
    table = report.table()
    assert table.column_names == ["group", "id", "path", "score"]
    assert table.num_rows == report.members == sum(len(g) for g in oracle_groups(vectors, ids, digests, 0.9))


def test_a_chain_of_near_matches_is_not_one_group() -> None:
    # a-b, b-c, c-d score >= T, nothing else does: components would join a and d.
    pairs = np.array([[1, 2], [2, 3], [3, 4]])
    groups = star_groups(pairs[:, 0], pairs[:, 1], np.array([0.96, 0.97, 0.955], np.float32))
    assert [g[0].tolist() for g in groups] == [[2, 3, 1]]  # most connected, then highest total
    assert all(not {1, 4} <= set(g[0].tolist()) for g in groups)


def test_the_threshold_from_random_pairs_finds_planted_copies(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    vectors = unit(rng.normal(size=(3_000, 48)))
    planted = {}
    for base in range(0, 3_000, 100):
        planted[base + 1] = base
        vectors[base + 1] = unit(vectors[base] + 0.05 * rng.normal(size=48))  # cosine about 0.95
    folder = seeded_store(tmp_path / "index", vectors)
    with Retriever.open(folder) as retriever:
        report = find_duplicates(retriever, DuplicatesConfig(false_match_rate=1e-3))
    sample = vectors[np.sort(np.random.default_rng(0).choice(3_000, 3_000, replace=False))]
    null = score_null(sample, sample, ("images", "images"), same=True)
    assert report.threshold.auto
    assert report.threshold.value == pytest.approx(null.threshold(1e-3 / 2_999), abs=1e-6)
    assert report.threshold.item_rate == pytest.approx(1e-3, rel=0.01)
    groups = {tuple(sorted(g.ids.tolist())) for g in report.groups}
    assert {(b, c) for c, b in planted.items()} <= groups  # every planted copy found
    # At about 0.001 false partners an item, 3,000 items expect about 3 items in false pairs.
    assert len(groups - {(b, c) for c, b in planted.items()}) <= 6
    assert "chosen" in report.threshold.describe("images")


def planted_corpus(root: Path) -> dict[str, str]:
    """Clip-art pictures with planted copies: a byte-identical file, a JPEG re-encode, a resize
    and a crop of a few percent. -> copy -> original."""
    root.mkdir(parents=True)
    originals = sorted(DATA.rglob("*.png"))[::97][:12]
    planted = {}
    for n, path in enumerate(originals):
        image = Image.open(path).convert("RGB")
        image.save(root / f"{n:02d}.png")
        if n == 0:
            (root / "00-copy.png").write_bytes((root / "00.png").read_bytes())
            planted["00-copy.png"] = "00.png"
        elif n == 1:
            image.save(root / "01-q80.jpg", quality=80)
            planted["01-q80.jpg"] = "01.png"
        elif n == 2:
            image.resize((image.width * 9 // 10, image.height * 9 // 10)).save(root / "02-small.png")
            planted["02-small.png"] = "02.png"
        elif n == 3:
            w, h = image.size
            image.crop((w // 30, h // 30, w - w // 30, h - h // 30)).save(root / "03-crop.png")
            planted["03-crop.png"] = "03.png"
    return planted


def test_duplicates_of_an_image_folder_from_the_command_line(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]
) -> None:
    planted = planted_corpus(tmp_path / "images")
    build_index(
        BuildConfig(
            tmp_path / "index",
            tmp_path / "images",
            model=ModelSpec(checkpoint, *towers),
            device="cpu",
            workers=1,
        )
    )
    with Retriever.open(tmp_path / "index") as retriever:
        rows = retriever.rows("images")
        ids, paths = rows.ids, rows.table.column("path").to_pylist()
        digests = rows.table.column("sha256").to_pylist()
        vectors = retriever.vectors(ids)
    # The tiny random-init tower puts every picture near every other: the threshold is set between
    # the planted copies' scores and the rest, so that the groups are the oracle's either way.
    position = {p: n for n, p in enumerate(paths)}
    scores = vectors @ vectors.T
    t = float(min(scores[position[c], position[o]] for c, o in planted.items()) - 1e-4)
    result = run_cli(
        "duplicates",
        "--index",
        str(tmp_path / "index"),
        "--threshold",
        str(t),
        "--out",
        str(tmp_path / "dups.parquet"),
        "--grid-dir",
        str(tmp_path / "sheets"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    table = pq.read_table(tmp_path / "dups.parquet")
    got = {
        tuple(
            sorted(
                (i, round(s, 4))
                for i, s, g in zip(
                    table.column("id").to_pylist(),
                    table.column("score").to_pylist(),
                    table.column("group").to_pylist(),
                    strict=False,
                )
                if g == group
            )
        )
        for group in set(table.column("group").to_pylist())
    }
    assert got == oracle_groups(vectors, ids, digests, t)
    assert report["identical_files"] == 2 and report["groups"] == len(got)
    identical = [
        g
        for g in report["first_groups"]
        if g["identical"] or any(m["score"] == 1.0 for m in g["members"][1:])
    ]
    assert {Path(m["label"]).name for m in identical[0]["members"]} >= {"00.png", "00-copy.png"}
    assert sorted(p.name for p in (tmp_path / "sheets").iterdir()) == [
        f"group-{n:06d}.png" for n in range(1, len(got) + 1)
    ]
    assert Image.open(tmp_path / "sheets" / "group-000001.png").size[0] > 0
    names = {Path(p).name for p in table.column("path").to_pylist()}
    assert set(planted) | set(planted.values()) <= names


def test_damaged_checkpoints_are_redone_and_another_index_starts_over(tmp_path: Path) -> None:
    vectors = clustered(1_500, 16, seed=8)
    folder = seeded_store(tmp_path / "index", vectors, kind="ivf")
    out = tmp_path / "knn.parquet"
    args = ("neighbors", "--index", str(folder), "-k", "5", "--block-rows", "250", "--out", str(out))
    killed = run_cli(*args, "--method", "index", env={"RETRIEVAL_CRASH_AT_WRITE": "6"})
    assert killed.returncode != 0
    blocks = sorted((tmp_path / "knn.parquet.parts").glob("block-*.parquet"))
    assert len(blocks) == 3
    blocks[1].write_bytes(blocks[1].read_bytes()[:100])  # a damaged checkpoint
    with Retriever.open(folder) as retriever:
        config = NeighborsConfig(k=5, block_rows=250, method="index")
        resumed = write_neighbors(retriever, out, config)
        write_neighbors(retriever, tmp_path / "whole.parquet", config)
    assert resumed.resumed_blocks == 2  # the damaged one computed again
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "whole.parquet"))

    # The index changes kind at the same table version: checkpoints of the old one are not reused.
    run_cli(*args, "--method", "index", env={"RETRIEVAL_CRASH_AT_WRITE": "6"})
    with Store.open(folder, write=True) as store:
        state = store.manifest.collections["images"]
        record = build_collection_index(store, "images", IndexConfig(kind="flat"), None, "self")
        record = dataclasses.replace(record, version=state.version, rows_version=state.rows_version)
        store.commit_catalog(
            dataclasses.replace(
                store.manifest, collections={"images": dataclasses.replace(state, index=record)}
            )
        )
    with Retriever.open(folder) as retriever:
        again = write_neighbors(retriever, out, NeighborsConfig(k=5, block_rows=250, method="index"))
    assert again.resumed_blocks == 0 and again.recall == 1.0


def test_a_second_run_on_the_same_output_is_refused(seeded: tuple, tmp_path: Path) -> None:
    folder, _, _ = seeded
    out = tmp_path / "knn.parquet"
    parts = tmp_path / "knn.parquet.parts"
    parts.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(parts / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with Retriever.open(folder) as retriever, pytest.raises(StoreError, match="another run"):
            write_neighbors(retriever, out, NeighborsConfig(k=3))
    finally:
        holder.kill()
        holder.wait()
    with Retriever.open(folder) as retriever:  # the holder gone, the lock with it
        assert write_neighbors(retriever, out, NeighborsConfig(k=3)).rows == 2_500


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""
