"""Batched encoding against the seed's one-at-a-time loops, on a real-size random-init model.

Builds BERT-base + ViT-B/16 towers from configs (random weights, nothing downloaded), writes a
seed-format checkpoint, loads it through ``Encoder.load`` and measures, in one run:

- images: ``encode_images(paths)`` (decode, resize, encode) vs the seed loop
  (``Image.open(p).convert("RGB")``, ``image_processor``, ``encode_image``, one image at a time),
  and vs the model's pure batched forward on ready pixel tensors (same batch, dtype, threads);
- captions: ``encode_texts`` vs the seed loop (``text_tokenizer`` + ``encode_text`` per caption).

Prints rates and the ratios; the README quotes them with the machine they ran on.

    python benchmarks/bench_encoder.py [--device auto] [--precision auto] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_captions, make_images, make_model_dir, rate, seed_caption_loop, seed_image_loop

from retrieval import Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--images", type=int, help="images for the batched paths")
    parser.add_argument("--seed-images", type=int, help="images for the seed loop")
    parser.add_argument("--texts", type=int, help="captions for the batched path")
    parser.add_argument("--seed-texts", type=int, help="captions for the seed loop")
    parser.add_argument("--batch-size", type=int, help="image batch size (default: the encoder's)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = make_model_dir(root, rng)
        encoder = Encoder.load(spec, device=args.device, precision=args.precision)
        runtime = encoder.runtime
        gpu = runtime.device.type == "cuda"
        n_images = args.images or (4096 if gpu else 48)
        n_seed_images = args.seed_images or (256 if gpu else 12)
        n_texts = args.texts or (50_000 if gpu else 1024)
        n_seed_texts = args.seed_texts or (1000 if gpu else 128)
        batch = args.batch_size or encoder.image_batch_size
        paths = make_images(root / "images", max(n_images, n_seed_images), rng)
        captions = make_captions(max(n_texts, n_seed_texts), rng)
        model = encoder.model

        def sync() -> None:
            if gpu:
                torch.cuda.synchronize(runtime.device)

        def seed_images() -> None:
            seed_image_loop(model, runtime, paths[:n_seed_images])

        def seed_captions() -> None:
            seed_caption_loop(model, runtime, captions[:n_seed_texts])

        pixels = torch.randn(batch, 3, 224, 224, device=runtime.device)

        def pure_forward() -> None:
            with torch.inference_mode(), runtime.autocast():
                for _ in range(0, n_images, batch):
                    model.encode_image({"pixel_values": pixels})

        # Warm-up: kernels, allocator, thread pools.
        encoder.encode_images(paths[: min(batch, 8)])
        encoder.encode_texts(captions[:64])
        with torch.no_grad(), runtime.autocast():
            model.encode_image(
                model.image_processor(images=[Image.open(paths[0]).convert("RGB")], return_tensors="pt")
            )

        figures = {
            "device": torch.cuda.get_device_name(runtime.device) if gpu else platform.processor() or "cpu",
            "precision": runtime.precision,
            "torch_threads": torch.get_num_threads(),
            "decode_threads": encoder.threads,
            "image_batch": batch,
            "images_per_s_encode_images": rate(
                lambda: encoder.encode_images(paths[:n_images], batch), n_images, sync
            ),
            "images_per_s_pure_forward": rate(pure_forward, n_images - n_images % batch or batch, sync),
            "images_per_s_seed_loop": rate(seed_images, n_seed_images, sync),
            "captions_per_s_encode_texts": rate(
                lambda: encoder.encode_texts(captions[:n_texts]), n_texts, sync
            ),
            "captions_per_s_seed_loop": rate(seed_captions, n_seed_texts, sync),
            "captions_per_s_tokenize_only": rate(
                lambda: sum(1 for _ in encoder.text_batcher.batches(captions[:n_texts], 512)), n_texts, sync
            ),
        }
        encoder.close()

    images_vs_seed = figures["images_per_s_encode_images"] / figures["images_per_s_seed_loop"]
    images_vs_forward = figures["images_per_s_encode_images"] / figures["images_per_s_pure_forward"]
    texts_vs_seed = figures["captions_per_s_encode_texts"] / figures["captions_per_s_seed_loop"]
    figures |= {
        "ratio_images_vs_seed_loop": images_vs_seed,
        "ratio_images_vs_pure_forward": images_vs_forward,
        "ratio_texts_vs_seed_loop": texts_vs_seed,
    }
    print(
        f"device {figures['device']}, {runtime.precision}, {figures['torch_threads']} torch threads, "
        f"{figures['decode_threads']} decode threads, image batch {batch}"
    )
    print("| path | rate | ratio |")
    print("|---|---|---|")
    print(f"| encode_images (decode+resize+encode) | {figures['images_per_s_encode_images']:.1f} img/s | |")
    print(
        f"| pure batched forward (ready tensors) | {figures['images_per_s_pure_forward']:.1f} img/s | "
        f"encode_images / forward = {images_vs_forward:.2f} |"
    )
    print(
        f"| seed loop, one image at a time | {figures['images_per_s_seed_loop']:.1f} img/s | "
        f"encode_images / seed = {images_vs_seed:.1f}x |"
    )
    print(f"| encode_texts | {figures['captions_per_s_encode_texts']:.0f} captions/s | |")
    print(
        f"| seed loop, one caption at a time | {figures['captions_per_s_seed_loop']:.0f} captions/s | "
        f"encode_texts / seed = {texts_vs_seed:.1f}x |"
    )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
