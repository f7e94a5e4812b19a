"""``index build --engine ray``: the same result as the local engine, on a local Ray cluster started
once for the session; its faults (a killed actor, a killed driver, what is left in staging)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from corpus import BAD, GOOD
from PIL import Image
from stores import build_args, cli, live

from retrieval.build.config import BuildConfig, ClusterConfig
from retrieval.build.pipeline import build_index
from retrieval.build.ray_engine import RayExecutor
from retrieval.errors import ConfigError, InputError
from retrieval.ingest import reader
from retrieval.model.encoder import Encoder
from retrieval.progress import Silent
from retrieval.store.folder import Store
from retrieval.vectors import embedding_matrix


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A Ray cluster on this machine for the whole session (starting one takes seconds)."""
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=3,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=256 * 2**20,
        )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def ray_config(config: BuildConfig, out: Path, **cluster: Any) -> BuildConfig:
    return dataclasses.replace(config, out=out, engine="ray", cluster=ClusterConfig(**cluster))


def contents(folder: Path) -> dict[str, Any]:
    """Everything a build decides, per collection: rows (all columns but the vector), vectors by
    id, outcomes and counts."""
    out: dict[str, Any] = {}
    with Store.open(folder) as store:
        for name in ("images", "captions"):
            state = store.state(name)
            outcomes = sorted((o.source, o.status, o.stage, o.code) for o in store.outcomes(name))
            if not state.shards:
                out[name] = ([], np.empty((0, 0)), outcomes, state.counts)
                continue
            rows = live(folder, name)
            assert store.manifest is not None
            vectors = embedding_matrix(
                rows.column("embedding"), int(store.manifest.model["fingerprint"]["dim"])
            )
            plain = rows.drop_columns(["embedding", "mtime_ns"]).to_pylist()
            out[name] = (plain, vectors, outcomes, state.counts)
    return out


def assert_same(a: Path, b: Path) -> None:
    left, right = contents(a), contents(b)
    for name in ("images", "captions"):
        rows_a, vectors_a, outcomes_a, counts_a = left[name]
        rows_b, vectors_b, outcomes_b, counts_b = right[name]
        assert rows_a == rows_b, name
        assert outcomes_a == outcomes_b, name
        assert counts_a == counts_b, name
        if len(rows_a):
            cosine = np.sum(vectors_a * vectors_b, axis=1)
            assert cosine.min() >= 0.9999, name


def test_the_same_result_as_the_local_engine(
    config: BuildConfig, ray_address: str, tmp_path: Path, corpus: Path
) -> None:
    """Images (good, broken, duplicate), captions and sidecars, through Ray and locally, then an
    incremental rerun of each after the corpus changed: the same ids, rows, vectors, outcomes and
    counts; nothing left in staging."""
    local = build_index(config)
    ray_report = build_index(ray_config(config, tmp_path / "ray"))
    assert_same(config.out, tmp_path / "ray")
    assert ray_report.collections["images"].indexed == local.collections["images"].indexed == len(GOOD)
    images = ray_report.collections["images"]
    assert [s.name for s in images.stages] == ["decode", "encode", "write", "commit"]
    assert images.stages[1].inputs == images.encoded > 0
    assert images.verdict.split(":")[0].split(" (")[0] in {
        "decode-bound",
        "encode-bound",
        "write-bound",
        "commit-bound",
    }
    assert not (tmp_path / "ray" / "images" / "_retrieval" / "staging").exists()

    # The corpus changes: one file new, one gone, one rewritten; the incremental reruns agree.
    Image.new("RGB", (20, 30), (200, 10, 10)).save(corpus / "new.png")
    (corpus / "pic.webp").unlink()
    Image.new("RGB", (30, 20), (10, 200, 10)).save(corpus / "scan.tiff")
    local = build_index(config)
    again = build_index(ray_config(config, tmp_path / "ray"))
    assert_same(config.out, tmp_path / "ray")
    assert again.collections["images"].encoded == local.collections["images"].encoded == 2
    assert again.collections["images"].deleted == local.collections["images"].deleted


def test_a_killed_encoding_worker_is_started_again(
    config: BuildConfig, ray_address: str, tmp_path: Path
) -> None:
    """The actor dies under the build's feet (SIGKILL) as its first batch is sent: Ray starts it
    again, the batch is redone, and the result is the local engine's."""
    build_index(config)
    target = ray_config(config, tmp_path / "ray", decode_group=2)
    encoder = Encoder.load(config.model, device="cpu")
    executor = RayExecutor(encoder, target.images, target.cluster, batch_size=2)
    killed: list[int] = []

    class KillsTheWorker(Silent):
        def advance(self, n: int) -> None:
            if not killed and executor._actors:
                pid = int(ray.get(executor._actors[0].ready.remote()).rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    try:
        report = build_index(target, progress=KillsTheWorker(), encoder=encoder, executor=executor)
    finally:
        executor.close()
        encoder.close()
    assert killed
    assert_same(config.out, target.out)
    encode = next(s for s in report.collections["images"].stages if s.name == "encode")
    assert encode.restarts == 1


def test_a_killed_driver_leaves_only_uncommitted_items_and_the_rerun_finishes(
    config: BuildConfig, ray_address: str, tmp_path: Path, corpus: Path
) -> None:
    """The driver (an ``index build`` process joined to the session's cluster) is killed with
    SIGKILL once it has committed an item: staging holds only items no commit names, and the
    rerun redoes only what was not committed, ending as a local build."""
    for k in range(12):
        Image.new("RGB", (24 + k, 24), (k * 20, 40, 90)).save(corpus / f"many-{k:02d}.png")
    build_index(config)
    out = tmp_path / "ray"
    args = build_args(dataclasses.replace(config, out=out), "--engine", "ray", "--ray-address", ray_address)
    driver = subprocess.Popen([*args, "--shard-rows", "2", "--batch-size", "2"], stderr=subprocess.PIPE)
    log = out / "images" / "_delta_log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if any('"add"' in p.read_text() and "shard-" in p.read_text() for p in sorted(log.glob("*.json"))):
            break  # an item is committed
        time.sleep(0.02)
    assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
    driver.kill()
    driver.wait()
    with Store.open(out, write=True) as store:  # its newest commits (readers see none before an index)
        committed = {i for _, t in store.iter_shards("images", ["id"]) for i in t.column("id").to_pylist()}
    assert committed
    for receipt in _staged(out):  # item-<first id>-<digest>.json
        assert int(receipt.stem.split("-")[1]) not in committed, receipt.name

    report = build_index(ray_config(config, out, decode_group=2))
    assert_same(config.out, out)
    assert not _staged(out)
    encoded = next(s.inputs for s in report.collections["images"].stages if s.name == "encode")
    assert encoded <= len(GOOD) + 12 - len(committed)


def _staged(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/_retrieval/staging/item-*.json"))


class _Dies(Exception):
    pass


class _StagesThenDies:
    """An executor whose workers stage every item, and whose driver dies before committing any."""

    def __init__(self, inner: RayExecutor) -> None:
        self.inner, self.stages, self.gpus = inner, (), 0.0

    def run(self, *args: Any) -> Iterator[Any]:
        results = list(self.inner.run(*args))
        raise _Dies(f"{len(results)} items staged, none committed")
        yield  # a generator, as executors are

    def close(self) -> None:
        self.inner.close()


def test_what_a_killed_driver_staged_is_reused_and_the_rest_removed(
    config: BuildConfig, ray_address: str, tmp_path: Path
) -> None:
    """Items staged by a build that died before committing them: the rerun commits them without
    the model; a staged file no plan asks for is removed once the build is done."""
    target = ray_config(config, tmp_path / "ray")
    encoder = Encoder.load(config.model, device="cpu")
    try:
        executor = RayExecutor(encoder, target.images, target.cluster)
        with pytest.raises(_Dies):
            build_index(target, encoder=encoder, executor=_StagesThenDies(executor))  # type: ignore[arg-type]
    finally:
        encoder.close()
    assert len(_staged(target.out)) == -(-len(GOOD + list(BAD)) // config.image_shard_rows)
    stale = target.out / "images" / "_retrieval" / "staging" / "item-000000099999-0123456789abcdef0123.json"
    stale.write_text("{}")

    report = build_index(target)
    build_index(config)
    assert_same(config.out, target.out)
    images = report.collections["images"]
    assert next(s.inputs for s in images.stages if s.name == "encode") == 0  # every item was staged
    assert images.added == images.encoded == len(GOOD)  # as the workers staged them
    assert not _staged(target.out) and not stale.exists()


@pytest.mark.slow
def test_a_cluster_of_two_nodes_on_loopback(config: BuildConfig, tmp_path: Path) -> None:
    """``ray start --head`` and a second node joining it over loopback, then ``index build
    --engine ray --ray-address``: both nodes are in the cluster the build ran on, and the result
    is the local engine's."""
    if ray.is_initialized():
        ray.shutdown()  # this session's own cluster: `ray stop` below would take it down anyway
    tool = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = [tool, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false"]
    second = [tool, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the node joining reads the head's token file
    try:
        subprocess.run([*head, *common], check=True, capture_output=True, timeout=120, env=env)
        subprocess.run([*second, *common], check=True, capture_output=True, timeout=120, env=env)
        address = f"127.0.0.1:{port}"
        nodes = subprocess.run(
            [sys.executable, "-c", _COUNT_NODES, address], check=True, capture_output=True, text=True, env=env
        )
        assert nodes.stdout.split()[-1] == "2"
        out = tmp_path / "ray"
        args = build_args(dataclasses.replace(config, out=out), "--engine", "ray", "--ray-address", address)
        build = subprocess.run(
            [*args, "--encode-workers", "2"], capture_output=True, text=True, timeout=600, env=env
        )
        assert build.returncode == 0, build.stderr[-3000:]
        assert "images stages: decode" in build.stdout
    finally:
        subprocess.run([tool, "stop", "--force"], capture_output=True, timeout=120)
    build_index(config)
    assert_same(config.out, out)


_COUNT_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print(sum(n["Alive"] for n in ray.nodes()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ray_flags_need_the_ray_engine(config: BuildConfig) -> None:
    """`--ray-address` and the worker flags without `--engine ray`, or an unknown engine: a usage
    error (exit 2), and nothing written."""
    for extra in (["--ray-address", "auto"], ["--encode-workers", "2"], ["--engine", "spark"]):
        assert cli(build_args(config, *extra)[1:]) == 2
    assert not config.out.exists()


def test_more_gpus_than_the_cluster_has_is_refused(config: BuildConfig, ray_address: str) -> None:
    """Workers that ask for GPUs the cluster does not have: one clear error before any work."""
    target = dataclasses.replace(config, engine="ray", cluster=ClusterConfig(gpus_per_worker=1))
    with pytest.raises(ConfigError, match="GPUs; the cluster has 0"):
        build_index(target)
    assert not (config.out / "catalog.json").exists()


def test_without_ray_the_ray_engine_says_how_to_install_it(
    config: BuildConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "retrieval.build.ray_engine", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'retrieval\[ray\]'"):
        build_index(dataclasses.replace(config, engine="ray"))


def dies_on_bmp(path: Path, *args: Any) -> Any:
    """A decoder whose process dies on a .bmp, as a decoder crashing in C would."""
    if path.suffix == ".bmp":
        os._exit(1)
    return reader.decode_file(path, *args)


def test_a_file_that_kills_its_decoder_fails_alone(config: BuildConfig, ray_address: str) -> None:
    """The decoding task holding pic.bmp dies twice: its group is decoded one file per task, the
    .bmp fails with the reason, and every other file is indexed."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests
    target = dataclasses.replace(config, engine="ray", cluster=ClusterConfig(decode_group=4))
    with Encoder.load(config.model, device="cpu") as encoder:
        executor = RayExecutor(encoder, config.images, target.cluster, decode=dies_on_bmp)
        try:
            build_index(target, encoder=encoder, executor=executor)
        finally:
            executor.close()
    with Store.open(config.out) as store:
        failed = {o.source: o.reason for o in store.outcomes("images") if o.status == "failed"}
        assert failed["pic.bmp"].startswith("its decoding worker died")
        assert store.state("images").counts["indexed"] == len(GOOD) - 1


def test_object_store_uris_are_refused_in_one_line(config: BuildConfig) -> None:
    for images, out in ((Path("s3://bucket/images"), config.out), (config.images, Path("gs://b/index"))):
        with pytest.raises(InputError, match="object-store URIs are not supported"):
            build_index(dataclasses.replace(config, images=images, out=out, engine="ray"))
    assert not config.out.exists()
