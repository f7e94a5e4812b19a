"""index build: every input accounted for, shards readable anywhere, incremental, resumable."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from conftest import seed_checkpoint
from corpus import BAD, GOOD, SKIPPED
from PIL import Image
from stores import build_args, canonical, committed, live

from retrieval import Encoder, IndexMismatchError, ModelSpec, MultiModalEncoder, StoreError, durable
from retrieval.build.pipeline import BuildConfig, build_index
from retrieval.build.stored import StoredVectors, hash_keys
from retrieval.build.verify import verify_index
from retrieval.durable import CRASH_ENV
from retrieval.errors import BuildInterrupted
from retrieval.store.folder import Store
from retrieval.vectors import embedding_matrix


def test_every_input_is_accounted_for(config: BuildConfig) -> None:
    report = build_index(config)
    images = report.collections["images"]
    assert (images.indexed, images.failed, images.skipped) == (len(GOOD), len(BAD), len(SKIPPED))
    assert images.encoded == len(GOOD)

    rows = live(config.out, "images")
    with Store.open(config.out) as store:
        outcomes = {o.source: o for o in store.outcomes("images")}
    assert set(rows.column("path").to_pylist()) == set(GOOD)
    assert {s for s, o in outcomes.items() if o.status == "failed"} == set(BAD)
    assert {s for s, o in outcomes.items() if o.status == "skipped"} == SKIPPED
    assert "pixel" in outcomes["broken/bomb.png"].reason
    assert "0 bytes" in outcomes["broken/empty.png"].reason
    assert len(set(rows.column("id").to_pylist())) == rows.num_rows

    captions = report.collections["captions"]
    # sidecars: flag.txt indexed, pic.txt failed (bad bytes), scan.txt skipped (empty);
    # captions.csv: two indexed, one skipped (empty).
    assert (captions.indexed, captions.failed, captions.skipped) == (3, 1, 2)
    texts = dict(
        zip(
            live(config.out, "captions").column("text").to_pylist(),
            live(config.out, "captions").column("image").to_pylist(),
            strict=True,
        )
    )
    assert texts == {
        "a red flag on a white pole": "clipart/flag.png",
        "a dog walking on the street": "pic.bmp",
        "the cat": None,
    }


def test_vectors_equal_the_encoder(config: BuildConfig) -> None:
    build_index(config)
    rows = live(config.out, "images")
    stored = embedding_matrix(rows.column("embedding"), 16)
    with Encoder.load(config.model, device="cpu") as encoder:
        direct = encoder.encode_images([config.images / p for p in rows.column("path").to_pylist()])
        cosines = np.sum(stored * direct, axis=1)
        reduced = np.array(["reduced_on_load" in f for f in rows.column("flags").to_pylist()])
        assert reduced.sum() == 1  # photos/big.jpg
        assert cosines[~reduced].min() >= 0.9999
        assert cosines[reduced].min() >= 0.999  # DCT-scaled decode stays within the tolerance
        captions = live(config.out, "captions")
        texts = encoder.encode_texts(captions.column("text").to_pylist())
        assert np.sum(embedding_matrix(captions.column("embedding"), 16) * texts, axis=1).min() >= 0.9999


def test_shards_are_plain_parquet(config: BuildConfig) -> None:
    build_index(config)
    shards = sorted((config.out / "images").glob("shard-*.parquet"))
    table = pq.read_table(shards[0])
    # A list of float32 on disk (Delta has no fixed-size list), exactly 16 per row.
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert set(table.column("embedding").combine_chunks().value_lengths().to_pylist()) == {16}
    assert table.schema.field("id").type == pa.int64()
    assert {"path", "sha256", "size", "mtime_ns", "width", "height", "flags"} <= set(table.column_names)
    metadata = table.schema.metadata
    assert metadata[b"retrieval.schema_version"] == b"2"
    assert len(json.loads(metadata[b"retrieval.fingerprint"])["digest"]) == 64
    dataset = ds.dataset([str(p) for p in shards], format="parquet")
    assert dataset.count_rows() == len(GOOD)
    captions = pq.read_table(sorted((config.out / "captions").glob("shard-*.parquet"))[0])
    assert {"text", "source", "row", "image", "metadata", "flags"} <= set(captions.column_names)


def test_rerun_does_nothing(config: BuildConfig) -> None:
    build_index(config)
    before = {p: p.stat().st_mtime_ns for p in config.out.rglob("*") if p.is_file() and p.name != ".lock"}
    state = committed(config.out)
    report = build_index(config)
    assert all(c.added == 0 and c.deleted == 0 for c in report.collections.values())
    after = {p: p.stat().st_mtime_ns for p in config.out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    assert committed(config.out) == state


def test_incremental_rebuild(config: BuildConfig, corpus: Path) -> None:
    build_index(config)
    first = live(config.out, "images")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(corpus / "pic.bmp")  # changed
    (corpus / "scan.tiff").unlink()  # removed
    (corpus / "anim.gif").rename(corpus / "nested" / "moved.gif")  # moved: same content
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(corpus / "new.png")  # added
    (corpus / "broken" / "empty.png").unlink()  # a failure that went away

    report = build_index(config).collections["images"]
    assert (report.encoded, report.reused, report.deleted) == (2, 1, 3)
    assert (report.failed, report.indexed) == (len(BAD) - 1, len(GOOD))
    rows = live(config.out, "images")
    paths = rows.column("path").to_pylist()
    assert sorted(paths) == sorted((set(GOOD) - {"scan.tiff", "anim.gif"}) | {"nested/moved.gif", "new.png"})
    assert len(set(rows.column("id").to_pylist())) == rows.num_rows
    old = dict(
        zip(first.column("path").to_pylist(), embedding_matrix(first.column("embedding"), 16), strict=True)
    )
    new = dict(zip(paths, embedding_matrix(rows.column("embedding"), 16), strict=True))
    np.testing.assert_array_equal(new["nested/moved.gif"], old["anim.gif"])
    np.testing.assert_array_equal(new["clipart/flag.png"], old["clipart/flag.png"])
    assert build_index(config).collections["images"].added == 0


def test_other_model_is_refused_unless_rebuild(
    config: BuildConfig, tmp_path: Path, towers: tuple[Path, Path]
) -> None:
    build_index(config)
    torch.manual_seed(42)
    other = seed_checkpoint(MultiModalEncoder(*towers, embed_dim=16), tmp_path / "other.pt")
    changed = BuildConfig(**{**vars(config), "model": ModelSpec(other, *towers)})
    with pytest.raises(IndexMismatchError, match="another model"):
        build_index(changed)
    report = build_index(BuildConfig(**{**vars(changed), "rebuild": True}))
    assert report.collections["images"].encoded == len(GOOD)
    assert live(config.out, "images").num_rows == len(GOOD)
    with Store.open(config.out) as store:
        assert store.manifest.fingerprint == report.fingerprint
        named = {config.out / f.file for c in store.manifest.collections.values() for f in c.shards}
    data = set(config.out.glob("*/shard-*.parquet"))
    assert named < data  # the old model's files stay for readers that pinned them ...
    assert not list(config.out.glob("_rebuild"))
    with Store.open(config.out, write=True) as store:
        store.vacuum(retain_hours=0)
    assert set(config.out.glob("*/shard-*.parquet")) == named  # ... until a vacuum


def test_one_writer_at_a_time(config: BuildConfig) -> None:
    build_index(config)
    with Store.open(config.out, write=True):
        with pytest.raises(StoreError, match="locked by another build"):
            build_index(config)
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from retrieval import Store; Store.open({str(config.out)!r}, write=True)",
            ],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0 and "locked by another build" in other.stderr
    build_index(config)  # released on close


def test_long_captions_are_truncated_and_flagged(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]
) -> None:
    captions = tmp_path / "long.txt"
    captions.write_text(" ".join(["walking"] * 5000) + "\na dog\n")
    build_index(
        BuildConfig(
            out=tmp_path / "idx", captions=(captions,), model=ModelSpec(checkpoint, *towers), device="cpu"
        )
    )
    rows = live(tmp_path / "idx", "captions")
    assert rows.column("flags").to_pylist() == [["truncated"], []]


def _crashing_build(config: BuildConfig, k: int) -> None:
    torch.set_num_threads(1)  # two cores: the children run one after another
    os.environ[CRASH_ENV] = str(k + durable.write_count())
    build_index(config)


def test_crash_at_every_write_then_resume(config: BuildConfig, tmp_path: Path) -> None:
    """Kill the build at its k-th durable write, for every k; each time the store is a committed
    state, and a rerun ends where an uninterrupted build ends."""
    clean = BuildConfig(**{**vars(config), "out": tmp_path / "clean", "workers": 0})
    before = durable.write_count()
    build_index(clean)
    writes = durable.write_count() - before
    expected = canonical(clean.out)
    # Not "fork": delta-rs's runtime, started in this process, cannot run in a forked copy of it.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["retrieval.build.pipeline"])
    for k in range(1, writes + 2):
        crashing = BuildConfig(**{**vars(clean), "out": tmp_path / f"crash-{k}"})
        child = context.Process(target=_crashing_build, args=(crashing, k))
        child.start()
        child.join(120)
        if child.exitcode is None:
            child.kill()
            pytest.fail(f"the build with a crash at write {k} hung")
        assert child.exitcode == (0 if k > writes else 137), k
        if (crashing.out / "catalog.json").exists():  # a committed state, whole
            report = verify_index(crashing.out)
            assert report.ok, (k, report.problems)
        build_index(crashing)
        assert canonical(crashing.out) == expected, k
        assert not list(crashing.out.rglob("*.tmp-*"))
        for collection in ("images", "captions"):
            a = embedding_matrix(live(crashing.out, collection).column("embedding"), 16)
            b = embedding_matrix(live(clean.out, collection).column("embedding"), 16)
            np.testing.assert_allclose(a, b, atol=1e-5)
    print(f"build crashed at each of its {writes} durable writes, each resumed to the clean result")
    assert writes >= 10


def test_sigkill_mid_build_then_rerun(config: BuildConfig, tmp_path: Path) -> None:
    clean = BuildConfig(**{**vars(config), "out": tmp_path / "clean"})
    build_index(clean)
    args = build_args(config, "--shard-rows", "1")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = config.out / "images" / "_delta_log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_dir() and len(list(log.glob("*.json"))) >= 4:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert canonical(config.out) == canonical(clean.out)


def test_files_the_store_did_not_write_are_never_removed(config: BuildConfig) -> None:
    mine = config.out / "images" / "holiday.png"
    mine.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(mine)
    (config.out / "notes.txt").write_text("mine")
    build_index(config)
    build_index(BuildConfig(**{**vars(config), "rebuild": True}))
    assert mine.is_file() and (config.out / "notes.txt").read_text() == "mine"


def test_a_run_without_some_inputs_leaves_their_rows_alone(config: BuildConfig) -> None:
    first = build_index(config).collections["captions"]
    images_only = build_index(BuildConfig(**{**vars(config), "captions": ()})).collections["captions"]
    assert (images_only.indexed, images_only.failed, images_only.skipped) == (
        first.indexed,
        first.failed,
        first.skipped,
    )
    assert images_only.deleted == 0
    captions_only = build_index(BuildConfig(**{**vars(config), "images": None})).collections["captions"]
    assert (captions_only.indexed, captions_only.failed, captions_only.skipped) == (
        first.indexed,
        first.failed,
        first.skipped,
    )
    assert captions_only.added == captions_only.deleted == 0
    with Store.open(config.out) as store:
        assert {o.source for o in store.outcomes("captions") if o.status == "failed"} == {"pic.txt#0"}


def test_hostile_names_and_caption_files(tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "fine.png")
    Image.new("RGB", (8, 8), "blue").save(os.fsdecode(bytes(images) + b"/caf\xe9.png"))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        '{"caption": "ok"}\n{"caption": "\\ud800 lone surrogate"}\n{"caption": "bad image", "image": "x"}\n'
    )
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("caption\nshort\n" + "x" * 200_000 + "\n")
    config = BuildConfig(
        out=tmp_path / "index",
        images=images,
        captions=(jsonl, csv_file, jsonl),
        model=ModelSpec(checkpoint, *towers),
        device="cpu",
        workers=0,
    )
    report = build_index(config)
    assert (report.collections["images"].indexed, report.collections["images"].skipped) == (1, 1)
    captions = report.collections["captions"]
    assert (captions.indexed, captions.failed) == (3, 2)  # the file given twice counts once
    with Store.open(config.out) as store:
        reasons = {o.source.rsplit("/", 1)[-1]: o.reason for o in store.outcomes("captions")}
        assert reasons["c.jsonl#1"] == "caption is not valid UTF-8"
        assert "unreadable CSV" in reasons["c.csv#1"]
        assert next(o.reason for o in store.outcomes("images")) == "name is not valid UTF-8"
    assert build_index(config).collections["captions"].added == 0


def test_truncated_flag_survives_vector_reuse(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]
) -> None:
    captions = tmp_path / "c.txt"
    captions.write_text(" ".join(["walking"] * 500) + "\n")
    config = BuildConfig(
        out=tmp_path / "idx", captions=(captions,), model=ModelSpec(checkpoint, *towers), device="cpu"
    )
    build_index(config)
    # A line inserted before it: the long caption moves to row 1, a new row that reuses its vector.
    captions.write_text("a dog\n" + " ".join(["walking"] * 500) + "\n")
    report = build_index(config).collections["captions"]
    assert (report.reused, report.encoded) == (1, 1)
    assert live(config.out, "captions").column("flags").to_pylist() == [[], ["truncated"]]


def test_stored_vectors_are_found_by_their_full_hash(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]
) -> None:
    texts = ["a dog on a beach", "two cats", "a red bicycle"]
    captions = tmp_path / "c.txt"
    captions.write_text("\n".join(texts) + "\n")
    config = BuildConfig(
        out=tmp_path / "idx", captions=(captions,), model=ModelSpec(checkpoint, *towers), device="cpu"
    )
    build_index(config)
    rows = live(config.out, "captions")
    vectors = embedding_matrix(rows.column("embedding"), 16)
    expected = dict(zip(rows.column("sha256").to_pylist(), vectors, strict=True))
    with Store.open(config.out) as store:
        stored = StoredVectors(store, "captions", 16, store.table("captions"))
        assert len(stored) == len(texts)
        for sha, vector in expected.items():
            found = stored.get(sha)
            assert found is not None and np.array_equal(found, vector)
            # The same first 64 bits, another hash: the prefix finds the row, the full hash refuses it.
            other = sha[:16] + ("0" if sha[16] != "0" else "1") + sha[17:]
            assert stored.get(other) is None
        assert stored.get(hashlib.sha256(b"never indexed").hexdigest()) is None
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    keys = hash_keys(pa.chunked_array([hashes[:1], hashes[1:]]))
    assert keys.tolist() == [int(h[:16], 16) for h in hashes]


def test_a_folder_that_cannot_be_listed_keeps_its_rows(
    config: BuildConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_index(config)
    real_listdir = os.listdir

    def flaky(path: os.PathLike[str] | str) -> list[str]:
        if Path(path).name == "photos":
            raise PermissionError(13, "Permission denied")
        return real_listdir(path)

    monkeypatch.setattr("retrieval.ingest.sources.os.listdir", flaky)
    report = build_index(config).collections["images"]
    assert report.deleted == 0 and report.indexed == len(GOOD)
    with Store.open(config.out) as store:
        assert any(o.source == "photos" and "cannot list" in o.reason for o in store.outcomes("images"))
    monkeypatch.setattr("retrieval.ingest.sources.os.listdir", real_listdir)
    again = build_index(config).collections["images"]
    assert (again.encoded, again.deleted, again.indexed) == (0, 0, len(GOOD))


class _StopAfter:
    """A progress that asks the build to stop once ``stage`` has advanced ``n`` items."""

    def __init__(self, stop: threading.Event, stage: str, n: int) -> None:
        self.stop, self.stage, self.n = stop, stage, n
        self.current, self.done = "", 0

    def start(self, stage: str, total: int) -> None:
        self.current, self.done = stage, 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.current == self.stage and self.done >= self.n:
            self.stop.set()

    def finish(self) -> None:
        pass


@pytest.mark.parametrize(("stage", "after"), [("images", 2), ("captions", 5)])
def test_a_stop_commits_the_work_done_and_the_rerun_matches(
    tmp_path: Path, config: BuildConfig, stage: str, after: int
) -> None:
    captions = tmp_path / "many.txt"
    captions.write_text("".join(f"a dog number {i}\n" for i in range(40)))
    more = {"captions": (*config.captions, captions), "caption_shard_rows": 16, "batch_size": 2}
    config = BuildConfig(**{**vars(config), **more})
    clean = BuildConfig(**{**vars(config), "out": tmp_path / "clean"})
    total = build_index(clean).collections[stage].indexed

    stop = threading.Event()
    with pytest.raises(BuildInterrupted) as stopped:
        build_index(config, progress=_StopAfter(stop, stage, after), stop=stop)
    report = stopped.value.report
    assert report.interrupted and report.indexes == {}
    with Store.open(config.out) as store:
        state = store.committed.collections[stage]
        assert state.index is None  # nothing is searchable before the rerun
        committed = state.counts["indexed"]
    assert 0 < committed < total  # the work done by the stop, not more, not less
    assert report.collections[stage].added == report.collections[stage].indexed == committed
    assert verify_index(config.out).ok

    again = build_index(config)
    assert not again.interrupted
    assert canonical(config.out) == canonical(clean.out)


def test_a_rebuild_keeps_the_old_index_searchable_until_it_is_done(
    config: BuildConfig, tmp_path: Path, towers: tuple[Path, Path]
) -> None:
    from retrieval import Retriever

    build_index(config)
    with Retriever.open(config.out, device="cpu") as retriever:
        before = [(h.id, h.path) for h in retriever.search_text("a dog", k=5)]
    torch.manual_seed(7)
    other = seed_checkpoint(MultiModalEncoder(*towers, embed_dim=16), tmp_path / "other.pt")
    rebuild = BuildConfig(
        **{**vars(config), "model": ModelSpec(other, *towers), "rebuild": True, "batch_size": 2}
    )
    stop = threading.Event()
    with pytest.raises(BuildInterrupted):
        build_index(rebuild, progress=_StopAfter(stop, "images", 2), stop=stop)

    # Halfway through the rebuild, a new reader still finds the old rows with the old model.
    with Retriever.open(config.out, device="cpu") as retriever:
        assert [(h.id, h.path) for h in retriever.search_text("a dog", k=5)] == before
    with pytest.raises(StoreError, match="a --rebuild is in progress; rerun it with --rebuild"):
        build_index(config)

    with Store.open(config.out) as store:
        old = store.manifest.fingerprint
    report = build_index(rebuild)
    with Store.open(config.out) as store:
        assert store.manifest.fingerprint == report.fingerprint != old
        assert store.committed.rebuild is None
    assert live(config.out, "images").num_rows == len(GOOD)


def test_index_info_counts_rows_that_wait_for_their_index(config: BuildConfig, corpus: Path) -> None:
    build_index(config)
    for k in range(12):
        Image.fromarray(np.full((20, 20, 3), 10 * k, dtype=np.uint8)).save(corpus / f"more-{k}.png")
    stop = threading.Event()
    with pytest.raises(BuildInterrupted):
        build_index(
            BuildConfig(**{**vars(config), "batch_size": 2}),
            progress=_StopAfter(stop, "images", 2),
            stop=stop,
        )
    with Store.open(config.out) as store:
        images = store.describe()["collections"]["images"]
    assert images["awaiting_index"] and images["searchable"] == len(GOOD) < images["indexed"]
