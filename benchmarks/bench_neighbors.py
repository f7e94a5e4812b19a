"""Whole-collection neighbours and duplicate groups, measured in one run.

Part 1, neighbours: a store of N synthetic 256-d unit vectors (default 1M: 4,000 topics, Zipf-like
weights, noise 0.25 a dimension, in data files of 100,000 rows) with an IVF index tuned by the
engine. For a block of Q items (default 16,384, one of the engine's checkpointed blocks) their
top-50 among all N, the item itself left out:

- the engine's exact path (``NeighborSearch``: the vectors memory-mapped, FAISS's BLAS search a
  chunk of 262,144 targets at a time merged in FAISS heaps, the block written as Parquet), against
  a bare ``faiss.knn`` over the same vectors held in memory as one array, same threads, in turn;
  ratio = bare seconds / engine seconds (target >= 0.8);
- the engine through the IVF index on the same items: its recall@50 against the exact lists and
  its speed-up over the exact path;
- the time all N items would take at that rate (an estimate: Q / N of the work was timed), and
  the one-time copy of the vectors out of Parquet.

Part 2, duplicates (``--planted``): the shipped clip art (data/images, 1,554 pictures) plus planted
near-copies of a seeded sample of it: a third re-encoded as JPEG at quality 75, a third resized to
85%, a third cropped by 4% a side; indexed with the demo model (``make demo`` trains it:
checkpoints/demo/checkpoint.pt), then ``find_duplicates`` with the threshold it chooses and with
given ones. Precision and recall are counted on pairs: a pair of items put in one group is right
when one is a planted copy of the other, or both have the same bytes.

    python benchmarks/bench_neighbors.py                     # 1M vectors, then the planted copies
    python benchmarks/bench_neighbors.py --rows 200000 --queries 4096 --planted 150   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from common import OPENCLIPART  # noqa: F401  (puts the repository on the path)
from PIL import Image

from retrieval import BuildConfig, ModelSpec, Retriever, build_index
from retrieval.ann.exact import recall_at
from retrieval.ann.faiss_index import IndexConfig, batched_blas, build_collection_index
from retrieval.model.fingerprint import ModelFingerprint
from retrieval.search.duplicates import DuplicatesConfig, find_duplicates
from retrieval.search.neighbors import NeighborsConfig, NeighborSearch
from retrieval.store.folder import Store, new_manifest
from retrieval.store.manifest import CollectionState
from retrieval.store.schema import ImageRow, schema, shard_table, table_description

ROOT = Path(__file__).resolve().parents[1]
FILE_ROWS = 100_000


def vectors_of(number: int, rows: int, topics: np.ndarray, weights: np.ndarray, noise: float) -> np.ndarray:
    rng = np.random.default_rng([7, number])
    count = min(FILE_ROWS, rows - number * FILE_ROWS)
    x = topics[rng.choice(len(topics), count, p=weights)]
    x = x + noise * rng.standard_normal(x.shape, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_store(folder: Path, rows: int, dim: int, topics: int, noise: float) -> np.ndarray:
    """The store, written through the engine's own schema and commits; -> all vectors (N, D)."""
    rng = np.random.default_rng(0)
    centres = (rng.standard_normal((topics, dim)) / np.sqrt(dim) * 3).astype(np.float32)
    weights = 1 / np.sqrt(np.arange(1, topics + 1))
    weights /= weights.sum()
    fingerprint = ModelFingerprint("bench", "text", "vision", "tokenizer", "preprocess", dim).to_dict()
    every = np.empty((rows, dim), np.float32)
    with Store.open(folder, write=True) as store:
        manifest = store.commit_catalog(new_manifest({"fingerprint": fingerprint}))
        refs = []
        for number in range(-(-rows // FILE_ROWS)):
            x = vectors_of(number, rows, centres, weights, noise)
            start = number * FILE_ROWS
            ids = np.arange(start, start + len(x), dtype=np.int64)
            every[start : start + len(x)] = x
            records = [ImageRow(f"p/{i}.jpg", f"{i:064x}", 1, 0, 1, 1) for i in ids]
            table = shard_table("images", ids, records, x, fingerprint)
            refs.append(store.write_table(f"images/part-{number:05d}.parquet", table))
        state = CollectionState(next_id=rows, counts={"indexed": rows}, root="/")
        state = store.commit_rows(
            store.table("images"),
            state,
            schema("images", dim),
            table_description("images", fingerprint),
            refs,
        )
        store.manifest = dataclasses.replace(manifest, collections={"images": state})
        record = build_collection_index(store, "images", IndexConfig(kind="ivf"), None, "self")
        assert record is not None
        record = dataclasses.replace(record, version=state.version, rows_version=state.rows_version)
        store.commit_catalog(
            dataclasses.replace(
                store.manifest, collections={"images": dataclasses.replace(state, index=record)}
            )
        )
    return every


def neighbours_part(args: argparse.Namespace, figures: dict) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "index"
        started = time.perf_counter()
        every = write_store(folder, args.rows, args.dim, args.topics, args.noise)
        figures["store_and_ivf_seconds"] = round(time.perf_counter() - started, 1)
        k = 50
        with Retriever.open(folder) as retriever:
            index = retriever.index("images")
            figures["ivf"] = {"kind": index.kind, index.param or "param": index.value}
            config = NeighborsConfig(k=k, block_rows=args.queries)
            started = time.perf_counter()
            search = NeighborSearch(retriever.store, config, Path(tmp) / "scratch", index)
            figures["vector_copy_seconds"] = round(time.perf_counter() - started, 1)

            started = time.perf_counter()
            block = search.block(0)
            block.table()
            ours = time.perf_counter() - started

            queries = every[: args.queries]
            started = time.perf_counter()
            with batched_blas():
                bare_scores, bare_positions = faiss.knn(queries, every, k + 1, faiss.METRIC_INNER_PRODUCT)
            bare = time.perf_counter() - started

            ivf_search = NeighborSearch(
                retriever.store, dataclasses.replace(config, method="index"), Path(tmp) / "scratch", index
            )
            started = time.perf_counter()
            approximate = ivf_search.block(0)
            ivf = time.perf_counter() - started
            sampled_recall = ivf_search.recall()

        bare_ids = bare_positions[:, 1:]  # ids are positions here; the item itself scores first
        figures["exact"] = {
            "queries": args.queries,
            "engine_seconds": round(ours, 2),
            "bare_faiss_seconds": round(bare, 2),
            "ratio_bare_over_engine": round(bare / ours, 3),
            "agreement_with_bare": round(
                recall_at(block.neighbor_ids, bare_ids, block.scores, bare_scores[:, 1:]), 5
            ),
            "all_items_hours_estimate": round(ours * args.rows / args.queries / 3600, 2),
        }
        figures["index"] = {
            "engine_seconds": round(ivf, 2),
            "speedup_over_exact": round(ours / ivf, 1),
            "recall_at_50": round(
                recall_at(approximate.neighbor_ids, block.neighbor_ids, approximate.scores, block.scores), 4
            ),
            "recall_at_50_sampled_by_the_engine": None
            if sampled_recall is None
            else round(sampled_recall, 4),
            "all_items_minutes_estimate": round(ivf * args.rows / args.queries / 60, 1),
        }


def plant(images: Path, out: Path, count: int) -> dict[str, str]:
    """Copies of ``count`` seeded originals under ``out/planted``: copy path -> original path,
    both relative to ``out``."""
    originals = sorted(images.rglob("*.png"))
    for path in originals:
        target = out / "corpus" / path.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    chosen = np.random.default_rng(0).choice(len(originals), min(count, len(originals)), replace=False)
    (out / "planted").mkdir(parents=True)
    planted = {}
    for n, index in enumerate(sorted(chosen)):
        source = originals[index]
        image = Image.open(source).convert("RGB")
        original = str(Path("corpus") / source.relative_to(images))
        if n % 3 == 0:
            name = f"planted/{n:04d}-q75.jpg"
            image.save(out / name, quality=75)
        elif n % 3 == 1:
            name = f"planted/{n:04d}-85pc.png"
            image.resize(
                (max(1, image.width * 85 // 100), max(1, image.height * 85 // 100)), Image.LANCZOS
            ).save(out / name)
        else:
            name = f"planted/{n:04d}-crop4.png"
            w, h = image.size
            image.crop((w * 4 // 100, h * 4 // 100, w - w * 4 // 100, h - h * 4 // 100)).save(out / name)
        planted[name] = original
    return planted


def pairs_of(groups: list[list[str]]) -> set[frozenset[str]]:
    return {frozenset((a, b)) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]}


def duplicates_part(args: argparse.Namespace, figures: dict) -> None:
    checkpoint = ROOT / "checkpoints/demo/checkpoint.pt"
    if not checkpoint.is_file():
        figures["duplicates"] = "skipped: no demo model (run `make demo` first)"
        return
    model = ModelSpec(checkpoint, ROOT / "models/demo-minilm", ROOT / "data/demo-vit")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp) / "images"
        planted = plant(ROOT / "data/images", root, args.planted)
        build_index(BuildConfig(Path(tmp) / "index", root, model=model, device="cpu"))
        with Retriever.open(Path(tmp) / "index") as retriever:
            rows = retriever.rows("images")
            digests = dict(
                zip(
                    rows.table.column("path").to_pylist(),
                    rows.table.column("sha256").to_pylist(),
                    strict=True,
                )
            )
            by_content: dict[str, list[str]] = {}
            for path, digest in digests.items():
                by_content.setdefault(digest, []).append(path)
            truth = pairs_of([[c, o] for c, o in planted.items()]) | pairs_of(list(by_content.values()))
            results = []
            for threshold in [None, *args.thresholds]:
                report = find_duplicates(retriever, DuplicatesConfig(threshold=threshold))
                groups = [
                    [str(Path(report.labels[int(i)]).relative_to(root)) for i in g.ids] for g in report.groups
                ]
                found = pairs_of(groups)
                right = len(found & truth)
                results.append(
                    {
                        "threshold": round(report.threshold.value, 4),
                        "chosen": report.threshold.auto,
                        "pair_rate": report.threshold.pair_rate,
                        "groups": len(report.groups),
                        "pairs_found": len(found),
                        "precision": round(right / len(found), 4) if found else None,
                        "recall": round(right / len(truth), 4),
                        "seconds": round(report.seconds, 2),
                    }
                )
        figures["duplicates"] = {
            "images": len(digests),
            "planted": len(planted),
            "true_pairs": len(truth),
            "runs": results,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=16_384, help="items whose top-50 are timed")
    parser.add_argument("--topics", type=int, default=4_000)
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument(
        "--planted", type=int, default=300, help="near-copies planted in the clip art (0: none)"
    )
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.9, 0.95, 0.98])
    parser.add_argument("--tmp", default=os.environ.get("TMPDIR"), help="where the stores are written")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "faiss_threads": faiss.omp_get_max_threads(),
        "rows": args.rows,
        "dim": args.dim,
    }
    if args.rows:
        neighbours_part(args, figures)
    if args.planted:
        duplicates_part(args, figures)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for key, value in figures.items():
        print(f"{key}: {json.dumps(value)}")


if __name__ == "__main__":
    main()
