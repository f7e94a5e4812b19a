"""Scale: caption indexing at two sizes (1M and 10M rows by default) with a tiny text tower.

Printed in one run, each a ratio measured here:

- build time per row at the large size ÷ at the small one (target ≤ 1.2);
- peak RSS of each build (large ÷ small ≤ 1.5, and ≤ 4 GB);
- the commit time of the last 10% of a build's table commits ÷ the first 10% (≤ 1.5);
- an unchanged rerun ÷ the full build (≤ 3%), and a rerun after 1% of the rows changed ÷ the full build;
- for the large index, recall@10 of held-out queries from another distribution against exact
  search (≥ 0.95), and the index's batched QPS ÷ exact QPS (≥ 50);
- an image folder (100k small distinct JPEGs in nested folders by default) through the tiny image
  tower: images a second, peak RSS, and an unchanged rerun ÷ the full build.

Each build runs in a child process of its own, so that its peak RSS (VmHWM) is its own; the
child times every table commit. The corpora are several CSV files of synthetic captions of
realistic length (``common.make_captions``), written as a stream.

    python benchmarks/bench_scale.py                       # 1M and 10M: most of an hour and more
    python benchmarks/bench_scale.py --rows 20000,200000 --images 5000   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import WORDS, make_captions, make_model_dir
from PIL import Image

from retrieval import Retriever
from retrieval.ann.exact import exact_search, recall_at
from retrieval.ann.sampling import live_vectors

# The child: one build, every table commit timed, then its peak RSS.
_BUILD = """
import json, sys, time
from pathlib import Path
from retrieval import BuildConfig, ModelSpec, build_index
from retrieval.ann.faiss_index import IndexConfig
from retrieval.store import table

timings = []
commit = table.DeltaCollection.commit

def timed(self, *args, **kwargs):
    started = time.perf_counter()
    try:
        return commit(self, *args, **kwargs)
    finally:
        timings.append(time.perf_counter() - started)

table.DeltaCollection.commit = timed
model, out, budget, collection, *inputs = sys.argv[1:]
model = Path(model)
spec = ModelSpec(model / "best_checkpoint.pt", model / "bert-base-uncased", model / "vit-base-patch16-224")
index = IndexConfig(memory_budget=int(float(budget) * 1e9) if float(budget) else None)
paths = {"images": Path(inputs[0])} if collection == "images" else {"captions": tuple(map(Path, inputs))}
started = time.perf_counter()
report = build_index(BuildConfig(out=Path(out), model=spec, device="cpu", index=index, **paths))
seconds = time.perf_counter() - started
status = Path("/proc/self/status").read_text()
peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
built = report.collections[collection]
print(json.dumps({"seconds": seconds, "commits": timings, "peak": peak, "added": built.added,
                  "encoded": built.encoded, "indexed": built.indexed, "failed": built.failed,
                  "index": report.indexes[collection].reason if collection in report.indexes else None}))
"""


def write_corpus(folder: Path, rows: int, files: int, rng: np.random.Generator) -> list[Path]:
    """``rows`` captions over ``files`` CSV files, written a chunk at a time."""
    folder.mkdir(parents=True)
    paths = [folder / f"part-{k:02d}.csv" for k in range(files)]
    per = -(-rows // files)
    for k, path in enumerate(paths):
        count = min(per, rows - k * per)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["caption", "source_id"])
            for start in range(0, count, 100_000):
                chunk = make_captions(min(100_000, count - start), rng)
                writer.writerows([c, f"{k}-{start + i}"] for i, c in enumerate(chunk))
    return paths


def write_images(folder: Path, count: int, rng: np.random.Generator) -> None:
    """``count`` distinct small JPEGs (colour fields with their own grain, 64-160 px a side), a
    thousand to a folder, two levels deep: every one goes through the model."""
    fields = [rng.integers(0, 256, (3, 4, 3), dtype=np.uint8) for _ in range(64)]
    for k in range(count):
        w, h = (int(x) for x in rng.integers(64, 161, 2))
        base = Image.fromarray(fields[k % len(fields)]).resize((w, h), Image.BILINEAR)
        pixels = np.asarray(base, np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        path = folder / f"{k // 100_000:02d}" / f"{k // 1000 % 100:02d}" / f"{k:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=85)


def change_one_percent(paths: list[Path], rng: np.random.Generator) -> int:
    """Rewrite 1% of the rows, spread over every file, in place; how many changed."""
    changed = 0
    for path in paths:
        temporary = path.with_suffix(".tmp")
        with path.open(newline="") as src, temporary.open("w", newline="") as dst:
            reader, writer = csv.reader(src), csv.writer(dst)
            writer.writerow(next(reader))
            for row in reader:
                if rng.random() < 0.01:
                    row[0] = row[0].removesuffix(".") + " " + str(rng.choice(WORDS)) + "."
                    changed += 1
                writer.writerow(row)
        temporary.replace(path)
    return changed


def build(model: Path, out: Path, paths: list[Path], budget: float, collection: str = "captions") -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _BUILD, str(model), str(out), str(budget), collection, *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        raise SystemExit(f"the build of {out} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def commit_ratio(timings: list[float]) -> float:
    tenth = max(1, len(timings) // 10)
    return float(np.mean(timings[-tenth:]) / np.mean(timings[:tenth]))


def held_out_quality(index: Path, rng: np.random.Generator, queries: int = 1000) -> dict:
    """Recall@10 and QPS of the built index for captions of another distribution than the corpus:
    more words, drawn from half the vocabulary, so that they sit between the corpus's clusters."""
    words = np.array(WORDS[: len(WORDS) // 2])
    lengths = np.clip(rng.lognormal(np.log(20), 0.3, queries).astype(int), 8, 60)
    texts = [" ".join(rng.choice(words, size=k)) for k in lengths]
    with Retriever.open(index, device="cpu") as r:
        vectors = r.encode_texts(texts)
        r.search_vectors(vectors[:10], k=10, target="captions")  # load the index
        started = time.perf_counter()
        found, found_scores = r.search_vectors(vectors, k=10, target="captions")
        index_seconds = time.perf_counter() - started
        truth, truth_scores = exact_search(vectors, live_vectors(r.store, "captions"), 10)
        # Exact QPS from blocks already in memory (as an exact index would hold them), on up to
        # 1M rows and scaled to the collection: brute force costs the same for every row.
        held, rows = [], 0
        for ids, block in live_vectors(r.store, "captions"):
            held.append((ids.copy(), block.copy()))
            rows += len(ids)
            if rows >= 1_000_000:
                break
        started = time.perf_counter()
        exact_search(vectors, held, 10)
        exact_seconds = (time.perf_counter() - started) * r.size("captions") / rows
    recall = recall_at(found, truth, found_scores, truth_scores)
    return {"recall_at_10": recall, "qps_ratio": exact_seconds / index_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,10000000", help="the two sizes, comma-separated")
    parser.add_argument("--files", type=int, default=4, help="caption files per corpus")
    parser.add_argument("--images", type=int, default=100_000, help="images in the image folder (0: none)")
    parser.add_argument(
        "--budget", type=float, default=0.0, help="FAISS memory budget in GB (0: the default)"
    )
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args()
    small, large = (int(x) for x in args.rows.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; work in {work}")
    model = work / "tiny"
    model.mkdir(parents=True, exist_ok=True)
    make_model_dir(model, rng, tiny=True)
    results = {}
    try:
        for rows in (small, large):
            paths = write_corpus(work / f"corpus-{rows}", rows, args.files, rng)
            out = work / f"index-{rows}"
            full = build(model, out, paths, args.budget)
            rerun = build(model, out, paths, args.budget)
            changed = change_one_percent(paths, rng)
            change = build(model, out, paths, args.budget)
            results[rows] = {"full": full, "rerun": rerun, "change": change, "changed": changed, "out": out}
            print(
                f"{rows:>11,} rows: build {full['seconds']:.1f} s "
                f"({full['seconds'] / rows * 1e6:.1f} µs/row), "
                f"peak RSS {full['peak'] / 1e9:.2f} GB, {len(full['commits'])} commits; "
                f"unchanged rerun {rerun['seconds']:.1f} s; {changed:,} rows changed: rerun "
                f"{change['seconds']:.1f} s ({change['encoded']:,} encoded)",
                flush=True,
            )
            print(f"             index: {full['index']}", flush=True)
        quality = held_out_quality(results[large]["out"], rng)
        if args.images:
            folder = work / f"images-{args.images}"
            write_images(folder, args.images, rng)
            out = work / f"index-images-{args.images}"
            images = build(model, out, [folder], args.budget, "images")
            images_rerun = build(model, out, [folder], args.budget, "images")
            print(
                f"{args.images:>11,} images: build {images['seconds']:.1f} s "
                f"({images['encoded']:,} encoded, {images['failed']:,} failed), "
                f"peak RSS {images['peak'] / 1e9:.2f} GB; unchanged rerun {images_rerun['seconds']:.1f} s",
                flush=True,
            )
            print(f"             index: {images['index']}", flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    a, b = results[small], results[large]
    lines = [
        (
            "build time per row, large ÷ small",
            b["full"]["seconds"] / large / (a["full"]["seconds"] / small),
            "≤ 1.2",
        ),
        ("peak RSS, large ÷ small", b["full"]["peak"] / a["full"]["peak"], "≤ 1.5"),
        ("peak RSS of the large build, GB", b["full"]["peak"] / 1e9, "≤ 4"),
        ("last 10% of commits ÷ first 10% (large)", commit_ratio(b["full"]["commits"]), "≤ 1.5"),
        ("unchanged rerun ÷ full build (large)", b["rerun"]["seconds"] / b["full"]["seconds"], "≤ 0.03"),
        ("1% change rerun ÷ full build (large)", b["change"]["seconds"] / b["full"]["seconds"], "—"),
        ("recall@10, held-out queries (large)", quality["recall_at_10"], "≥ 0.95"),
        ("index QPS ÷ exact QPS (large)", quality["qps_ratio"], "≥ 50"),
    ]
    if args.images:
        lines += [
            ("images a second, image folder build", images["encoded"] / images["seconds"], "—"),
            ("peak RSS of the image folder build, GB", images["peak"] / 1e9, "—"),
            ("unchanged rerun ÷ full build (images)", images_rerun["seconds"] / images["seconds"], "—"),
        ]
    print(f"\n{'measured':<44} {'value':>9}  target")
    for name, value, target in lines:
        print(f"{name:<44} {value:>9.3f}  {target}")


if __name__ == "__main__":
    main()
