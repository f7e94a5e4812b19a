"""``index build --engine ray`` against the local engine: the same corpus, the same machine, one run.

Each round builds a fresh index folder of the same photo-like JPEGs (and a caption file) with the
local engine, then with the Ray engine on a Ray cluster started on this machine with the same CPUs
(decoding workers as ``--workers``, the model beside them). The cluster and its encoding workers
are started once, before the first Ray round, and timed apart: a real cluster outlives a build,
and on a corpus of millions of images the start is noise. Rounds alternate engines, and the ratio
is the median of the rounds' ratios. Where a GPU is present a second part compares one GPU
through Ray (one encoding worker) with the local engine on that GPU.

The model is a two-layer random-init tower (``--model tiny``, default): the model is not what is
measured here, the engine's overhead is; ``--model base`` takes BERT-base + ViT-B/16 (on a CPU
that runs at a few images a second).

    python benchmarks/bench_cluster.py [--images 4000] [--captions 20000] [--rounds 2] [--ray-data]
        [--decode-group N] [--batch-size N] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import make_captions, make_images, make_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import BuildConfig, Encoder, ModelSpec, build_index
from retrieval.build.config import ClusterConfig, CollectionReport
from retrieval.build.plan import collection_of
from retrieval.build.ray_engine import RayExecutor
from retrieval.ingest.reader import default_workers


def corpus(root: Path, images: int, captions: int, rng: np.random.Generator) -> tuple[Path, Path]:
    sources = make_images(root / "distinct", images, rng, distinct=300)
    folder = root / "images"
    folder.mkdir()
    for i, path in enumerate(sources):  # links: every file is read and decoded like a new one
        os.link(path, folder / f"{i:06d}.jpg")
    table = root / "captions.csv"
    table.write_text("caption\n" + "\n".join(make_captions(captions, rng)) + "\n")
    return folder, table


def rates(collections: dict[str, CollectionReport]) -> dict[str, float]:
    return {name: c.encoded / c.seconds for name, c in collections.items() if c.seconds > 0}


def ray_build(config: BuildConfig, encoder: Encoder, executor: RayExecutor) -> dict:
    """One Ray build, with the driver's CPU time while the executor ran each collection."""
    run, driver = executor.run, {}

    def timed(items, *args):  # type: ignore[no-untyped-def]
        started = time.process_time()
        yield from run(items, *args)
        driver[collection_of(items)] = time.process_time() - started

    executor.run = timed  # type: ignore[method-assign]
    try:
        report = build_index(config, encoder=encoder, executor=executor)
    finally:
        executor.run = run  # type: ignore[method-assign]
    return {
        "driver_ms_per_input": {
            name: round(1000 * driver[name] / c.encoded, 3)
            for name, c in report.collections.items()
            if c.encoded
        },
        "rates": rates(report.collections),
        "stages": {n: [s.to_dict() for s in c.stages] for n, c in report.collections.items()},
        "verdict": {n: c.verdict for n, c in report.collections.items()},
    }


def compare(work: Path, base: BuildConfig, rounds: int, device: str, cluster: ClusterConfig) -> dict:
    """``rounds`` alternating local and Ray builds of ``base`` on ``device``; rates and ratios."""
    local_config = dataclasses.replace(base, device=device)
    ray_config = dataclasses.replace(local_config, engine="ray", cluster=cluster)
    with Encoder.load(base.model, device=device) as encoder:
        executor = RayExecutor(
            encoder,
            base.images,
            cluster,
            workers=base.workers,
            batch_size=base.batch_size,
        )
        started = time.perf_counter()
        executor.connect()
        startup = time.perf_counter() - started
        local_runs, ray_runs = [], []
        try:
            for k in range(rounds):
                out = work / f"local-{device}-{k}"
                local_runs.append(rates(build_index(dataclasses.replace(local_config, out=out)).collections))
                shutil.rmtree(out)
                out = work / f"ray-{device}-{k}"
                ray_runs.append(ray_build(dataclasses.replace(ray_config, out=out), encoder, executor))
                shutil.rmtree(out)
        finally:
            executor.close()
    ratios = {
        name: statistics.median(
            r["rates"][name] / here[name] for here, r in zip(local_runs, ray_runs, strict=True)
        )
        for name in local_runs[0]
    }
    return {
        "startup_seconds": round(startup, 2),
        "local": local_runs,
        "ray": ray_runs,
        "ratio": ratios,
        "workers": {"encode": len(executor._where), "gpus_per_worker": executor.gpus},
    }


def ray_data_rate(images: Path, spec: ModelSpec, batch: int, group: int) -> dict[str, float]:
    """Decoding and encoding alone through Ray Data (``map_batches`` over tasks, then over one
    actor), on the cluster the Ray rounds used: the alternative the engine did not take. No rows,
    no files, no commits: a bound on what Ray Data would give, not a build."""
    import ray

    from retrieval.ingest.reader import decode_group
    from retrieval.ingest.sources import ImageFile

    with Encoder.load(spec, device="cpu") as encoder:
        preprocess = encoder.preprocess
    files = [ImageFile(p.name, p.stat().st_size, 0) for p in sorted(images.iterdir())]

    def decode(rows: dict) -> dict:
        a = int(rows["start"][0])
        decoded = decode_group(images, list(enumerate(files[a : a + group], a)), preprocess)
        return {"pixels": decoded.pixels.numpy(), "sha256": [i.sha256 for i in decoded.images]}

    class Encode:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            self.encoder = Encoder.load(spec, device="cpu")

        def __call__(self, rows: dict) -> dict:
            return {"vector": self.encoder.encode_pixels(rows["pixels"]), "sha256": rows["sha256"]}

    cpus = default_workers(None) + 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    try:
        seconds = []
        for _ in range(2):  # the first also starts the pool's actor
            started = time.perf_counter()
            ds = ray.data.from_items([{"start": a} for a in range(0, len(files), group)])
            ds = ds.map_batches(decode, batch_size=1, num_cpus=1)
            ds = ds.map_batches(Encode, batch_size=batch, concurrency=1, num_cpus=1)
            count = sum(len(b["sha256"]) for b in ds.iter_batches(batch_size=None))
            seconds.append(time.perf_counter() - started)
        assert count == len(files)
    finally:
        ray.shutdown()
    return {"first": len(files) / seconds[0], "second": len(files) / seconds[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--captions", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", choices=["tiny", "base"], default="tiny")
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: as index build)"
    )
    parser.add_argument("--decode-group", type=int, default=None, help="files per decoding task")
    parser.add_argument("--batch-size", type=int, default=None, help="images per model batch")
    parser.add_argument("--ray-data", action="store_true", help="also decode+encode through Ray Data")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "images": args.images,
        "captions": args.captions,
        "model": args.model,
        "decode_workers": default_workers(args.workers),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model_dir(work, rng, tiny=args.model == "tiny")
        images, captions = corpus(work, args.images, args.captions, rng)
        base = BuildConfig(
            out=work / "unused",
            images=images,
            captions=(captions,),
            model=model,
            workers=args.workers,
            batch_size=args.batch_size,
        )
        on_cpus = ClusterConfig(gpus_per_worker=0, decode_group=args.decode_group)
        results["cpu"] = compare(work, base, args.rounds, "cpu", on_cpus)
        if args.ray_data:
            with Encoder.load(model, device="cpu") as encoder:
                batch = encoder.image_batch_size
            results["ray_data"] = ray_data_rate(images, model, batch, ClusterConfig().group_for(0))
        if torch.cuda.is_available():
            results["gpu"] = {
                "device": torch.cuda.get_device_name(0),
                **compare(
                    work, base, args.rounds, "cuda", ClusterConfig(encode_workers=1, gpus_per_worker=1)
                ),
            }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{results['machine']}; {args.images} images, {args.captions} captions, {args.model} model")
    if "ray_data" in results:
        rd = results["ray_data"]
        print(
            f"Ray Data decode+encode only (no rows, files or commits): {rd['first']:.0f}/s with its "
            f"actor's start, {rd['second']:.0f}/s after"
        )
    for part in ("cpu", "gpu"):
        if part not in results:
            print(f"{part}: no GPU here: skipped" if part == "gpu" else "")
            continue
        r = results[part]
        print(f"{part}: cluster and encoding workers started in {r['startup_seconds']} s")
        for name, ratio in r["ratio"].items():
            local = [f"{run[name]:.0f}" for run in r["local"]]
            ray_ = [f"{run['rates'][name]:.0f}" for run in r["ray"]]
            verdict = r["ray"][-1]["verdict"][name]
            driver = ", ".join(str(run["driver_ms_per_input"].get(name)) for run in r["ray"])
            print(
                f"  {name}: local {', '.join(local)}/s; ray {', '.join(ray_)}/s; ray/local {ratio:.2f} "
                f"({'met' if ratio >= 0.9 else 'missed'}: target 0.9); driver CPU {driver} ms an input; "
                f"{verdict}"
            )


if __name__ == "__main__":
    main()
