"""Feeding the model: the indexer's decoding against a bare Pillow loop, and a build against its bound.

On the CPU (every machine), for each corpus (photo-like JPEGs of web sizes, default 2,000; the
same pictures as PNGs, default 500), in one run:

- ``bare``: a bare Pillow loop doing the indexer's work on the same cores: one process a core,
  each reading its share of the files, hashing them (sha256), opening, ``draft`` as the indexer
  drafts (JPEGs at least four times the model's input), converting to RGB and resizing to the
  model's input with the processor's filter; processes started inside the timing;
- ``reader``: the indexer's decoding alone (``ingest.reader.read_images``, its default workers:
  worker processes, hand-off in shared memory, the per-file time limit, the outcome bookkeeping);
  ratio ``reader / bare`` (SPEC target >= 0.9);
- ``model``: the tiny random-init tower's pure batched forward on ready tensors (same batch size,
  all threads);
- ``build``: ``build_index`` on the folder with that tower, the rate it encoded (the collection's
  seconds: walk, plan, decode, encode, write, commit), against the bound of the cores doing both
  jobs, ``1 / (1/bare + 1/model)``; ratio target >= 0.9. The build's own stage report (where the
  time went, which bound it hit) is printed beside it.

Each round takes the four figures one after the other, within seconds, and its two ratios from
them: the machine is shared and its speed drifts by a fifth over minutes, which a ratio of figures
taken minutes apart would measure instead. Printed for each ratio: its median over ``--rounds``
rounds with the figures of that median round, and every round's ratio.

On a CUDA host (``--device cuda`` or ``auto`` with a GPU), with a real-size random-init ViT-B/16:
the pure bf16 forward at batch 256, ``index build`` with GPU decoding against it (target >= 0.8),
the GPU decoder alone (images/s), and the per-image cosine between vectors of GPU-decoded and
CPU-decoded pixels (min, 1st percentile, median).

    python benchmarks/bench_decode.py [--jpegs 1000] [--pngs 300] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import make_images, make_model_dir
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import BuildConfig, Encoder, build_index
from retrieval.build.config import CollectionReport
from retrieval.ingest.reader import default_workers, read_images
from retrieval.ingest.sources import ImageFile
from retrieval.model.preprocess import ImagePreprocess

_FILTERS = {
    0: Image.NEAREST,
    1: Image.LANCZOS,
    2: Image.BILINEAR,
    3: Image.BICUBIC,
    4: Image.BOX,
    5: Image.HAMMING,
}


def bare_decode(path: str, preprocess: ImagePreprocess) -> np.ndarray:
    """The indexer's work on one file, with nothing around it."""
    data = Path(path).read_bytes()
    hashlib.sha256(data).hexdigest()
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        w, h = image.size
        if w >= 4 * preprocess.width and h >= 4 * preprocess.height:
            image.draft("RGB", (2 * preprocess.width, 2 * preprocess.height))
    image = image.convert("RGB")
    size = (preprocess.width, preprocess.height)
    return np.asarray(image.resize(size, _FILTERS[preprocess.resample]))


def _bare_share(args: tuple[list[str], ImagePreprocess]) -> int:
    paths, preprocess = args
    for path in paths:
        bare_decode(path, preprocess)
    return len(paths)


def bare_rate(paths: list[Path], preprocess: ImagePreprocess, processes: int) -> float:
    """Images/s of ``processes`` bare loops, each on every ``processes``-th file, start included."""
    shares = [([str(p) for p in paths[i::processes]], preprocess) for i in range(processes)]
    began = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        done = sum(pool.map(_bare_share, shares))
    return done / (time.perf_counter() - began)


def reader_rate(folder: Path, preprocess: ImagePreprocess, workers: int) -> float:
    files = [ImageFile(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())]
    began = time.perf_counter()
    done = sum(len(group.images) for group in read_images(folder, files, preprocess, workers=workers))
    return done / (time.perf_counter() - began)


def model_rate(encoder: Encoder, batches: int) -> float:
    pixels = torch.randn(encoder.image_batch_size, 3, 224, 224, device=encoder.runtime.device)
    runtime = encoder.runtime
    with torch.inference_mode(), runtime.autocast():
        encoder.model.encode_image({"pixel_values": pixels})
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        began = time.perf_counter()
        for _ in range(batches):
            encoder.model.encode_image({"pixel_values": pixels})
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
    return batches * len(pixels) / (time.perf_counter() - began)


def build(encoder: Encoder, folder: Path, out: Path, **options: object) -> CollectionReport:
    shutil.rmtree(out, ignore_errors=True)
    assert encoder.spec is not None
    report = build_index(BuildConfig(out=out, images=folder, model=encoder.spec, **options), encoder=encoder)
    return report.collections["images"]


def stage_line(c: CollectionReport) -> str:
    rates = ", ".join(f"{s.name} {s.capacity:,.0f}/s" for s in c.stages if s.inputs and s.busy > 0)
    return f"{rates}; {c.verdict}"


def cpu_part(root: Path, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, object]:
    (root / "tiny").mkdir()
    spec = make_model_dir(root / "tiny", rng, tiny=True)
    encoder = Encoder.load(spec, device="cpu")
    preprocess = encoder.preprocess
    cores = torch.get_num_threads()
    workers = default_workers(None)
    corpora = {}
    jpegs = make_images(root / "jpeg", args.jpegs, rng, distinct=args.jpegs)
    corpora["JPEG"] = root / "jpeg"
    if args.pngs:
        (root / "png").mkdir()
        for path in jpegs[: args.pngs]:
            Image.open(path).save(root / "png" / f"{path.stem}.png")
        corpora["PNG"] = root / "png"
    figures: dict[str, object] = {"cores": cores, "workers": workers}
    build(encoder, corpora["JPEG"], root / "warm")  # worker start-up path, kernels, allocator
    for kind, folder in corpora.items():
        paths = sorted(folder.iterdir())
        rounds = []
        for _ in range(args.rounds):  # the four figures of a round are taken within seconds
            bare = bare_rate(paths, preprocess, cores)
            reader = reader_rate(folder, preprocess, workers)
            model = model_rate(encoder, max(4, len(paths) // encoder.image_batch_size))
            c = build(encoder, folder, root / "index")
            bound = 1 / (1 / bare + 1 / model)
            rounds.append(
                {
                    "bare": bare,
                    "reader": reader,
                    "model": model,
                    "bound": bound,
                    "build": c.encoded / c.seconds,
                    "reader_vs_bare": reader / bare,
                    "build_vs_bound": c.encoded / c.seconds / bound,
                    "stages": stage_line(c),
                }
            )
        figures[kind] = {
            "files": len(paths),
            "decode": _median_round(rounds, "reader_vs_bare"),
            "build": _median_round(rounds, "build_vs_bound"),
            "rounds_reader_vs_bare": [round(r["reader_vs_bare"], 3) for r in rounds],
            "rounds_build_vs_bound": [round(r["build_vs_bound"], 3) for r in rounds],
        }
    encoder.close()
    return figures


def _median_round(rounds: list[dict[str, object]], ratio: str) -> dict[str, object]:
    """The round whose ``ratio`` is the median of the rounds' (the upper one of an even count)."""
    return sorted(rounds, key=lambda r: r[ratio])[len(rounds) // 2]  # type: ignore[arg-type,return-value]


def gpu_part(root: Path, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, object]:
    from retrieval.ingest.gpu_decode import GpuJpegDecoder, gpu_decoding_problem

    (root / "base").mkdir()
    spec = make_model_dir(root / "base", rng)
    encoder = Encoder.load(spec, device="cuda", precision="bf16")
    problem = gpu_decoding_problem(encoder.preprocess, encoder.runtime.device)
    if problem is not None:
        encoder.close()
        return {"skipped": problem}
    folder = root / "gpu-jpeg"
    make_images(folder, args.gpu_images, rng, distinct=args.gpu_images)
    figures: dict[str, object] = {"card": torch.cuda.get_device_name(encoder.runtime.device)}
    figures["model"] = model_rate(encoder, max(8, args.gpu_images // encoder.image_batch_size))
    build(encoder, folder, root / "gpu-warm", decode="gpu")
    gpu = build(encoder, folder, root / "gpu-index", decode="gpu")
    figures["build"] = gpu.encoded / gpu.seconds
    figures["build_vs_model"] = figures["build"] / figures["model"]  # type: ignore[operator]
    figures["stages"] = stage_line(gpu)
    cpu = build(encoder, folder, root / "cpu-index", decode="cpu")
    figures["build_cpu_decode"] = cpu.encoded / cpu.seconds
    decoder = GpuJpegDecoder(encoder.preprocess, encoder.runtime.device)
    datas = [p.read_bytes() for p in sorted(folder.iterdir())]
    decoder.decode(datas[:64])
    torch.cuda.synchronize(encoder.runtime.device)
    began = time.perf_counter()
    for start in range(0, len(datas), 256):
        decoder.decode(datas[start : start + 256])
    torch.cuda.synchronize(encoder.runtime.device)
    figures["gpu_decode"] = len(datas) / (time.perf_counter() - began)
    cosines = _gpu_cpu_cosines(root / "gpu-index", root / "cpu-index")
    figures["cosine_min"], figures["cosine_p01"], figures["cosine_median"] = (
        float(cosines.min()),
        float(np.quantile(cosines, 0.01)),
        float(np.median(cosines)),
    )
    encoder.close()
    return figures


def _gpu_cpu_cosines(gpu_index: Path, cpu_index: Path) -> np.ndarray:
    from retrieval import Store

    def vectors(folder: Path) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with Store.open(folder) as store:
            for _, table in store.live_rows("images", ["path", "embedding"]):
                rows = table.to_pydict()
                found.update(zip(rows["path"], map(np.asarray, rows["embedding"]), strict=True))
        return found

    gpu, cpu = vectors(gpu_index), vectors(cpu_index)
    return np.array([float(np.dot(gpu[p], cpu[p])) for p in gpu])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpegs", type=int, default=2000)
    parser.add_argument("--pngs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto", help="cuda adds the GPU part")
    parser.add_argument("--gpu-images", type=int, default=8192)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        figures: dict[str, object] = {"machine": machine, "cpu": cpu_part(root, args, rng)}
        if gpu:
            figures["gpu"] = gpu_part(root, args, rng)
    if args.json:
        print(json.dumps(figures, indent=2, default=float))
        return
    cpu = figures["cpu"]
    assert isinstance(cpu, dict)
    print(
        f"machine: {machine}; {cpu['workers']} decoding workers, {cpu['cores']} threads; "
        f"median of {args.rounds} rounds"
    )
    kinds = [kind for kind in ("JPEG", "PNG") if kind in cpu]
    print("| corpus | bare loop | indexer's decode | decode / bare | every round |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        f, d = cpu[kind], cpu[kind]["decode"]
        print(
            f"| {f['files']} {kind}s | {d['bare']:.0f}/s | {d['reader']:.0f}/s "
            f"| **{d['reader_vs_bare']:.2f}** "
            f"| {', '.join(f'{x:.2f}' for x in f['rounds_reader_vs_bare'])} |"
        )
    print("| corpus | bare loop | model alone | bound | build | build / bound | every round |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        f, b = cpu[kind], cpu[kind]["build"]
        print(
            f"| {f['files']} {kind}s | {b['bare']:.0f}/s | {b['model']:.0f}/s | {b['bound']:.0f}/s "
            f"| {b['build']:.0f}/s | **{b['build_vs_bound']:.2f}** "
            f"| {', '.join(f'{x:.2f}' for x in f['rounds_build_vs_bound'])} |"
        )
    for kind in kinds:
        print(f"{kind} build stages (median round): {cpu[kind]['build']['stages']}")
    if "gpu" in figures:
        g = figures["gpu"]
        assert isinstance(g, dict)
        if "skipped" in g:
            print(f"GPU part skipped: {g['skipped']}")
            return
        print(
            f"{g['card']}: pure bf16 forward {g['model']:.0f}/s; index build with GPU decoding "
            f"{g['build']:.0f}/s = {g['build_vs_model']:.2f} of it "
            f"(CPU decoding: {g['build_cpu_decode']:.0f}/s); "
            f"GPU decode alone {g['gpu_decode']:.0f}/s; cosine GPU vs CPU decoding per image: min "
            f"{g['cosine_min']:.5f}, 1st percentile {g['cosine_p01']:.5f}, median {g['cosine_median']:.5f}"
        )
        print(f"GPU build stages: {g['stages']}")


if __name__ == "__main__":
    main()
