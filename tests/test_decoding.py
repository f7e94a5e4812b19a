"""Feeding the model on a CPU: the cores shared with the model, pixels handed over in reused
shared memory, and where a build's time went."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stores import build_args

from retrieval import BuildConfig, build_index
from retrieval.build.config import StageReport, verdict
from retrieval.build.cores import CoreShare
from retrieval.ingest import reader
from retrieval.ingest.reader import read_images
from retrieval.ingest.sources import ImageFile
from retrieval.model.preprocess import ImagePreprocess

PREPROCESS = ImagePreprocess(32, 32)


# -- the model's share of the cores ----------------------------------------------------------------


def test_the_model_runs_one_thread_until_it_is_measured() -> None:
    share = CoreShare(cores=8)
    assert share.threads(None) == 1
    assert share.threads(0.004) == 1  # decoding measured, the model not yet


@pytest.mark.parametrize(
    ("decode_ms", "model_ms", "threads"),
    [
        (3.0, 1.0, 2),  # decoding is 3/4 of the work: the model gets a quarter of 8 cores
        (3.0, 3.0, 4),
        (3.0, 300.0, 8),  # a real model on a CPU: every core (its workers mostly wait)
        (300.0, 1.0, 1),  # giant images: one thread, never none
    ],
)
def test_the_model_gets_its_share_of_the_work(decode_ms: float, model_ms: float, threads: int) -> None:
    share = CoreShare(cores=8)
    share.add_encoded(16, 1, 16 * model_ms / 1000)
    assert share.threads(decode_ms / 1000) == threads
    share.decoding = False
    assert share.threads(decode_ms / 1000) == 8  # nothing left to decode: the model has the machine


def test_only_one_thread_batches_measure_the_model_and_the_cheapest_counts() -> None:
    share = CoreShare(cores=2)
    share.add_encoded(16, 1, 16 * 0.050)  # the first batch also warms up
    share.add_encoded(16, 1, 16 * 0.010)
    share.add_encoded(16, 2, 16 * 0.0001)  # two threads: the calling thread did half, not measured
    assert share.model_cpu == pytest.approx(0.010)
    assert CoreShare(cores=1).threads(0.001) == 1


# -- where the time goes ---------------------------------------------------------------------------


def test_on_shared_cores_the_verdict_names_the_stage_with_the_most_work() -> None:
    stages = (
        StageReport("decode", 1000, 3.0, 2),
        StageReport("encode", 1000, 1.0, 2),
        StageReport("write", 1000, 0.2, 1),
        StageReport("commit", 1000, 0.0, 1),  # not timed: left out
    )
    line = verdict(stages, gpus=False, shared_cores=2, seconds=2.2)
    assert line.startswith(
        "decode-bound (decode 71%, encode 24%, write 5% of the work on 2 shared cores, 95% busy)"
    )
    assert "waited" not in line
    idle = verdict(stages, gpus=False, shared_cores=2, seconds=10.0)
    assert "21% busy" in idle and "reading the files" in idle
    heavy_model = (StageReport("decode", 10, 0.1, 2), StageReport("encode", 10, 40.0, 2))
    assert verdict(heavy_model, gpus=False, shared_cores=2, seconds=21.0).startswith("model-bound")


def test_on_their_own_workers_the_slowest_stage_bounds() -> None:
    stages = (StageReport("decode", 1000, 2.0, 8), StageReport("encode", 1000, 1.0, 1))
    assert verdict(stages, gpus=True).startswith("GPU-bound (encode 1,000/s against decode 4,000/s)")


def test_a_local_build_reports_its_stages_and_gives_the_threads_back(config: BuildConfig) -> None:
    threads = torch.get_num_threads()
    report = build_index(config)
    assert torch.get_num_threads() == threads
    images, captions = report.collections["images"], report.collections["captions"]
    stages = {s.name: s for s in images.stages}
    assert list(stages) == ["decode", "encode", "write", "commit"]
    assert stages["decode"].inputs == images.encoded + images.failed
    assert stages["encode"].inputs == images.encoded == stages["write"].inputs
    assert stages["decode"].workers == 1 and stages["encode"].workers == threads
    assert all(s.busy > 0 for s in images.stages if s.name != "commit")
    assert "shared cores" in images.verdict and "-bound" in images.verdict
    assert [s.name for s in captions.stages] == ["encode", "write", "commit"]
    assert captions.stages[0].inputs == captions.encoded

    again = build_index(config).collections["images"]  # nothing to do: nothing timed
    assert again.stages == () and again.verdict == ""


def test_index_build_prints_where_the_time_went(config: BuildConfig) -> None:
    done = subprocess.run(build_args(config), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(part for part in done.stdout.split("; images stages: ")[1:])
    assert line.startswith("decode ") and "encode " in line and "write " in line
    assert "bound (" in done.stdout


# -- the hand-off --------------------------------------------------------------------------------


def _pictures(folder: Path, n: int, rng: np.random.Generator) -> list[ImageFile]:
    folder.mkdir()
    files = []
    for i in range(n):
        name = f"{i:03d}.png" if i % 7 else f"{i:03d}.txt"  # every seventh is not an image
        path = folder / name
        if name.endswith(".png"):
            Image.fromarray(rng.integers(0, 256, (40 + i % 5, 50, 3), dtype=np.uint8)).save(path)
        else:
            path.write_text("not an image")
        files.append(ImageFile(name, path.stat().st_size, path.stat().st_mtime_ns))
    return files


def _by_index(groups: list[reader.DecodedGroup]) -> dict[int, np.ndarray]:
    found = {}
    for group in groups:
        assert group.pixels.shape[0] == len(group.images)
        for k, image in enumerate(group.images):
            found[image.index] = group.pixels[k].numpy()
    return found


@pytest.mark.parametrize("ordered", [False, True])
def test_pixels_from_reused_slots_equal_decoding_here(tmp_path: Path, ordered: bool) -> None:
    """Many more groups than slots (groups of one file, two workers: ten slots for 60 groups),
    so every slot is reused several times: each image's pixels are its own, and every slot is
    free again at the end."""
    files = _pictures(tmp_path / "pictures", 60, np.random.default_rng(0))
    here = list(read_images(tmp_path / "pictures", files, PREPROCESS, workers=0, group=1))
    made: list[reader._Slots] = []

    class Recorded(reader._Slots):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            made.append(self)

    original, reader._Slots = reader._Slots, Recorded  # type: ignore[misc]
    try:
        there = list(
            read_images(tmp_path / "pictures", files, PREPROCESS, workers=2, group=1, ordered=ordered)
        )
    finally:
        reader._Slots = original  # type: ignore[misc]
    expected, got = _by_index(here), _by_index(there)
    assert sorted(got) == sorted(expected) and len(got) == 60 - 9
    for index, pixels in expected.items():
        np.testing.assert_array_equal(got[index], pixels)
    assert sum(len(g.failures) for g in there) == 9
    assert sum(g.cpu_seconds for g in there) > 0
    if ordered:  # in file order each group sends its own pixels
        assert not made
    else:
        assert len(made) == 1 and len(made[0].free) == made[0].pixels.shape[0] == 2 * 4 + 2


def test_without_a_free_slot_a_group_sends_its_own_pixels(tmp_path: Path) -> None:
    files = _pictures(tmp_path / "pictures", 12, np.random.default_rng(1))
    slots = reader._Slots(1, 4, (32, 32, 3))
    dataset = reader._GroupDataset(
        tmp_path / "pictures", files, PREPROCESS, 10**8, 4, 0.0, reader.decode_file, slots
    )
    keys = list(dataset.slotted())
    assert keys == [(0, 0), (1, -1), (2, -1)]
    slot, first = dataset[keys[0]]
    assert slot == 0 and first.pixels.numel() == 0  # in the slot, not in the message
    _, second = dataset[keys[1]]
    assert second.pixels.shape == (len(second.images), 32, 32, 3)
    pixels = slots.give_back(0, len(first.images))
    assert pixels.shape == (len(first.images), 32, 32, 3) and list(slots.free) == [0]


def test_a_decoder_returning_the_wrong_shape_fails_that_file_only(tmp_path: Path) -> None:
    files = _pictures(tmp_path / "pictures", 6, np.random.default_rng(2))
    group = reader.decode_group(
        tmp_path / "pictures",
        list(enumerate(files)),
        PREPROCESS,
        decode=_half_size_for_odd_files,
    )
    assert [image.index for image in group.images] == [2, 4]
    assert {index for index, _ in group.failures} == {0, 1, 3, 5}
    reasons = dict(group.failures)
    assert "decoded to (16, 16, 3), not (32, 32, 3)" in reasons[1].reason


def _half_size_for_odd_files(path: Path, preprocess: ImagePreprocess, max_pixels: int) -> tuple:
    sha, width, height, pixels, reduced = reader.decode_file(path, preprocess, max_pixels)
    if int(path.stem) % 2:
        pixels = pixels[:16, :16]
    return sha, width, height, pixels, reduced


def test_normalize_is_the_processors_arithmetic() -> None:
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.integers(0, 256, (3, 8, 9, 3), dtype=np.uint8))
    for preprocess in (
        ImagePreprocess(8, 9, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28)),
        dataclasses.replace(ImagePreprocess(8, 9), do_normalize=False),
    ):
        x = pixels.permute(0, 3, 1, 2).double() * preprocess.rescale_factor
        if preprocess.do_normalize:
            mean = torch.tensor(preprocess.mean, dtype=torch.float64).view(1, 3, 1, 1)
            x = (x - mean) / torch.tensor(preprocess.std, dtype=torch.float64).view(1, 3, 1, 1)
        got = preprocess.normalize(pixels)
        assert got.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got.double(), x, rtol=0, atol=1e-6)


def _niceness_as_hash(path: Path, preprocess: ImagePreprocess, max_pixels: int) -> tuple:
    _, width, height, pixels, reduced = reader.decode_file(path, preprocess, max_pixels)
    return str(os.nice(0)), width, height, pixels, reduced


def test_workers_decode_a_little_below_the_model(tmp_path: Path) -> None:
    files = [
        f for f in _pictures(tmp_path / "pictures", 8, np.random.default_rng(5)) if f.path.endswith(".png")
    ]
    groups = list(read_images(tmp_path / "pictures", files, PREPROCESS, workers=2, decode=_niceness_as_hash))
    seen = {image.sha256 for group in groups for image in group.images}
    assert seen == {str(min(os.nice(0) + 5, 19))}
