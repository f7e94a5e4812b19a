"""Training throughput: ``train()`` end to end against the model's pure training step.

In one run, with the same model, batch size, dtype and threads:

- engine: ``train(TrainConfig(...))`` on a pairs file: the reader decodes the images (once, into
  the in-memory cache), captions are tokenized, then every step pads its batch, runs both towers,
  the loss, backward and AdamW, logs, and checkpoints are written at the end of each epoch;
- pure: the same number of steps on batches already in tensors (normalise, forward, loss,
  backward, AdamW), nothing else; run before and after the engine, and averaged.

Prints pairs/s of both, the step-only ratio (engine steps vs pure steps, checkpoints excluded)
and the end-to-end ratio (checkpoint writes included). The first step of each is left out.

    python benchmarks/bench_training.py [--size tiny|base] [--device auto] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import make_captions, make_images, make_model_dir

from retrieval import MultiModalEncoder, resolve_runtime
from retrieval.model.imaging import open_image
from retrieval.model.preprocess import ImagePreprocess, TextBatcher
from retrieval.training.loop import TrainConfig, clip_loss, train


def pure_steps(config: TrainConfig, pixels: torch.Tensor, tokens: list[list[int]], steps: int) -> float:
    """Pairs/s of bare training steps on ready tensors (after one warm-up step)."""
    runtime = resolve_runtime(config.device, config.precision)
    torch.manual_seed(0)
    model = MultiModalEncoder(config.text_model, config.vision_model, embed_dim=config.embed_dim).to(
        runtime.device
    )
    model.train()
    preprocess = ImagePreprocess.from_processor(model.image_processor)
    batcher = TextBatcher.for_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    b = config.batch_size
    batches = [
        (pixels[i * b : (i + 1) * b], batcher.pad(tokens[i * b : (i + 1) * b]).inputs())
        for i in range(len(pixels) // b)
    ]
    same = torch.eye(b, dtype=torch.bool, device=runtime.device)
    elapsed = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        batch_pixels, text = batches[step % len(batches)]
        values = preprocess.normalize(batch_pixels.to(runtime.device))
        text = {k: v.to(runtime.device) for k, v in text.items()}
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            t, v = model(text, {"pixel_values": values})
        loss = clip_loss(t, v, model.temperature.float(), same)
        loss.backward()
        optimizer.step()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            elapsed += time.perf_counter() - start
    return steps * b / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--pairs", type=int, help="pairs in the training file")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(0)
    runtime = resolve_runtime(args.device, args.precision)
    gpu = runtime.device.type == "cuda"
    base = args.size == "base"
    batch = args.batch_size or (128 if gpu else 8 if base else 32)
    n = args.pairs or (batch * (16 if gpu else 3 if base else 16))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = make_model_dir(root, rng, tiny=not base)
        images = make_images(root / "images", n, rng, distinct=n, shape=(320, 240))
        captions = make_captions(n, rng)
        lines = ["image,caption"] + [f"{p.name},{c}" for p, c in zip(images, captions, strict=True)]
        (root / "images" / "pairs.csv").write_text("\n".join(lines) + "\n")
        config = TrainConfig(
            pairs=root / "images" / "pairs.csv",
            out=root / "run",
            text_model=spec.text_model,
            vision_model=spec.vision_model,
            epochs=args.epochs,
            batch_size=batch,
            device=args.device,
            precision=args.precision,
        )
        # The same images, preprocessed once, and the same captions as token ids, for the pure loop.
        model = MultiModalEncoder(spec.text_model, spec.vision_model)
        preprocess = ImagePreprocess.from_processor(model.image_processor)
        batcher = TextBatcher.for_model(model)
        pixels = torch.from_numpy(np.stack([preprocess.to_pixels(open_image(p)) for p in images]))
        tokens = batcher.tokenize(captions)
        del model
        steps_wanted = args.epochs * (n // batch) - 1
        # The pure loop runs before and after the engine: its mean cancels warm-up and drift.
        pure_before = pure_steps(config, pixels, tokens, steps_wanted)
        started = time.perf_counter()
        report = train(config)
        whole = time.perf_counter() - started
        log = [json.loads(line) for line in report.log.read_text().splitlines()]
        steps = [r for r in log if r["type"] == "step"][1:]
        step_seconds = sum(batch / r["pairs_per_s"] for r in steps)
        engine_steps = len(steps) * batch / step_seconds
        engine_total = report.pairs_per_s  # fit(), checkpoints included

        pure = (pure_before + pure_steps(config, pixels, tokens, steps_wanted)) / 2

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name(runtime.device)}" if gpu else ""),
        "size": args.size,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "batch": batch,
        "steps": report.steps_run,
        "engine_step_pairs_per_s": round(engine_steps, 2),
        "engine_end_to_end_pairs_per_s": round(engine_total, 2),
        "pure_step_pairs_per_s": round(pure, 2),
        "steps_ratio": round(engine_steps / pure, 3),
        "end_to_end_ratio": round(engine_total / pure, 3),
        "train_call_seconds": round(whole, 1),
    }
    print(
        f"{result['machine']}, {args.size} model, {result['device']} {result['precision']}, batch {batch}, "
        f"{report.steps_run} steps"
    )
    print(f"  engine steps      {engine_steps:9.1f} pairs/s")
    print(f"  engine end to end {engine_total:9.1f} pairs/s  (checkpoint writes included)")
    print(f"  pure steps        {pure:9.1f} pairs/s")
    print(f"  ratio steps {result['steps_ratio']:.3f}, end to end {result['end_to_end_ratio']:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
