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
  the one-time copy of the vectors out of Parquet;
- every item's top-50 through the index, written to Parquet by ``write_neighbors`` (measured).

Part 2, duplicates (``--planted``): two corpora of 1,554 pictures, the shipped clip art
(data/images: real drawings, with variants of one artwork and byte-identical files of its own,
which count against precision unless identical) and photo-like pictures made distinct by
construction (smooth random colour fields with grain); each with planted near-copies of a seeded
sample of it: a third re-encoded as JPEG at quality 75, a third resized to
85%, a third cropped by 4% a side. Two sets of vectors for the same files: a pixel descriptor (the
grey 16 x 16 thumbnail, mean removed, unit norm: 256-d), and the demo model's (``make demo``
trains it: checkpoints/demo/checkpoint.pt; skipped without it). Then ``find_duplicates`` with
the threshold it chooses and with given ones. Precision and recall are counted on pairs: a pair
of items put in one group is right when one is a planted copy of the other, or both have the same
bytes (the clip art holds some byte-identical files of its own).

Part 3, calibration: the fitted tail of random pairs against 100M fresh pairs of isotropic unit
vectors in 8 to 256 dimensions: the rate they exceed a threshold chosen for a stated rate, divided
by it.

    python benchmarks/bench_neighbors.py                     # 1M vectors, then the planted copies
    python benchmarks/bench_neighbors.py --rows 200000 --queries 4096 --planted 150   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
from common import vector_store
from PIL import Image

from retrieval import BuildConfig, ModelSpec, Retriever, build_index
from retrieval.ann.calibration import score_null
from retrieval.ann.exact import recall_at
from retrieval.ann.faiss_index import batched_blas
from retrieval.search.duplicates import DuplicatesConfig, find_duplicates
from retrieval.search.neighbors import NeighborsConfig, NeighborSearch, write_neighbors

ROOT = Path(__file__).resolve().parents[1]
FILE_ROWS = 100_000


def vectors_of(number: int, rows: int, topics: np.ndarray, weights: np.ndarray, noise: float) -> np.ndarray:
    rng = np.random.default_rng([7, number])
    count = min(FILE_ROWS, rows - number * FILE_ROWS)
    x = topics[rng.choice(len(topics), count, p=weights)]
    x = x + noise * rng.standard_normal(x.shape, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_store(folder: Path, rows: int, dim: int, topics: int, noise: float) -> np.ndarray:
    """The store and its IVF index, through the engine's own schema and commits; -> all vectors."""
    rng = np.random.default_rng(0)
    centres = (rng.standard_normal((topics, dim)) / np.sqrt(dim) * 3).astype(np.float32)
    weights = 1 / np.sqrt(np.arange(1, topics + 1))
    weights /= weights.sum()
    every = np.empty((rows, dim), np.float32)

    def files() -> Iterator[tuple[np.ndarray, list[str], list[str], np.ndarray]]:
        for number in range(-(-rows // FILE_ROWS)):
            x = vectors_of(number, rows, centres, weights, noise)
            start = number * FILE_ROWS
            ids = np.arange(start, start + len(x), dtype=np.int64)
            every[start : start + len(x)] = x
            yield ids, [f"p/{i}.jpg" for i in ids], [f"{i:064x}" for i in ids], x

    vector_store(folder, files(), dim, index="ivf")
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
            whole = None
            if args.all_index:  # every item, through the index, as `retrieval neighbors --method index`
                config = NeighborsConfig(k=k, method="index")
                whole = write_neighbors(retriever, Path(tmp) / "all.parquet", config)

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
        if whole is not None:
            figures["index"]["all_items_measured"] = {
                "rows": whole.rows,
                "minutes": round(whole.seconds / 60, 2),
                "recall_at_50_sampled": whole.recall,
            }


def synthetic(folder: Path, count: int) -> Path:
    """``count`` distinct photo-like pictures (smooth random colour fields and grain, 320 x 240)."""
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True)
    for n in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (320, 240), Image.BICUBIC
        )
        pixels = np.clip(np.asarray(coarse, np.float64) + rng.normal(0, 8, (240, 320, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{n:05d}.png")
    return folder


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


def descriptor(path: Path) -> np.ndarray:
    """A 256-d pixel descriptor: the grey 16 x 16 thumbnail, its mean removed, unit norm (a flat
    picture: the first axis)."""
    grey = np.asarray(Image.open(path).convert("L").resize((16, 16), Image.BILINEAR), np.float64).ravel()
    grey -= grey.mean()
    norm = float(np.linalg.norm(grey))
    if norm < 1e-6:
        grey, norm = np.eye(256)[0], 1.0
    return (grey / norm).astype(np.float32)


def write_vectors(
    folder: Path, root: Path, paths: list[str], digests: list[str], vectors: np.ndarray
) -> None:
    """An index folder of ``vectors`` for the image files ``paths`` (relative to ``root``)."""
    ids = np.arange(len(paths), dtype=np.int64)
    vector_store(folder, [(ids, paths, digests, vectors)], vectors.shape[1], str(root), index="flat")


def groups_measured(
    folder: Path, root: Path, truth: set[frozenset[str]], thresholds: list[float | None]
) -> list:
    results = []
    with Retriever.open(folder) as retriever:
        for threshold in thresholds:
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
                    "meets_rate": report.threshold.met,
                    "pair_rate": float(f"{report.threshold.pair_rate:.3g}"),
                    "groups": len(report.groups),
                    "largest": max((len(g.ids) for g in report.groups), default=0),
                    "pairs_found": len(found),
                    "precision": round(right / len(found), 4) if found else None,
                    "recall": round(right / len(truth), 4),
                    "seconds": round(report.seconds, 2),
                }
            )
    return results


def duplicates_part(args: argparse.Namespace, figures: dict) -> None:
    figures["duplicates"] = {}
    for corpus in args.corpus:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            source = ROOT / "data/images" if corpus == "clipart" else synthetic(Path(tmp) / "made", 1_554)
            figures["duplicates"][corpus] = duplicates_of(args, source, Path(tmp))


def duplicates_of(args: argparse.Namespace, source: Path, tmp: Path) -> dict:
    root = tmp / "images"
    planted = plant(source, root, args.planted)
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    digests = [hashlib.sha256((root / p).read_bytes()).hexdigest() for p in paths]
    by_content: dict[str, list[str]] = {}
    for path, digest in zip(paths, digests, strict=True):
        by_content.setdefault(digest, []).append(path)
    truth = pairs_of([[c, o] for c, o in planted.items()]) | pairs_of(list(by_content.values()))
    out: dict = {
        "images": len(paths),
        "planted": len(planted),
        "identical_pairs_in_the_corpus": len(pairs_of(list(by_content.values()))),
        "true_pairs": len(truth),
    }
    thresholds: list[float | None] = [None, *args.thresholds]
    pixels = np.stack([descriptor(root / p) for p in paths])
    write_vectors(tmp / "pixels", root, paths, digests, pixels)
    out["pixel_descriptor"] = groups_measured(tmp / "pixels", root, truth, thresholds)
    checkpoint = ROOT / "checkpoints/demo/checkpoint.pt"
    if not checkpoint.is_file():
        out["demo_model"] = "skipped: no demo model (run `make demo` first)"
        return out
    model = ModelSpec(checkpoint, ROOT / "models/demo-minilm", ROOT / "data/demo-vit")
    build_index(BuildConfig(tmp / "demo", root, model=model, device="cpu"))
    out["demo_model"] = groups_measured(tmp / "demo", root, truth, thresholds)
    return out


def calibration_part(args: argparse.Namespace, figures: dict) -> None:
    """The fitted tail against fresh pairs: isotropic unit vectors in several dimensions, the null
    from 4,096 of them (as the engine draws it), the rate 100M fresh pairs exceed each threshold
    chosen for a rate, divided by that rate (1: exact; below 1: fewer false matches than stated)."""
    rng = np.random.default_rng(8)
    out = {}
    for dim in args.calibration_dims:
        sample = rng.standard_normal((4_096, dim)).astype(np.float32)
        sample /= np.linalg.norm(sample, axis=1, keepdims=True)
        null = score_null(sample, sample, ("images", "images"), same=True)
        fresh = rng.standard_normal((20_000, dim)).astype(np.float32)
        fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
        pairs = (fresh[:10_000] @ fresh[10_000:].T).ravel()
        out[f"{dim}-d"] = {
            f"{rate:g}": round(float((pairs > null.threshold(rate)).mean()) / rate, 3)
            for rate in (1e-4, 1e-5, 1e-6)
        }
        del pairs
    figures["calibration_fresh_rate_over_stated"] = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=16_384, help="items whose top-50 are timed")
    parser.add_argument("--topics", type=int, default=4_000)
    parser.add_argument(
        "--all-index",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write every item's top-50 through the index (measured, not estimated)",
    )
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument(
        "--planted", type=int, default=300, help="near-copies planted in the clip art (0: none)"
    )
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.9, 0.95, 0.98])
    parser.add_argument(
        "--corpus", nargs="+", choices=["clipart", "synthetic"], default=["clipart", "synthetic"]
    )
    parser.add_argument("--calibration-dims", type=int, nargs="*", default=[8, 16, 32, 64, 256])
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
    if args.calibration_dims:
        calibration_part(args, figures)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    for key, value in figures.items():
        print(f"{key}: {json.dumps(value)}")


if __name__ == "__main__":
    main()
