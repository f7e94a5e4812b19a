"""The FAISS layer at scale, tested fast: IVF's lists and training sample, the memory budget and
``auto``'s reasons, the one-pass uniform sample, and the recall target, over fake stores whose
data files are synthetic blocks (the real store is exercised by test_search.py)."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pyarrow as pa
import pytest

from retrieval.ann import faiss_index, sizing
from retrieval.ann.axes import principal_axes
from retrieval.ann.exact import exact_search, recall_within_ties, tie_groups
from retrieval.ann.faiss_index import (
    Budget,
    IndexConfig,
    available_memory,
    build_collection_index,
    load_index,
    plan_index,
    recall_at,
    resolve_budget,
    sample_vectors,
)
from retrieval.ann.rerank import Rerank, RerankWriter
from retrieval.errors import ConfigError
from retrieval.store.manifest import FileRef
from retrieval.vectors import embedding_array

GB = 10**9


class FakeStore:
    """What the FAISS layer may use of a store: ``live_rows`` over data files of ``file_rows``
    rows made by ``make(start, count)`` when asked for, the model's dimension, and a folder with
    file refs so that an index can be written and loaded. Counts its passes by columns read."""

    def __init__(
        self, folder: Path, rows: int, dim: int, make: Callable[[int, int], np.ndarray], file_rows: int
    ) -> None:
        self.folder, self.rows, self.make, self.file_rows = folder, rows, make, file_rows
        self.manifest = SimpleNamespace(model={"fingerprint": {"dim": dim}}, generation=0)
        self.passes: Counter[tuple[str, ...]] = Counter()

    def ids(self, start: int, count: int) -> np.ndarray:
        return np.arange(start, start + count, dtype=np.int64) * 3 + 7  # ids are not positions

    def live_rows(self, collection: str, columns: list[str]) -> Iterator[tuple[FileRef, pa.Table]]:
        self.passes[tuple(columns)] += 1
        for start in range(0, self.rows, self.file_rows):
            count = min(self.file_rows, self.rows - start)
            data = {"id": pa.array(self.ids(start, count))}
            if "embedding" in columns:
                data["embedding"] = embedding_array(self.make(start, count))  # no copy of the block
            yield FileRef(f"{collection}/part-{start}.parquet", "", count, 0), pa.table(data)

    def file_ref(self, name: str, rows: int) -> FileRef:
        path = self.folder / name
        return FileRef(name, hashlib.sha256(path.read_bytes()).hexdigest(), rows, path.stat().st_size)

    def verify(self, ref: FileRef) -> None:
        digest = hashlib.sha256((self.folder / ref.file).read_bytes()).hexdigest()
        assert digest == ref.sha256


def clustered(n: int, dim: int, seed: int, centers: int = 50, noise: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = np.random.default_rng(0).normal(size=(centers, dim))  # the same topics for every seed
    x = middle[rng.integers(0, centers, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def array_store(folder: Path, vectors: np.ndarray, file_rows: int = 7_000) -> FakeStore:
    return FakeStore(folder, len(vectors), vectors.shape[1], lambda s, c: vectors[s : s + c], file_rows)


def exact(store: FakeStore, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    return store.ids(0, len(vectors))[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]


@pytest.mark.parametrize("n", [10_000_000, 100_000_000])
def test_ivf_trains_on_100_vectors_a_list(n: int) -> None:
    """The old fixed cap of 200,000 training vectors left 16 a list at 10M and 5 at 100M. The list
    count is about 4 sqrt(n), at most 4,096 (k-means and assignment cost n x lists)."""
    plan = plan_index("ivf", n, 256, Budget(1 << 50, "test"))
    assert plan.nlist == min(4096, int(4 * np.sqrt(n))) == 4096
    assert plan_index("ivf", 250_000, 256, Budget(1 << 50, "test")).nlist == 2000
    assert plan.train == 100 * plan.nlist
    assert f"({plan.train // plan.nlist} a list)" in (plan.reason or "")


def test_a_tight_budget_takes_fewer_training_vectors_and_then_fewer_lists() -> None:
    n, dim = 10_000_000, 256
    full = plan_index("ivfpq", n, dim, Budget(1 << 50, "test"))
    for share in (0.6, 0.3, 0.1):  # of the 100-a-list sample's bytes
        budget = Budget(int(share * full.train * (4 * dim + 12)) + 2 * 65_536 * (4 * dim + 8), "test")
        plan = plan_index("ivfpq", n, dim, budget)
        assert plan.train <= share * full.train
        assert plan.train >= 39 * plan.nlist
        assert plan.nlist == min(full.nlist, plan.train // 39)  # lists shrink only below 39 a list
    assert plan.nlist < full.nlist


def test_build_keeps_39_a_list_when_the_list_count_asks_for_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sizing, "_list_count", lambda n: n // 10)  # 10 training vectors a list
    sizes: list[int] = []
    sample = faiss_index.sample_vectors

    def spy(store: FakeStore, collection: str, size: int, rng: np.random.Generator) -> np.ndarray:
        drawn = sample(store, collection, size, rng)
        sizes.append(len(drawn))
        return drawn

    monkeypatch.setattr(faiss_index, "sample_vectors", spy)
    vectors = clustered(20_000, 8, seed=1)
    store = array_store(tmp_path, vectors)
    record = build_collection_index(store, "images", IndexConfig(kind="ivf"), vectors[:100], "self")
    assert record is not None
    nlist = faiss.extract_index_ivf(load_index(store, record).index).nlist  # type: ignore[arg-type]
    assert sizes[0] == 20_000 and nlist == 20_000 // 39  # every vector, and as many lists as 39 allow
    assert sizes[0] >= 39 * nlist


def test_a_small_budget_makes_auto_choose_ivfsq_and_say_why(tmp_path: Path) -> None:
    vectors, queries = clustered(60_000, 32, seed=1), clustered(300, 32, seed=2, noise=0.7)
    store = array_store(tmp_path, vectors)
    budget = plan_index("ivf", len(vectors), 32, Budget(1 << 50, "test")).peak_bytes - 1
    assert plan_index("auto", len(vectors), 32, Budget(budget, "test")).peak_bytes <= budget
    config = IndexConfig(memory_budget=budget)
    record = build_collection_index(store, "images", config, queries, "captions")
    assert record is not None and record.kind == "ivfsq"
    assert f"over the memory budget of {sizing.size_text(budget)} (given by --memory-budget)" in record.reason
    assert "60,000 vectors x 32 take 7.7 MB uncompressed" in record.reason
    assert "IVF-SQ with 8-bit codes of the principal axes (at most 32 bytes a vector" in record.reason
    assert "re-ranked on the exact vectors read from a file of 8.2 MB" in record.reason
    assert "coded on the 32 principal axes of 32 that hold 100.000% of the energy" in record.reason
    assert record.recall_at_10 is not None and record.recall_at_10 >= 0.95
    found, _ = load_index(store, record).search(queries, 10)
    assert recall_at(found, exact(store, vectors, queries)) >= 0.95


def test_a_budget_under_ivfsq_makes_auto_choose_ivfpq_and_say_why() -> None:
    n, dim = 10_000_000, 256
    sq = plan_index("ivfsq", n, dim, Budget(1 << 50, "test"))
    pq = plan_index("ivfpq", n, dim, Budget(1 << 50, "test"))
    assert pq.peak_bytes < sq.peak_bytes
    plan = plan_index("auto", n, dim, Budget(pq.peak_bytes, "test"))
    assert plan.kind == "ivfpq" and plan.peak_bytes <= pq.peak_bytes
    assert f"IVF-SQ about {sizing.size_text(sq.peak_bytes)}, over it too" in (plan.reason or "")
    assert "IVF-PQ with 4-bit fast-scan codes of the principal axes (at most 128 bytes a vector" in (
        plan.reason or ""
    )


def test_the_compressed_kinds_code_only_the_axes_that_hold_energy(tmp_path: Path) -> None:
    """Vectors from a 12-wide tower projected to 64 dimensions lie in a 12-dimensional subspace:
    IVF-SQ codes 16 axes (12 rounded up to FAISS's 8 lanes), and still finds the exact neighbours."""
    rng = np.random.default_rng(3)
    narrow = clustered(60_000, 12, seed=4)
    vectors = narrow @ np.linalg.qr(rng.normal(size=(64, 64)))[0][:12]
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    axes = principal_axes(vectors[:5000])
    assert axes.kept == 16 and axes.held > 1 - 1e-6
    assert np.allclose(axes.axes @ axes.axes.T, np.eye(16), atol=1e-5)
    assert np.allclose(np.linalg.norm(axes.apply(vectors[:100]), axis=1), 1, atol=1e-4)  # nothing lost
    store = array_store(tmp_path, vectors)
    queries = vectors[rng.choice(len(vectors), 200, replace=False)] + 0.05 * rng.normal(size=(200, 64))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    record = build_collection_index(store, "images", IndexConfig(kind="ivfsq"), queries, "captions")
    assert record is not None and record.kind == "ivfsq"
    assert "coded on the 16 principal axes of 64" in (record.reason or "")
    found, scores = load_index(store, record).search(queries, 10)
    truth = exact(store, vectors, queries)
    assert recall_at(found, truth) >= 0.95
    position = {int(i): row for row, i in enumerate(store.ids(0, len(vectors)))}
    best = vectors[[position[int(i)] for i in found[:, 0]]]
    assert np.allclose(scores[:, 0], np.einsum("qd,qd->q", best, queries), atol=1e-5)  # exact scores


def test_auto_refuses_a_budget_nothing_fits() -> None:
    with pytest.raises(ConfigError, match="even as IVF-PQ.*--memory-budget"):
        plan_index("auto", 10_000_000, 256, Budget(100 * 10**6, "given by --memory-budget"))


def test_default_budget_is_half_the_available_memory_and_the_recall_target_is_met(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sizing, "available_memory", lambda: (8 * GB, "MemAvailable in /proc/meminfo"))
    assert resolve_budget(None) == Budget(4 * GB, "half of the 8.0 GB MemAvailable in /proc/meminfo")
    assert resolve_budget(GB).bytes == GB
    vectors = clustered(60_000, 32, seed=3)
    tuning, held_out = clustered(300, 32, seed=4, noise=0.7), clustered(300, 32, seed=5, noise=0.7)
    store = array_store(tmp_path, vectors)
    record = build_collection_index(store, "images", IndexConfig(), tuning, "captions")
    assert record is not None and record.kind == "ivf"
    assert "auto: 60,000 vectors x 32" in record.reason
    assert (
        "within the memory budget of 4.0 GB (half of the 8.0 GB MemAvailable in /proc/meminfo)"
        in record.reason
    )
    assert record.recall_at_10 is not None and record.recall_at_10 >= 0.95
    index = load_index(store, record)
    assert recall_at(index.search(tuning, 10)[0], exact(store, vectors, tuning)) >= 0.95
    assert recall_at(index.search(held_out, 10)[0], exact(store, vectors, held_out)) >= 0.93


def test_available_memory_reads_meminfo_then_sysconf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:         1024 kB\nMemAvailable:    8192 kB\n")
    assert available_memory(meminfo) == (8192 * 1024, f"MemAvailable in {meminfo}")
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(sizing.os, "sysconf", lambda name: pages[name])
    assert available_memory(tmp_path / "missing") == (4_096_000, "free physical pages (sysconf)")

    def unknown(name: str) -> int:
        raise ValueError(f"unrecognized configuration name {name}")  # as os.sysconf says off Linux

    monkeypatch.setattr(sizing.os, "sysconf", unknown)
    monkeypatch.setattr(sizing, "_MEMINFO", tmp_path / "missing")
    assert available_memory(tmp_path / "missing") is None
    assert resolve_budget(None).bytes is None  # nothing readable: no limit, and the reason says so


def positions(store: FakeStore) -> Callable[[int, int], np.ndarray]:
    """Blocks whose first column is each row's position, so that a sample says which rows it took."""

    def make(start: int, count: int) -> np.ndarray:
        block = np.zeros((count, store.manifest.model["fingerprint"]["dim"]), dtype=np.float32)
        block[:, 0] = np.arange(start, start + count)
        return block

    return make


def test_sample_holds_the_sample_and_a_block_not_the_collection(tmp_path: Path) -> None:
    rows, dim, file_rows, size = 64_000, 64, 2_000, 16_000
    store = FakeStore(tmp_path, rows, dim, lambda s, c: np.zeros(0), file_rows)
    store.make = positions(store)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        drawn = sample_vectors(store, "images", size, np.random.default_rng(0))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert drawn.shape == (size, dim)
    row = 4 * dim + 8
    # The sample, the block read and the one before it, its Arrow-to-numpy copy: not 2x the sample.
    assert peak <= size * 4 * dim + 3 * file_rows * row + (256 << 10), peak
    assert store.passes[("id", "embedding")] == 1  # one pass over the vectors (and one over the ids)


def test_sample_is_uniform_without_replacement_and_seeded(tmp_path: Path) -> None:
    store = FakeStore(tmp_path, 100_000, 4, lambda s, c: np.zeros(0), 3_000)  # a short last file
    store.make = positions(store)
    taken = sample_vectors(store, "images", 20_000, np.random.default_rng(7))[:, 0]
    assert len(np.unique(taken)) == 20_000 and np.all(np.diff(taken) > 0)  # distinct, in store order
    counts = np.histogram(taken, bins=10, range=(0, 100_000))[0]
    assert np.all(np.abs(counts - 2_000) < 200), counts  # each tenth of the rows gets its tenth
    again = sample_vectors(store, "images", 20_000, np.random.default_rng(7))[:, 0]
    other = sample_vectors(store, "images", 20_000, np.random.default_rng(8))[:, 0]
    assert np.array_equal(taken, again) and not np.array_equal(taken, other)
    every = sample_vectors(store, "images", 200_000, np.random.default_rng(7))[:, 0]
    assert np.array_equal(every, np.arange(100_000))


def test_the_rerank_file_scores_the_same_read_by_pread_as_through_its_mapping(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows, dim = 3000, 32
    ids = np.arange(0, 2 * rows, 2, dtype=np.int64)  # ascending, with gaps
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    path = tmp_path / "x.rerank"
    writer = RerankWriter(path, rows, dim)
    for start in range(0, rows, 1000):
        writer(ids[start : start + 1000], vectors[start : start + 1000])
    writer.close()
    queries = rng.standard_normal((100, dim)).astype(np.float32)
    candidates = rng.choice(ids, (100, 40))
    candidates[:, -3:] = [-1, 1, 2 * rows + 2]  # none, and two ids the file does not hold
    mapped = Rerank(path, rows, dim)(queries, candidates, 10)
    read = Rerank(path, rows, dim, release=True)(queries, candidates, 10)
    np.testing.assert_array_equal(read[0], mapped[0])
    np.testing.assert_array_equal(read[1], mapped[1])
    # Both are the exact scores of the best candidates the file holds.
    held = np.where(np.isin(candidates, ids), candidates, -1)
    scores = np.where(held >= 0, np.einsum("qcd,qd->qc", vectors[np.maximum(held, 0) // 2], queries), -np.inf)
    np.testing.assert_allclose(read[1], -np.sort(-scores, axis=1)[:, :10], rtol=1e-5)
    assert set(read[0].ravel()) <= set(ids)


def test_a_tie_past_the_exact_list_is_collected_whole_and_counts_for_recall() -> None:
    rng = np.random.default_rng(7)
    vectors = clustered(600, 16, seed=8)
    vectors[100:400] = vectors[100]  # 300 copies of one vector
    ids = np.arange(600, dtype=np.int64) * 3 + 7
    queries = np.concatenate([vectors[[100]], clustered(5, 16, seed=9)])
    truth = exact_search(queries, [(ids[:250], vectors[:250]), (ids[250:], vectors[250:])], 20)
    ties = tie_groups(queries, lambda: [(ids[:250], vectors[:250]), (ids[250:], vectors[250:])], truth, 10)
    assert list(ties) == [0]  # only the query whose tie runs past 20
    assert np.array_equal(ties[0], ids[100:400])  # the whole tie, as numpy finds it
    # An index returning ten other copies (none in the exact list of 20) found the top 10.
    others = np.setdiff1d(ids[100:400], truth[0][0])
    found = np.stack([others[:10], *truth[0][1:, :10]])
    assert recall_within_ties(found, *truth) < 0.9  # by the list alone: a miss
    assert recall_within_ties(found, *truth, ties=ties) == 1.0
    wrong = found.copy()
    wrong[0] = rng.choice(np.setdiff1d(ids, ids[100:400]), 10, replace=False)  # no copy at all
    assert recall_within_ties(wrong, *truth, ties=ties) < 0.9


def test_tuning_a_collection_of_copies_measures_its_true_recall(tmp_path: Path) -> None:
    vectors = clustered(3_000, 16, seed=10)
    vectors[:2_000] = vectors[0]  # most rows one vector: every self query of them ties 2,000 ways
    store = array_store(tmp_path, vectors)
    record = build_collection_index(store, "images", IndexConfig(kind="ivf"), None, "self")
    assert record is not None and record.recall_at_10 is not None and record.recall_at_10 >= 0.95
