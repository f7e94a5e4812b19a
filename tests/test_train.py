"""Training: the loss falls, checkpoints are the seed's format, and a killed run resumes exactly."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval import Encoder, ModelSpec, MultiModalEncoder, durable, load_checkpoint
from retrieval.durable import CRASH_ENV
from retrieval.errors import CheckpointError, ConfigError
from retrieval.model.runtime import resolve_runtime
from retrieval.progress import Silent
from retrieval.training.data import random_crops
from retrieval.training.loop import TrainConfig, _Trainer, clip_loss, train

WORDS = "red blue green black white dog cat bird car tree house sun moon road sky".split()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 pairs: a coloured picture with a shape, a caption naming its colour and shape."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "black": (10, 10, 10)}
    lines = ["image,caption"]
    for i in range(24):
        colour = list(colours)[i % 4]
        shape = WORDS[5 + i % 6]
        pixels = np.full((40, 40, 3), colours[colour], dtype=np.uint8)
        size = 8 + 4 * (i % 6)
        pixels[4 : 4 + size, 4 : 4 + size] = 255 - pixels[4 : 4 + size, 4 : 4 + size]
        pixels = np.clip(pixels.astype(int) + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,a {colour} {shape}")
    (root / "broken.png").write_bytes(b"not an image at all")
    lines += ["broken.png,a white bird", "gone.png,a white sun"]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def config(pairs: Path, towers: tuple[Path, Path], out: Path, **overrides: object) -> TrainConfig:
    base = TrainConfig(
        pairs=pairs,
        out=out,
        text_model=towers[0],
        vision_model=towers[1],
        epochs=2,
        batch_size=8,
        lr=1e-3,
        embed_dim=16,
        device="cpu",
        workers=0,
        seed=7,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state_dict"]


def test_clip_loss_by_hand() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor(0.5)
    same = torch.eye(2, dtype=torch.bool)
    logits = (text @ image.T / 0.5).numpy()  # [[2, 1.2], [0, 1.6]]

    def xent(rows: np.ndarray) -> float:
        return float(np.mean([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(rows)]))

    expected = (xent(logits) + xent(logits.T)) / 2
    assert float(clip_loss(text, image, t, same)) == pytest.approx(expected, rel=1e-6)
    # Two rows of one image are not each other's negatives: each target is split between them.
    same = torch.ones(2, 2, dtype=torch.bool)
    soft = -(np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).mean(1)).mean()
    soft_t = -(np.log(np.exp(logits.T) / np.exp(logits.T).sum(1, keepdims=True)).mean(1)).mean()
    assert float(clip_loss(text, image, t, same)) == pytest.approx((soft + soft_t) / 2, rel=1e-6)


def test_loss_falls_and_checkpoints_are_the_seeds_format(
    pairs: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    report = train(config(pairs, towers, tmp_path, epochs=30, val_pairs=pairs))
    log = [json.loads(line) for line in report.log.read_text().splitlines()]
    epochs = [r for r in log if r["type"] == "epoch"]
    assert len(epochs) == 30 and report.global_step == 30 * 3  # 24 pairs, batches of 8
    # Chance is ln(8) = 2.08 for batches of 8; the pairs are learned well below it.
    assert epochs[-1]["train_loss"] < 0.75 * np.log(8) < epochs[0]["train_loss"]
    assert epochs[-1]["val_loss"] < 0.75 * np.log(8) < epochs[0]["val_loss"]
    assert {o.source for o in report.skipped} >= {"broken.png", "gone.png"}  # skipped, counted
    steps = [r for r in log if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 91))
    assert all({"loss", "temperature", "lr", "pairs_per_s"} <= set(r) for r in steps)
    assert report.plot is not None and Image.open(report.plot).size[0] > 800

    # The seed's format exactly, loadable with weights_only=True and no allow-list.
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(last) == {"epoch", "global_step", "model_state_dict", "optimizer_state_dict"}
    assert (last["epoch"], last["global_step"]) == (29, 90)
    best = torch.load(tmp_path / "best_checkpoint.pt", weights_only=True)
    assert set(best) == {"epoch", "global_step", "model_state_dict", "optimizer_state_dict", "best_loss"}
    assert type(best["best_loss"]) is float and type(best["epoch"]) is int
    assert best["best_loss"] == pytest.approx(min(e["val_loss"] for e in epochs))
    prefixes = {k.split(".")[0] for k in last["model_state_dict"]}
    assert prefixes == {
        "text_encoder",
        "visual_encoder",
        "text_projection",
        "visual_projection",
        "temperature",
    }

    # The seed's resume code runs on it unchanged.
    model = MultiModalEncoder(bert_model_name=towers[0], vit_model_name=towers[1])
    model.load_state_dict(last["model_state_dict"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    optimizer.load_state_dict(last["optimizer_state_dict"])
    assert last["epoch"] + 1 == 30
    # And the engine's loader and encoder take it.
    assert load_checkpoint(tmp_path / "best_checkpoint.pt").best_loss == best["best_loss"]
    with Encoder.load(ModelSpec(tmp_path / "checkpoint.pt", *towers), device="cpu") as encoder:
        assert encoder.encode_texts(["a red dog"]).shape == (1, 16)


def test_killed_run_resumes_to_the_same_weights(
    pairs: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    """Stopped mid-epoch (during step 5 of 6), resumed from step 4's checkpoint: same weights."""
    straight = train(config(pairs, towers, tmp_path / "straight", save_every=1))

    class Killed(Exception):
        pass

    def kill_at_5(step: object) -> None:
        if step.step == 5:  # type: ignore[attr-defined]
            raise Killed

    interrupted = config(pairs, towers, tmp_path / "killed", save_every=1)
    with pytest.raises(Killed):
        train(interrupted, on_step=kill_at_5)
    saved = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    # Step 4 is one step into the second epoch: the last complete epoch is 0, as the seed counts.
    assert (saved["epoch"], saved["global_step"]) == (0, 4)
    resumed = train(replace(interrupted, resume=tmp_path / "killed" / "checkpoint.pt"))
    assert (resumed.start_epoch, resumed.steps_run, resumed.global_step) == (1, 2, 6)
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(x) for x in resumed.log.read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "step"] == list(range(1, 7))  # nothing twice


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(
    pairs: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real process killed inside a checkpoint write (os._exit), then resumed by the CLI."""
    cli = str(Path(sys.executable).parent / "retrieval")
    args = [
        "train", "--pairs", str(pairs), "--text-model", str(towers[0]), "--vision-model", str(towers[1]),
        "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--embed-dim", "16", "--device", "cpu",
        "--workers", "0", "--seed", "7", "--save-every", "1",
    ]  # fmt: skip
    subprocess.run([cli, *args, "--out", str(tmp_path / "a")], check=True, capture_output=True)
    # Writes: train_state.json, then checkpoint.pt after each step: the 5th is step 4's checkpoint.
    env = os.environ | {"RETRIEVAL_CRASH_AT_WRITE": "5"}
    crashed = subprocess.run([cli, *args, "--out", str(tmp_path / "b")], env=env, capture_output=True)
    assert crashed.returncode == 137
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["global_step"] == 3
    subprocess.run(
        [cli, *args, "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "b" / "checkpoint.pt")],
        check=True,
        capture_output=True,
    )
    a, b = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not list((tmp_path / "b").glob(".*.tmp-*"))  # the crashed write's temporary file is gone


def _crashing_train(run: TrainConfig, k: int) -> None:
    torch.set_num_threads(1)  # a forked child must not wait on the parent's OpenMP pool
    os.environ[CRASH_ENV] = str(k + durable.write_count())
    train(run)


def test_crash_at_every_write_then_resume(pairs: Path, towers: tuple[Path, Path], tmp_path: Path) -> None:
    """Kill training at each of its durable writes in turn (checkpoints every step, the state
    file, the log, the curves): what is on disk always loads as a seed-format checkpoint, and
    resuming from it ends with the weights of an uninterrupted run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the forked children: the same float sums, bit for bit
    try:
        _crash_and_resume_at_every_write(pairs, towers, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _crash_and_resume_at_every_write(pairs: Path, towers: tuple[Path, Path], tmp_path: Path) -> None:
    straight_run = config(pairs, towers, tmp_path / "straight", save_every=1)
    before = durable.write_count()
    straight = train(straight_run)
    writes = durable.write_count() - before
    expected = weights(straight.checkpoint)
    context = multiprocessing.get_context("fork")
    for k in range(1, writes + 2):
        run = replace(straight_run, out=tmp_path / f"crash-{k}")
        child = context.Process(target=_crashing_train, args=(run, k))
        child.start()
        child.join(300)
        assert child.exitcode == (0 if k > writes else 137), k
        saved = run.out / "checkpoint.pt"
        if saved.exists():
            state = torch.load(saved, weights_only=True)
            assert set(state) == {"epoch", "global_step", "model_state_dict", "optimizer_state_dict"}, k
        resumed = train(replace(run, resume=saved) if saved.exists() else run)
        after = weights(resumed.checkpoint)
        assert all(torch.equal(after[key], expected[key]) for key in expected), k
        assert not list(run.out.glob(".*.tmp-*")), k
    print(f"training crashed at each of its {writes} durable writes, each resumed to the same weights")
    assert writes >= 8


def test_cached_and_streamed_images_train_the_same(
    pairs: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    cached = train(config(pairs, towers, tmp_path / "cached"))
    streamed = train(config(pairs, towers, tmp_path / "streamed", cache_gb=0.0))
    a, b = weights(cached.checkpoint), weights(streamed.checkpoint)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert {o.source for o in streamed.skipped} >= {"broken.png", "gone.png"}


def test_frozen_tower_does_not_move(pairs: Path, towers: tuple[Path, Path], tmp_path: Path) -> None:
    torch.manual_seed(7)  # the run's seed: the same random initial towers
    fresh = MultiModalEncoder(towers[0], towers[1], embed_dim=16).state_dict()
    text = [k for k in fresh if k.startswith("text_encoder.")]
    vision = [k for k in fresh if k.startswith("visual_encoder.") and fresh[k].dtype.is_floating_point]
    projection = ["text_projection.weight", "text_projection.bias"]
    after = weights(train(config(pairs, towers, tmp_path / "a", epochs=1, freeze_text=True)).checkpoint)
    assert all(torch.equal(after[k], fresh[k]) for k in text)
    assert not all(torch.equal(after[k], fresh[k]) for k in vision)
    assert not all(torch.equal(after[k], fresh[k]) for k in projection)
    locked = config(pairs, towers, tmp_path / "b", epochs=1, freeze_text=True, freeze_text_projection=True)
    after = weights(train(locked).checkpoint)
    assert all(torch.equal(after[k], fresh[k]) for k in text + projection)
    assert not all(torch.equal(after[k], fresh[k]) for k in vision)


def test_bad_settings_and_checkpoints_are_refused(
    pairs: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="batch-size"):
        train(config(pairs, towers, tmp_path, batch_size=0))
    with pytest.raises(ConfigError, match="give one of them"):
        train(config(pairs, towers, tmp_path, resume=tmp_path / "a.pt", init=tmp_path / "b.pt"))
    model = MultiModalEncoder(towers[0], towers[1], embed_dim=16)
    torch.save(
        {"epoch": 1, "global_step": 5, "model_state_dict": model.state_dict()}, tmp_path / "weights.pt"
    )
    with pytest.raises(CheckpointError, match="no optimizer_state_dict"):
        train(config(pairs, towers, tmp_path / "run", resume=tmp_path / "weights.pt"))
    # --init takes the same file: its weights, a fresh optimizer, epoch 0.
    report = train(config(pairs, towers, tmp_path / "run", init=tmp_path / "weights.pt", epochs=1))
    assert (report.start_epoch, report.global_step) == (0, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_training_on_a_gpu_writes_checkpoints_that_load_on_the_cpu(
    pairs: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    report = train(config(pairs, towers, tmp_path, device="cuda", precision="bf16", epochs=3))
    log = [json.loads(x) for x in report.log.read_text().splitlines() if '"type": "step"' in x]
    assert all(np.isfinite(r["loss"]) for r in log)
    state = torch.load(report.checkpoint, weights_only=True)  # no map_location needed
    assert all(v.device.type == "cpu" for v in state["model_state_dict"].values())
    resumed = train(
        config(pairs, towers, tmp_path, device="cuda", precision="bf16", epochs=4, resume=report.checkpoint)
    )
    assert resumed.global_step == 4 * 3


def test_random_crops_are_seeded_and_stay_in_range() -> None:
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    torch.manual_seed(3)
    a = random_crops(pixels)
    torch.manual_seed(3)
    b = random_crops(pixels)
    torch.manual_seed(4)
    c = random_crops(pixels)
    assert a.shape == (6, 16, 16, 3) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 255
    # A solid image stays the same solid image, whatever the crop.
    solid = torch.full((2, 16, 16, 3), 77, dtype=torch.uint8)
    assert torch.allclose(random_crops(solid), torch.full((2, 16, 16, 3), 77.0), atol=1e-3)


def test_frozen_text_states_equal_running_the_tower(
    pairs: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    """A frozen text tower's [CLS] states are computed once; the loss is the one the tower gives."""
    run = _Trainer(config(pairs, towers, tmp_path, freeze_text=True), resolve_runtime("cpu"), Silent())
    assert run.data in run.text_states
    batch = next(run.data.batches([np.arange(8)]))
    run.model.eval()
    with torch.no_grad():
        cached = run._loss(batch, run.data)
        run.text_states.clear()
        direct = run._loss(batch, run.data)
    assert float(cached) == pytest.approx(float(direct), rel=1e-5)
