"""Search at scale: the auto index against exact search, FAISS's BLAS path, and the library's overhead.

In one run, on 1M x 256 unit vectors with cluster structure (written as a store's shards):

- ``auto`` index (built from the shards by ``build_collection_index``, tuned to recall@10 >= 0.95
  with cross-modal queries) vs exact search: recall@10 and queries per second, one query at a
  time; build time and the build's peak memory (in a subprocess: index + bounded batches);
- batched exact search of 100 queries with the engine's BLAS threshold vs FAISS's default;
- warm ``Retriever.search_text`` vs query encoding + raw FAISS search on the same index, with a
  real-size BERT-base text tower.

    python benchmarks/bench_search.py [--n 1000000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
from common import make_model_dir, vector_store

from retrieval import Store
from retrieval.ann.faiss_index import IndexRecord, load_index, recall_at
from retrieval.search.retriever import Retriever
from retrieval.vectors import embedding_matrix

_BUILD = """
import json, sys
import numpy as np
from pathlib import Path
from retrieval import Store
from retrieval.ann.faiss_index import IndexConfig, build_collection_index
folder = Path(sys.argv[1])
queries = np.load(folder / "queries.npy")
with Store.open(folder, write=True) as store:
    record = build_collection_index(store, "images", IndexConfig(kind=sys.argv[2]), queries, "captions")
    state = store.manifest.collections["images"]
    from dataclasses import replace
    record = replace(record, version=state.version, rows_version=state.rows_version)
    store.commit_catalog(replace(store.manifest, collections={"images": replace(state, index=record)}))
hwm = next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"record": record.to_dict(), "peak_rss_mb": int(hwm) / 1024}))
"""


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal(
        (n, centres.shape[1]), np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_store(folder: Path, n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> None:
    """A store of ``n`` vectors in data files of 100k, with paths, written through the Store API."""

    def files() -> Iterator[tuple[np.ndarray, list[str], list[str], np.ndarray]]:
        for start in range(0, n, 100_000):
            ids = np.arange(start, min(n, start + 100_000), dtype=np.int64)
            vectors = clustered(rng, centres, len(ids), 0.3).astype(np.float32)
            yield ids, [f"photos/{i:07d}.jpg" for i in ids], [""] * len(ids), vectors

    vector_store(folder, files(), dim)


def qps(search, queries: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for q in queries:
        search(q[None, :])
    return len(queries) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--centres", type=int, default=4_000, help="topics the vectors cluster around")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.centres, args.dim)).astype(np.float32) / np.sqrt(args.dim) * 3
    figures: dict[str, object] = {"n": args.n, "dim": args.dim, "threads": faiss.omp_get_max_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "store"
        start = time.perf_counter()
        write_store(folder, args.n, args.dim, rng, centres)
        figures["write_store_s"] = time.perf_counter() - start
        queries = clustered(rng, centres, 2000, 0.35).astype(np.float32)  # the "other modality"
        np.save(folder / "queries.npy", queries[:1000])
        held_out = queries[1000:]

        # 1. auto vs exact, built in a subprocess so that its peak memory is its own.
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run(
            [sys.executable, "-c", _BUILD, str(folder), "auto"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        built = json.loads(out.stdout.strip().splitlines()[-1])
        figures["auto_build_s"] = time.perf_counter() - start
        figures["auto_build_peak_rss_mb"] = built["peak_rss_mb"]
        record = IndexRecord.from_dict(built["record"])
        figures |= {
            "auto_kind": record.kind,
            "auto_param": f"{record.param}={record.value}",
            "auto_tuned_recall": record.recall_at_10,
        }
        with Store.open(folder) as store:
            index = load_index(store, record)
            blocks = store.iter_shards("images", ["embedding"])
            vectors = np.concatenate([embedding_matrix(t.column("embedding"), args.dim) for _, t in blocks])
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(vectors)
        _, truth = exact.search(held_out, 10)
        found, _ = index.search(held_out, 10)
        figures["auto_recall_at_10_held_out"] = recall_at(found, truth)
        sample = held_out[:200]
        figures["exact_qps"] = qps(lambda q: exact.search(q, 10), sample[:50])
        figures["auto_qps"] = qps(lambda q: index.search(q, 10), sample)

        # 2. batched exact search, 100 queries: FAISS's default BLAS threshold vs the engine's.
        batch = held_out[:100]
        default = faiss.cvar.distance_compute_blas_threshold
        timings = {}
        for name, threshold in (("default", default), ("engine", 16)):
            faiss.cvar.distance_compute_blas_threshold = threshold
            exact.search(batch, 10)
            start = time.perf_counter()
            for _ in range(3):
                exact.search(batch, 10)
            timings[name] = (time.perf_counter() - start) / 3
        faiss.cvar.distance_compute_blas_threshold = default
        figures["batched_exact_100q_default_s"] = timings["default"]
        figures["batched_exact_100q_engine_s"] = timings["engine"]

        # 3. warm search_text vs encode + raw search, real-size BERT-base text tower.
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        spec = make_model_dir(model_dir, rng)
        from retrieval import Encoder

        encoder = Encoder.load(spec, device="cpu")
        # The vectors are synthetic; the store adopts the real-size text tower so that queries
        # run through the whole library path.
        with Store.open(folder, write=True) as store:
            adopted = {"fingerprint": encoder.fingerprint.to_dict()}  # type: ignore[union-attr]
            store.commit_catalog(replace(store.manifest, model=adopted))  # type: ignore[arg-type]
        texts = [f"a photo of a dog number {i} on the street" for i in range(50)]
        with Retriever.open(folder, encoder=encoder) as retriever:
            retriever.search_text(texts[0])  # warm: index, rows, kernels
            raw_index = retriever.index("images")
            library_times, raw_times = [], []
            for text in texts:  # interleaved, so that both see the same machine
                start = time.perf_counter()
                retriever.search_text(text, k=10)
                library_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                raw_index.search(encoder.encode_texts([text]), 10)
                raw_times.append(time.perf_counter() - start)
            library, raw = float(np.median(library_times)), float(np.median(raw_times))
        figures["search_text_ms"] = library * 1000
        figures["encode_plus_raw_search_ms"] = raw * 1000

    ratio_qps = figures["auto_qps"] / figures["exact_qps"]  # type: ignore[operator]
    ratio_blas = timings["default"] / timings["engine"]
    ratio_library = library / raw
    figures |= {
        "ratio_auto_vs_exact_qps": ratio_qps,
        "ratio_blas_speedup": ratio_blas,
        "ratio_search_text_overhead": ratio_library,
    }
    f = figures
    rows = [
        (
            "auto index",
            f"{record.kind}, {f['auto_param']}, built in {f['auto_build_s']:.0f} s, "
            f"peak RSS {f['auto_build_peak_rss_mb']:.0f} MB",
        ),
        ("auto recall@10 vs exact (held-out cross-modal queries)", f"{f['auto_recall_at_10_held_out']:.3f}"),
        (
            "QPS, one query at a time: auto / exact",
            f"{f['auto_qps']:.0f} / {f['exact_qps']:.1f} = {ratio_qps:.0f}x",
        ),
        (
            "batched exact, 100 queries: default BLAS threshold / engine's",
            f"{timings['default'] * 1000:.0f} ms / {timings['engine'] * 1000:.0f} ms = {ratio_blas:.1f}x",
        ),
        (
            "warm search_text / (encode + raw FAISS search)",
            f"{library * 1000:.1f} ms / {raw * 1000:.1f} ms = {ratio_library:.2f}",
        ),
    ]
    print(f"{args.n:,} x {args.dim} vectors, {f['threads']} threads")
    print("| what | figure |")
    print("|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} |")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
