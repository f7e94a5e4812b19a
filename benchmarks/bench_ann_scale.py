"""The FAISS layer at scale: the ``auto`` index against exact search on N synthetic vectors.

The collection lives in a synthetic store whose data files (100,000 rows each) are generated from a
seed each time they are read, so the N vectors are never all in memory beside the index: the
build's peak RSS is its own. The "images" are unit vectors around 4,000 topics (centres of norm 3,
Zipf-like weights 1/sqrt(rank)) with isotropic noise of 0.25 a dimension (``--noise``: cosine to
their topic about 0.6); the queries come from another distribution, the "captions": the same topics
weighted evenly, noise 0.3 (``--query-noise``), and a shift of norm 1 common to all of them (the
gap between two modalities). The more noise, the less the neighbours follow the topics, and the
more lists an IVF index must scan for the same recall.
1,000 queries tune the index inside ``build_collection_index``; 1,000 others, held out, measure it.

Printed, from one run: what ``auto`` chose and why (its reason, as ``index info`` shows it), build
seconds and peak RSS, recall@10 of the tuned index against exact search on the held-out queries,
and the queries per second of the tuned index and of exact search (FAISS's flat inner product with
BLAS, timed over two data files held in memory and scaled to N: brute force costs the same for every
row), both batched (the 1,000 held-out queries at once), on the same threads, timed in turn.

    python benchmarks/bench_ann_scale.py [--rows 1000000] [--noise 0.25] [--query-noise 0.3]
                                         [--memory-budget GB] [--json]

Targets (SPEC 8): recall@10 >= 0.95 at >= 20x the exact QPS at 1M rows, at >= 50x at 10M.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.ann.faiss_index import IndexConfig, batched_blas, build_collection_index, load_index, recall_at
from retrieval.store.manifest import FileRef
from retrieval.vectors import embedding_array

FILE_ROWS = 100_000


class SyntheticStore:
    """The store surface the FAISS layer uses (``live_rows``, the model's dimension, a folder to
    write the index in), over generated data files: block ``b`` is drawn from seed ``(seed, b)``."""

    def __init__(self, folder: Path, rows: int, topics: np.ndarray, noise: float, seed: int) -> None:
        self.folder, self.rows, self.topics, self.noise, self.seed = folder, rows, topics, noise, seed
        dim = topics.shape[1]
        self.manifest = SimpleNamespace(model={"fingerprint": {"dim": dim}}, generation=0)
        weights = 1 / np.sqrt(np.arange(1, len(topics) + 1))
        self.weights = weights / weights.sum()

    def block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        start = number * FILE_ROWS
        count = min(FILE_ROWS, self.rows - start)
        rng = np.random.default_rng([self.seed, number])
        vectors = mixture(rng, self.topics, rng.choice(len(self.topics), count, p=self.weights), self.noise)
        return np.arange(start, start + count, dtype=np.int64) * 2 + 1, vectors  # ids are not positions

    def live_rows(self, collection: str, columns: list[str]) -> Iterator[tuple[FileRef, pa.Table]]:
        for number in range(-(-self.rows // FILE_ROWS)):
            ids, vectors = self.block(number)
            data = {"id": pa.array(ids)}
            if "embedding" in columns:
                data["embedding"] = embedding_array(vectors)
            yield FileRef(f"{collection}/part-{number:05d}.parquet", "", len(ids), 0), pa.table(data)

    def file_ref(self, name: str, rows: int) -> FileRef:
        path = self.folder / name
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        return FileRef(name, digest.hexdigest(), rows, path.stat().st_size)

    def verify(self, ref: FileRef) -> None:
        """The benchmark wrote the file itself a moment ago."""


def mixture(
    rng: np.random.Generator,
    topics: np.ndarray,
    chosen: np.ndarray,
    noise: float,
    shift: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Unit vectors: the ``chosen`` topics plus isotropic noise (plus a common shift). (n, D) float32."""
    x = rng.standard_normal((len(chosen), topics.shape[1]), dtype=np.float32)
    x *= noise
    x += topics[chosen]
    x += shift
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_search(store: SyntheticStore, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids (Q, k) over every block: the truth recall is measured against."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for number in range(-(-store.rows // FILE_ROWS)):
        ids, vectors = store.block(number)
        with batched_blas():
            scores, positions = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, ids[positions]], axis=1)
        order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, 1)
        best_ids = np.take_along_axis(merged_ids, order, 1)
    return best_ids


def exact_seconds(blocks: list[np.ndarray], queries: np.ndarray, k: int, rows: int) -> float:
    """Seconds exact search of ``queries`` takes over ``rows`` vectors: timed over ``blocks``, held in
    memory, and scaled by ``rows`` over their rows (brute force costs the same for every row)."""
    start = time.perf_counter()
    with batched_blas():  # FAISS's BLAS path, as the engine's own batched searches take it
        for vectors in blocks:
            faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    return (time.perf_counter() - start) * rows / sum(len(b) for b in blocks)


def peak_rss_gb() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--topics", type=int, default=4_000)
    parser.add_argument("--noise", type=float, default=0.25, help="the vectors' noise a dimension")
    parser.add_argument("--query-noise", type=float, default=0.3, help="the queries' noise a dimension")
    parser.add_argument("--queries", type=int, default=1_000, help="tuning queries, and as many held out")
    parser.add_argument(
        "--memory-budget", type=float, default=None, help="GB (default: half the free memory)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    topics = rng.standard_normal((args.topics, args.dim), dtype=np.float32) * np.float32(
        3 / np.sqrt(args.dim)
    )
    gap = rng.standard_normal(args.dim, dtype=np.float32) * np.float32(1 / np.sqrt(args.dim))
    queries = mixture(rng, topics, rng.integers(0, args.topics, 2 * args.queries), args.query_noise, gap)
    tuning, held_out = queries[: args.queries], queries[args.queries :]
    budget = int(args.memory_budget * 1e9) if args.memory_budget else None

    with tempfile.TemporaryDirectory() as tmp:
        store = SyntheticStore(Path(tmp), args.rows, topics, args.noise, seed=1)
        start = time.perf_counter()
        record = build_collection_index(
            store, "images", IndexConfig(memory_budget=budget), tuning, "captions"
        )
        build_s = time.perf_counter() - start
        peak = peak_rss_gb()
        assert record is not None
        index = load_index(store, record)
        truth = exact_search(store, held_out, 10)
        timed = [store.block(number)[1] for number in range(min(2, -(-args.rows // FILE_ROWS)))]
        found, _ = index.search(held_out, 10)  # warm: pages of a memory-mapped index, kernels
        index_times, exact_times = [], []
        for _ in range(3):  # interleaved, so that both see the same machine
            start = time.perf_counter()
            found, _ = index.search(held_out, 10)
            index_times.append(time.perf_counter() - start)
            exact_times.append(exact_seconds(timed, held_out, 10, args.rows))
        index_s, exact_s = float(np.median(index_times)), float(np.median(exact_times))

    recall = recall_at(found, truth)
    exact_qps, index_qps = len(held_out) / exact_s, len(held_out) / index_s
    target = 50 if args.rows >= 10_000_000 else 20
    met = recall >= 0.95 and index_qps >= target * exact_qps
    figures = {
        "rows": args.rows,
        "dim": args.dim,
        "threads": faiss.omp_get_max_threads(),
        "kind": record.kind,
        "param": record.param,
        "value": record.value,
        "refine": record.refine,
        "reason": record.reason,
        "index_gb": record.file.bytes / 1e9,
        "build_s": build_s,
        "build_peak_rss_gb": peak,
        "tuned_recall_at_10": record.recall_at_10,
        "held_out_recall_at_10": recall,
        "index_qps": index_qps,
        "exact_qps": exact_qps,
        "qps_ratio": index_qps / exact_qps,
    }
    tuned = f"{record.param}={record.value}" + (f", re-rank {record.refine}x k" if record.refine else "")
    rows = [
        ("auto chose", f"{record.kind}, {tuned}, {record.file.bytes / 1e9:.2f} GB file"),
        ("why", record.reason or ""),
        ("build", f"{build_s:.0f} s, peak RSS {peak:.2f} GB"),
        ("recall@10 vs exact, tuning queries / held-out", f"{record.recall_at_10:.3f} / **{recall:.3f}**"),
        (
            f"QPS, {len(held_out):,} queries batched: auto / exact",
            f"{index_qps:,.0f} / {exact_qps:,.1f} = **{index_qps / exact_qps:.0f}x**",
        ),
        ("target", f"recall@10 >= 0.95 at >= {target}x: {'met' if met else 'NOT met'}"),
    ]
    print(
        f"{args.rows:,} x {args.dim} vectors, {args.topics:,} topics, noise {args.noise} "
        f"(queries {args.query_noise}), {figures['threads']} threads"
    )
    print("| what | figure |")
    print("|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} |")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
