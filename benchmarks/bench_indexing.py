"""End-to-end indexing against the model's pure forward and the seed's loops; memory vs corpus size.

On a real-size random-init BERT-base + ViT-B/16 (loaded through the checkpoint path), in one run:

- images: ``build_index`` on a folder (walk, decode in worker processes, encode, write Parquet,
  commit) vs the pure batched forward on ready tensors (same batch size, precision, threads), and
  vs the seed's loop (``Image.open(p).convert("RGB")``, ``image_processor``, ``encode_image``);
- captions: ``build_index`` on a caption file vs the seed's loop (``text_tokenizer`` +
  ``encode_text`` per caption), on a realistic length mix;
- memory: peak RSS of ``index build`` with a tiny model on two corpus sizes (it must not grow).

Images are Debian's openclipart-png clip art when installed (``apt-get install openclipart-png``),
otherwise photo-like JPEGs made on the spot; the output says which.

    python benchmarks/bench_indexing.py [--images 200] [--device auto] [--precision auto] [--json]
"""

from __future__ import annotations

import argparse
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
import torch
from common import (
    make_captions,
    make_images,
    make_model_dir,
    openclipart_images,
    rate,
    seed_caption_loop,
    seed_image_loop,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import BuildConfig, Encoder, build_index
from retrieval.ingest.reader import read_images
from retrieval.ingest.sources import ImageFile

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child forked from a big
# benchmark process would report the parent's size.
_MEMORY_PROBE = """
import sys
from pathlib import Path
from retrieval import BuildConfig, ModelSpec, build_index
root = Path(sys.argv[1])
build_index(BuildConfig(out=root / sys.argv[2], images=root / sys.argv[3], device="cpu",
            model=ModelSpec(root / "tiny" / "best_checkpoint.pt", root / "tiny" / "bert-base-uncased",
                            root / "tiny" / "vit-base-patch16-224"), image_shard_rows=256))
status = Path("/proc/self/status").read_text()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def copy_corpus(sources: list[Path], folder: Path) -> None:
    folder.mkdir()
    for i, path in enumerate(sources):
        shutil.copyfile(path, folder / f"{i:06d}{path.suffix}")


def peak_rss_mb(root: Path, out: str, images: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(root), out, images],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--images", type=int, help="images to index (default 200 on CPU, 8192 on a GPU)")
    parser.add_argument("--seed-images", type=int, help="images for the seed loop")
    parser.add_argument("--captions", type=int, help="captions to index")
    parser.add_argument("--seed-captions", type=int, help="captions for the seed loop")
    parser.add_argument("--workers", type=int, help="decode processes (default: the indexer's)")
    parser.add_argument("--memory-sizes", default="200,2000", help="corpus sizes for the memory probe")
    parser.add_argument(
        "--synthetic", action="store_true", help="photo-like JPEGs even if clip art is installed"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model").mkdir()
        spec = make_model_dir(root / "model", rng)
        encoder = Encoder.load(spec, device=args.device, precision=args.precision)
        runtime, model = encoder.runtime, encoder.model
        gpu = runtime.device.type == "cuda"
        n_images = args.images or (8192 if gpu else 200)
        n_seed = args.seed_images or (256 if gpu else 32)
        n_captions = args.captions or (50_000 if gpu else 2048)
        n_seed_captions = args.seed_captions or (1000 if gpu else 128)
        batch = encoder.image_batch_size

        clipart = [] if args.synthetic else openclipart_images(n_images)
        if clipart:
            copy_corpus(clipart, root / "images")
            corpus = f"{n_images} openclipart PNGs"
        else:
            made = make_images(root / "made", n_images, rng)
            copy_corpus(made, root / "images")
            corpus = f"{n_images} photo-like JPEGs"
        paths = sorted((root / "images").iterdir())
        captions = make_captions(max(n_captions, n_seed_captions), rng)
        (root / "captions.txt").write_text("\n".join(captions[:n_captions]) + "\n")

        def sync() -> None:
            if gpu:
                torch.cuda.synchronize(runtime.device)

        pixels = torch.randn(batch, 3, 224, 224, device=runtime.device)
        n_forward = max(batch, n_images - n_images % batch)

        def pure_forward() -> None:
            with torch.inference_mode(), runtime.autocast():
                for _ in range(0, n_forward, batch):
                    model.encode_image({"pixel_values": pixels})

        def seed_images() -> None:
            seed_image_loop(model, runtime, paths[:n_seed])

        def seed_captions() -> None:
            seed_caption_loop(model, runtime, captions[:n_seed_captions])

        def index(what: str, **inputs: object) -> float:
            config = BuildConfig(out=root / f"index-{what}", model=spec, workers=args.workers, **inputs)
            start = time.perf_counter()
            build_index(config, encoder=encoder)
            return time.perf_counter() - start

        # Warm-up: kernels, allocator, the worker start-up path, on one batch.
        copy_corpus(paths[:batch], root / "warm")
        index("warm", images=root / "warm")

        def reader_only() -> None:
            workers = args.workers if args.workers is not None else max(2, (os.cpu_count() or 2) - 1)
            files = [ImageFile(p.name, p.stat().st_size, 0) for p in paths]
            for _ in read_images(root / "images", files, encoder.preprocess, workers=workers):
                pass

        seconds = index("images", images=root / "images")
        figures: dict[str, object] = {
            "device": torch.cuda.get_device_name(runtime.device) if gpu else platform.processor() or "cpu",
            "precision": runtime.precision,
            "torch_threads": torch.get_num_threads(),
            "image_batch": batch,
            "corpus": corpus,
            "images_per_s_index_build": n_images / seconds,
            "images_per_s_pure_forward": rate(pure_forward, n_forward, sync),
            "images_per_s_seed_loop": rate(seed_images, n_seed, sync),
            "images_per_s_decode_only": rate(reader_only, n_images),
        }
        caption_seconds = index("captions", captions=(root / "captions.txt",))
        figures["captions_per_s_index_build"] = n_captions / caption_seconds
        figures["captions_per_s_seed_loop"] = rate(seed_captions, n_seed_captions, sync)
        encoder.close()

        sizes = [int(s) for s in args.memory_sizes.split(",") if s]
        if sizes:
            (root / "tiny").mkdir()
            make_model_dir(root / "tiny", rng, tiny=True)
            for size in sizes:
                made = make_images(root / f"mem-made-{size}", size, rng, distinct=size, shape=(320, 240))
                copy_corpus(made, root / f"mem-{size}")
                figures[f"peak_rss_mb_{size}_images"] = peak_rss_mb(root, f"mem-index-{size}", f"mem-{size}")

    forward_ratio = figures["images_per_s_index_build"] / figures["images_per_s_pure_forward"]  # type: ignore[operator]
    seed_ratio = figures["images_per_s_index_build"] / figures["images_per_s_seed_loop"]  # type: ignore[operator]
    caption_ratio = figures["captions_per_s_index_build"] / figures["captions_per_s_seed_loop"]  # type: ignore[operator]
    figures |= {
        "ratio_index_vs_pure_forward": forward_ratio,
        "ratio_index_vs_seed_loop": seed_ratio,
        "ratio_captions_vs_seed_loop": caption_ratio,
    }
    print(
        f"device {figures['device']}, {figures['precision']}, {figures['torch_threads']} torch threads, "
        f"image batch {batch}, {corpus}"
    )
    print("| what | rate | ratio |")
    print("|---|---|---|")
    print(f"| index build, images (end to end) | {figures['images_per_s_index_build']:.1f} img/s | |")
    print(
        f"| pure batched forward | {figures['images_per_s_pure_forward']:.1f} img/s | "
        f"index / forward = {forward_ratio:.2f} |"
    )
    print(f"| decode only (reader stage, no model) | {figures['images_per_s_decode_only']:.1f} img/s | |")
    print(
        f"| seed loop, one image at a time | {figures['images_per_s_seed_loop']:.1f} img/s | "
        f"index / seed = {seed_ratio:.1f}x |"
    )
    print(f"| index build, captions | {figures['captions_per_s_index_build']:.0f} captions/s | |")
    print(
        f"| seed loop, one caption at a time | {figures['captions_per_s_seed_loop']:.0f} captions/s | "
        f"index / seed = {caption_ratio:.1f}x |"
    )
    for size in sizes:
        print(f"| peak RSS, tiny model, {size} images | {figures[f'peak_rss_mb_{size}_images']:.0f} MB | |")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
