"""Reliability of index folders: ``index verify`` and the damage it finds, hostile files refused by
their hash, a failing disk, two writers at once, kills at random moments, and a decode fuzz.

The crash at every durable write of a build is in ``test_indexer.py`` and of training in
``test_train.py``; both verify every state they leave.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from corpus import GOOD
from stores import build_args, canonical, cli, committed
from transformers import ViTImageProcessor

from retrieval import Encoder, Retriever, StoreError, durable
from retrieval.build.execute import LocalExecutor
from retrieval.build.pipeline import BuildConfig, build_index
from retrieval.build.verify import verify_index
from retrieval.durable import FAULT_ENV
from retrieval.ingest import reader
from retrieval.ingest.reader import decode_file
from retrieval.model.preprocess import ImagePreprocess
from retrieval.store.folder import Store
from retrieval.store.manifest import FileRef
from retrieval.store.schema import schema
from retrieval.store.table import DeltaCollection

FUZZ_PER_FILE = 24


@pytest.fixture
def built(config: BuildConfig) -> Path:
    build_index(config)
    return config.out


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if durable.TMP_MARKER in p.name]


# -- index verify ---------------------------------------------------------------------------------


def test_verify_is_green_on_a_build_and_its_updates(
    config: BuildConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    build_index(config)
    (config.images / "pic.webp").unlink()  # a deletion list appears
    (config.images / "scan.tiff").touch()  # a changed mtime, same bytes: its shard is rewritten
    (config.images / "pic.bmp").write_bytes((config.images / "clipart/flag.png").read_bytes())  # changed
    build_index(config)
    report = verify_index(config.out)
    assert report.ok, report.problems
    assert (report.collections["images"].live, report.collections["images"].index) == (len(GOOD) - 1, "flat")
    assert report.collections["images"].rows == len(GOOD) - 1  # Delta deletes: the files hold live rows only
    assert cli(["verify", str(config.out), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["ok"] and out["problems"] == [] and out["collections"]["captions"]["live"] == 3
    )  # two from the CSV, one sidecar


def catalog(folder: Path) -> dict:
    return json.loads((folder / "catalog.json").read_text())


def files_of(folder: Path, collection: str, suffix: str) -> list[str]:
    """The committed files of ``collection``: its live data files, then its FAISS index."""
    with Store.open(folder) as store:
        names = [ref.file for ref in store.committed.collections[collection].shards]
    names.append(catalog(folder)["indexes"][collection]["file"]["file"])
    return [n for n in names if n.endswith(suffix)]


def newest(folder: Path, collection: str) -> tuple[DeltaCollection, Any]:
    table = DeltaCollection(folder, collection, collection)
    return table, table.snapshot()


def commit_as_faulty_writer(
    folder: Path, collection: str, adds: list[FileRef], removes: list[FileRef], counters: dict | None = None
) -> None:
    """A commit of a faulty writer: the log then vouches for files or counters that are wrong, so
    that only the deeper checks can see the damage."""
    table, snap = newest(folder, collection)
    with Store.open(folder) as store:
        dim = int(store.committed.model["fingerprint"]["dim"])
    table.commit(adds, removes, counters or snap.counters, schema(collection, dim), table.description())


def recommit(folder: Path, name: str, data: bytes) -> None:
    """Write ``data`` in place of the store file ``name``, with its size and hash recorded as a
    faulty writer would have: the damage is then past the first checks."""
    if name.endswith(".faiss"):
        (folder / name).write_bytes(data)
        c = catalog(folder)
        for index in c["indexes"].values():
            if index["file"]["file"] == name:
                index["file"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        (folder / "catalog.json").write_text(json.dumps(c))
        return
    collection = name.split("/")[0]
    _, snap = newest(folder, collection)
    old = next(f for f in snap.files if f.file == name)
    new_name = name.replace(".parquet", "-faulty.parquet")
    (folder / new_name).write_bytes(data)
    new = FileRef(new_name, hashlib.sha256(data).hexdigest(), old.rows, len(data), old.first, old.last)
    commit_as_faulty_writer(folder, collection, [new], [old])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def swap(a: Path, b: Path) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


def rewrite_shard(folder: Path, name: str, change: Callable[[pa.Table], pa.Table]) -> None:
    table = change(pq.read_table(folder / name))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    recommit(folder, name, sink.getvalue().to_pybytes())


def doubled_vectors(table: pa.Table) -> pa.Table:
    column = table.column("embedding").combine_chunks()
    doubled = pa.ListArray.from_arrays(
        column.offsets, pc.multiply(column.flatten(), pa.scalar(2.0, pa.float32()))
    )
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", doubled)


def other_model(table: pa.Table) -> pa.Table:
    meta = dict(table.schema.metadata)
    meta[b"retrieval.fingerprint"] = json.dumps({"digest": "0" * 64}).encode()
    return table.replace_schema_metadata(meta)


def drop_one_id(folder: Path, name: str) -> None:
    index = faiss.read_index(str(folder / name))
    index.remove_ids(np.array([int(faiss.vector_to_array(index.id_map)[0])], dtype=np.int64))
    recommit(folder, name, faiss.serialize_index(index).tobytes())


def repeat_a_shard(folder: Path) -> None:
    _, snap = newest(folder, "images")
    first = snap.files[0]
    copy = replace(first, file="images/shard-000000000900.parquet")
    shutil.copy(folder / first.file, folder / copy.file)
    commit_as_faulty_writer(folder, "images", [copy], [])


def edit_catalog(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        c = catalog(folder)
        change(c)
        (folder / "catalog.json").write_text(json.dumps(c))

    return apply


def miscount(folder: Path) -> None:
    _, snap = newest(folder, "images")
    counters = {**snap.counters, "counts": {**snap.counters["counts"], "indexed": 99}}
    commit_as_faulty_writer(folder, "images", [], [], counters)


def garble_log(folder: Path) -> None:
    log = sorted((folder / "images" / "_delta_log").glob("*.json"))[-1]
    log.write_text("{not json")


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated shard": (
        lambda f: truncate(f / files_of(f, "images", ".parquet")[0]),
        "bytes, its commit logged",
    ),
    "bit-flipped shard": (lambda f: flip_bit(f / files_of(f, "images", ".parquet")[0]), "sha256"),
    "swapped shards": (
        lambda f: swap(*(f / n for n in files_of(f, "images", ".parquet")[:2])),
        "truncated or altered",
    ),
    "bit-flipped index": (lambda f: flip_bit(f / files_of(f, "images", ".faiss")[0]), "sha256"),
    "missing index": (lambda f: (f / files_of(f, "captions", ".faiss")[0]).unlink(), "missing"),
    "garbage catalog": (lambda f: (f / "catalog.json").write_text("{"), "unreadable or damaged"),
    "garbage log entry": (garble_log, "Delta log"),
    "index without a live id": (lambda f: drop_one_id(f, files_of(f, "images", ".faiss")[0]), "ids differ"),
    "vectors not unit-norm": (
        lambda f: rewrite_shard(f, files_of(f, "images", ".parquet")[0], doubled_vectors),
        "unit-norm",
    ),
    "shard of another model": (
        lambda f: rewrite_shard(f, files_of(f, "captions", ".parquet")[0], other_model),
        "another model",
    ),
    "shard without vectors": (
        lambda f: rewrite_shard(
            f, files_of(f, "images", ".parquet")[0], lambda t: t.drop_columns(["embedding"])
        ),
        "no embedding column",
    ),
    "one shard twice": (repeat_a_shard, "appear in more than one row"),
    "counts that do not add up": (miscount, "counts 99 indexed"),
    "fingerprint missing": (
        edit_catalog(lambda m: m["model"].update(fingerprint=None)),
        "no model fingerprint",
    ),
    "fingerprint edited": (
        edit_catalog(lambda m: m["model"]["fingerprint"].update(checkpoint_sha256="0" * 64)),
        "digest does not match",
    ),
}


@pytest.mark.damages_stores
@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_finds_each_kind_of_damage(
    built: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    change, expected = DAMAGE[damage]
    assert verify_index(built).ok
    change(built)
    report = verify_index(built)
    assert any(expected in p for p in report.problems), report.problems
    assert cli(["verify", str(built)]) == 2
    assert expected in capsys.readouterr().err


# -- hostile files: refused before their bytes are trusted ---------------------------------------


def flip_in_column(folder: Path, name: str, column: str) -> None:
    """Flip a bit inside the pages of ``column`` (one that a search reads) of the data file ``name``."""
    meta = pq.read_metadata(folder / name)
    chunk = next(
        meta.row_group(0).column(i)
        for i in range(meta.num_columns)
        if meta.row_group(0).column(i).path_in_schema == column
    )
    data = bytearray((folder / name).read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x10
    (folder / name).write_bytes(bytes(data))


# Each damage, and what refuses it: the logged size and id range, a page checksum, a sha256.
HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated shard": (
        lambda f: truncate(f / files_of(f, "images", ".parquet")[0]),
        "its commit logged",
    ),
    "bit-flipped shard": (
        lambda f: flip_in_column(f, files_of(f, "images", ".parquet")[1], "path"),
        "damaged or unreadable Parquet",
    ),
    "swapped shards": (
        lambda f: swap(*(f / n for n in files_of(f, "images", ".parquet")[:2])),
        "its commit logged",
    ),
    "truncated index": (
        lambda f: truncate(f / files_of(f, "images", ".faiss")[0]),
        "does not match its sha256",
    ),
    "bit-flipped index": (
        lambda f: flip_bit(f / files_of(f, "images", ".faiss")[0]),
        "does not match its sha256",
    ),
    "swapped indexes": (
        lambda f: swap(f / files_of(f, "images", ".faiss")[0], f / files_of(f, "captions", ".faiss")[0]),
        "does not match its sha256",
    ),
}


@pytest.mark.damages_stores
@pytest.mark.parametrize("damage", HOSTILE)
def test_altered_files_are_refused_before_they_are_trusted(
    built: Path, damage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search over a damaged folder is a clear error. Only a page-checksum failure lets damaged
    bytes reach the Parquet reader, which refuses them; no altered FAISS file is parsed at all."""
    committed_files = {
        hashlib.sha256((built / name).read_bytes()).hexdigest()
        for collection in ("images", "captions")
        for name in files_of(built, collection, "")
    }
    parsed: list[str] = []
    read_table, read_index = pq.read_table, faiss.read_index

    def spy_table(source: pa.BufferReader, *args: object, **kwargs: object) -> pa.Table:
        data = source.read()
        parsed.append(hashlib.sha256(data).hexdigest())
        return read_table(pa.BufferReader(data), *args, **kwargs)

    def spy_index(path: str, *args: object) -> faiss.Index:
        parsed.append(durable.file_sha256(Path(path)))
        return read_index(path, *args)

    monkeypatch.setattr(pq, "read_table", spy_table)
    monkeypatch.setattr(faiss, "read_index", spy_index)
    with Retriever.open(built, device="cpu") as r:
        r.search_text("a dog", k=5)
    assert parsed, "the spies see the parsing of an intact store"
    parsed.clear()
    change, expected = HOSTILE[damage]
    change(built)
    with pytest.raises(StoreError, match=expected), Retriever.open(built, device="cpu") as r:
        r.search_text("a dog", k=100)  # the index, then the data file of every hit: here every file
    if damage != "bit-flipped shard":
        assert set(parsed) <= committed_files  # every byte string that reached a parser was committed


# -- a failing disk ---------------------------------------------------------------------------------


def change_corpus(config: BuildConfig) -> None:
    """Work for a second build: a file removed, one edited, one added, a caption added."""
    (config.images / "pic.webp").unlink()
    shutil.copy(config.images / "pic.bmp", config.images / "copy-of-pic.bmp")
    with (config.images / "nested" / "deeper" / "leaf.jpeg").open("ab") as f:
        f.write(b"\0")
    with config.captions[0].open("a") as f:
        f.write("a red flag,clipart/flag.png,en\n")


@pytest.mark.parametrize("error", ["ENOSPC", "EIO"])
def test_a_failing_write_leaves_a_committed_store(
    built: Path,
    config: BuildConfig,
    tmp_path: Path,
    error: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every durable write of an incremental build fails in turn: each time one clean line and
    exit 2, the store at a committed state (the previous one when the first write fails), no
    temporary file left, and the next run ends where an undisturbed one does."""
    change_corpus(config)
    expected_store = tmp_path / "expected"
    shutil.copytree(built, expected_store)
    before = durable.write_count()
    assert cli(build_args(BuildConfig(**{**vars(config), "out": expected_store}))[1:]) == 0
    writes = durable.write_count() - before
    expected = canonical(expected_store)
    assert writes >= 5
    points = range(1, writes + 1) if error == "ENOSPC" else (1, writes)
    with capsys.disabled():
        print(f"{error} at {len(points)} of the {writes} writes of an incremental build: each a clean error")
    for k in points:
        store = tmp_path / f"fault-{k}"
        shutil.copytree(built, store)
        previous = committed(store)
        out = build_args(BuildConfig(**{**vars(config), "out": store}))[1:]
        monkeypatch.setenv(FAULT_ENV, f"write:{k + durable.write_count()}:{error}")
        assert cli(out) == 2, k
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and os.strerror(getattr(errno, error)) in err[0], (k, err)
        monkeypatch.delenv(FAULT_ENV)
        if k == 1:
            assert committed(store) == previous
        assert verify_index(store).ok, k
        assert not tmp_files(store), k
        assert cli(out) == 0, k
        assert canonical(store) == expected, k


def test_a_failing_read_is_a_clean_error(
    built: Path, config: BuildConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """EIO at each read of a committed file, in an incremental build and in a search."""
    change_corpus(config)
    previous = committed(built)
    argv = build_args(config)[1:]
    for k in range(1, 6):
        monkeypatch.setenv(FAULT_ENV, f"read:{k + durable.read_count()}:EIO")
        assert cli(argv) == 2, k
        assert "Input/output error" in capsys.readouterr().err
        assert committed(built) == previous, k  # reads come before any write
        assert verify_index(built).ok
    monkeypatch.setenv(FAULT_ENV, f"read:{1 + durable.read_count()}:EIO")
    with pytest.raises(StoreError, match="Input/output error"), Retriever.open(built, device="cpu") as r:
        r.search_vectors(np.eye(1, 16, dtype=np.float32), k=3)
    monkeypatch.delenv(FAULT_ENV)
    assert cli(argv) == 0
    assert verify_index(built).ok


# -- processes: two writers, kills ------------------------------------------------------------------


def wait_for_lock(folder: Path, pid: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        lock = folder / ".lock"
        if lock.exists() and lock.read_text().strip() == str(pid):
            return
        time.sleep(0.005)
    pytest.fail("the first build never took the lock")


def test_two_builds_at_once_one_is_refused(config: BuildConfig, tmp_path: Path) -> None:
    args = build_args(config, "--shard-rows", "1")
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lock(config.out, first.pid, first)
    os.kill(first.pid, signal.SIGSTOP)  # hold it inside its build, lock taken
    try:
        assert first.poll() is None
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: {config.out} is locked by another build (pid {first.pid}); wait for it to finish"
    ]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    build_index(BuildConfig(**{**vars(config), "out": tmp_path / "clean"}))
    assert canonical(config.out) == canonical(tmp_path / "clean")
    assert verify_index(config.out).ok


def test_kill_right_after_success_is_reported(config: BuildConfig, tmp_path: Path) -> None:
    """What the build reported done is on disk: a SIGKILL the moment the summary is printed."""
    process = subprocess.Popen(
        build_args(config), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    summary = process.stdout.readline() if process.stdout else ""
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert "images" in summary and "indexed" in summary, summary
    assert verify_index(config.out).ok
    state = committed(config.out)
    build_index(BuildConfig(**{**vars(config), "out": tmp_path / "clean"}))
    assert canonical(config.out) == canonical(tmp_path / "clean")
    build_index(config)
    assert committed(config.out) == state  # nothing left to do


def kill_cycles(config: BuildConfig, tmp_path: Path, cycles: int, seed: int) -> dict[str, int]:
    """SIGKILL a real ``index build`` at a random moment, ``cycles`` times, verifying each state.

    The kill moment is drawn over the length of an undisturbed run (start-up included). A run that
    finished is compared with the undisturbed one, and the folder starts over.
    """
    args = build_args(config, "--shard-rows", "1")
    clean = BuildConfig(**{**vars(config), "out": tmp_path / "clean"})
    started = time.monotonic()
    subprocess.run(build_args(clean, "--shard-rows", "1"), check=True, capture_output=True, timeout=300)
    length = time.monotonic() - started
    expected = canonical(clean.out)
    rng = random.Random(seed)
    stats = {"kills": 0, "finished": 0, "committed states verified": 0}
    for _ in range(cycles):
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.1) * length)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if (config.out / "catalog.json").exists():
            report = verify_index(config.out)
            assert report.ok, report.problems
            stats["committed states verified"] += 1
        if process.returncode == 0:
            stats["finished"] += 1
            assert canonical(config.out) == expected
            shutil.rmtree(config.out)
        else:
            stats["kills"] += 1
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    assert canonical(config.out) == expected
    assert verify_index(config.out).ok
    return stats


@pytest.mark.slow
def test_many_random_kills(config: BuildConfig, tmp_path: Path) -> None:
    stats = kill_cycles(config, tmp_path, 100, seed=2)
    print(f"random kills: {stats}")
    assert stats["kills"] >= 50, stats


# -- a bounded decode fuzz ----------------------------------------------------------------------------


def mutants(data: bytes, count: int, rng: random.Random) -> list[bytes]:
    """``count`` damaged copies of ``data``: bit flips, cuts, overwritten and repeated spans."""
    out = []
    for i in range(count):
        mutant = bytearray(data)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 16)):
                mutant[rng.randrange(len(mutant))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del mutant[rng.randrange(1, len(mutant)) :]
        elif kind == 2:
            start = rng.randrange(len(mutant))
            mutant[start : start + rng.randint(1, 64)] = rng.randbytes(rng.randint(1, 64))
        else:
            start = rng.randrange(len(mutant))
            mutant[start:start] = mutant[start : start + rng.randint(1, 256)] * rng.randint(2, 8)
        out.append(bytes(mutant))
    return out


def _decode_status(path: Path, preprocess: ImagePreprocess) -> str:
    torch.set_num_threads(1)
    try:
        decode_file(path, preprocess)
    except (ValueError, OSError) as e:  # what the reader records as the file's failure
        return f"failed: {e}"
    return "decoded"


def fuzz(corpus: Path, out: Path, per_file: int, towers: tuple[Path, Path], seed: int) -> dict[str, str]:
    """Write the mutants of every good fixture to ``out``; decode each in a worker with a timeout.

    A decoder that hangs, crashes its process or raises anything but the errors the reader
    documents fails the test here, with the file's name.
    """
    rng = random.Random(seed)
    out.mkdir()
    files = []
    for name in GOOD:
        source = corpus / name
        for i, data in enumerate(mutants(source.read_bytes(), per_file, rng)):
            target = out / f"{source.stem}-{i}{source.suffix}"
            target.write_bytes(data)
            files.append(target)
    preprocess = ImagePreprocess.from_processor(ViTImageProcessor.from_pretrained(towers[1]))
    statuses = {}
    with ProcessPoolExecutor(max_workers=1) as pool:
        for path in files:
            try:
                statuses[path.name] = pool.submit(_decode_status, path, preprocess).result(timeout=30)
            except FutureTimeout:
                pytest.fail(f"decoding {path.name} hung")
    return statuses


def fuzzed_build(
    corpus: Path, tmp_path: Path, config: BuildConfig, towers: tuple[Path, Path], per_file: int
) -> None:
    """Mutated copies of every good fixture: the decoder gives each a status, and a build over
    them all finishes, accounts for every file, and verifies."""
    statuses = fuzz(corpus, tmp_path / "fuzz", per_file, towers, seed=per_file)
    assert len(statuses) == len(GOOD) * per_file
    failed = {name for name, status in statuses.items() if status != "decoded"}
    print(f"decode fuzz: {len(statuses)} mutants, {len(failed)} refused with a reason, the rest decoded")
    assert 0 < len(failed) < len(statuses)  # the mutations bite, and not every one is fatal
    report = build_index(BuildConfig(**{**vars(config), "images": tmp_path / "fuzz", "captions": ()}))
    images = report.collections["images"]
    assert images.indexed + images.skipped + images.failed == len(statuses)
    with Store.open(config.out) as store:
        recorded = {Path(o.source).name for o in store.outcomes("images") if o.status == "failed"}
    assert recorded == failed  # the build's reader and the lone decoder agree, file by file
    assert verify_index(config.out).ok


def test_decode_fuzz(corpus: Path, tmp_path: Path, config: BuildConfig, towers: tuple[Path, Path]) -> None:
    fuzzed_build(corpus, tmp_path, config, towers, FUZZ_PER_FILE)


def hangs_on_bmp(path: Path, *args: Any) -> Any:
    """A decoder that never returns for a .bmp (module-level: workers of any start method load it)."""
    if path.suffix == ".bmp":
        time.sleep(3600)
    return reader.decode_file(path, *args)


@pytest.mark.parametrize(("workers", "start"), [(0, None), (1, "fork"), (1, "forkserver"), (1, "spawn")])
def test_a_decoder_that_hangs_costs_only_its_file(
    config: BuildConfig, workers: int, start: str | None
) -> None:
    """A file whose decoding never ends is stopped by the reader's time limit, in this process and
    in a worker however workers start, and fails with the reason; the others are indexed."""
    started = time.monotonic()
    with Encoder.load(config.model, device="cpu") as encoder:
        executor = LocalExecutor(
            encoder,
            config.images,
            workers=workers,
            decode_timeout=0.5,
            decode=hangs_on_bmp,
            start_method=start,
        )
        build_index(BuildConfig(**{**vars(config), "workers": workers}), encoder=encoder, executor=executor)
    assert time.monotonic() - started < 120
    with Store.open(config.out) as store:
        failed = {o.source: o.reason for o in store.outcomes("images") if o.status == "failed"}
        assert failed["pic.bmp"] == "decoding took longer than 0.5 s"
        assert store.state("images").counts["indexed"] == len(GOOD) - 1


@pytest.mark.slow
def test_long_decode_fuzz(
    corpus: Path, tmp_path: Path, config: BuildConfig, towers: tuple[Path, Path]
) -> None:
    fuzzed_build(corpus, tmp_path, config, towers, 240)
