"""What a user types in the first hour, through the real console scripts: sidecar captions, a
second image folder, touched files, odd queries, paths in filters and results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stores import live, model_flags

BIN = Path(sys.executable).parent


def cli(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def pictures(folder: Path, names: list[str], seed: int = 0) -> Path:
    """Small random PNGs at ``folder / name`` (sub-folders made as needed)."""
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def model(checkpoint: Path, towers: tuple[Path, Path]) -> list[str]:
    return [*model_flags(checkpoint, *towers), "--device", "cpu", "--workers", "1"]


def build(images: Path | None, out: Path, model: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    args = [str(images)] if images is not None else []
    return cli("index", "build", *args, "--out", str(out), *model, *extra)


def report(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["collections"]


# -- sidecars ------------------------------------------------------------------------------------


def test_a_sidecar_holds_one_caption_per_line(tmp_path: Path, model: list[str]) -> None:
    images = pictures(tmp_path / "images", ["cat.png", "dog.png"])
    (images / "cat.txt").write_text("a cat on a chair\n\n  un chat   sur une chaise \n" + "walking " * 200)
    (images / "dog.txt").write_text("a dog\n")
    out = tmp_path / "index"

    result = build(images, out, model)
    assert result.returncode == 0, result.stderr
    # Four captions; the 200-word line is cut at the tiny tower's 64 positions and counted.
    assert "captions: 4 indexed (4 new" in result.stdout
    assert "1 cut to the tokenizer's limit" in result.stdout
    rows = live(out, "captions")
    assert sorted(zip(rows.column("source").to_pylist(), rows.column("row").to_pylist(), strict=True)) == [
        ("cat.txt", 0),
        ("cat.txt", 2),
        ("cat.txt", 3),
        ("dog.txt", 0),
    ]
    texts = dict(zip(rows.column("text").to_pylist(), rows.column("image").to_pylist(), strict=True))
    assert texts["a cat on a chair"] == texts["un chat sur une chaise"] == "cat.png"
    assert texts["a dog"] == "dog.png"

    # Editing one line re-encodes that line only; the other rows keep their ids.
    ids = dict(zip(rows.column("text").to_pylist(), rows.column("id").to_pylist(), strict=True))
    (images / "cat.txt").write_text("a cat on a chair\n\nune chatte\n" + "walking " * 200)
    captions = report(build(images, out, model, "--json"))["captions"]
    assert (captions["encoded"], captions["reused"], captions["deleted"], captions["indexed"]) == (1, 0, 1, 4)
    after = dict(
        zip(
            live(out, "captions").column("text").to_pylist(),
            live(out, "captions").column("id").to_pylist(),
            strict=True,
        )
    )
    assert after["a cat on a chair"] == ids["a cat on a chair"]
    assert after["a dog"] == ids["a dog"]
    assert "un chat sur une chaise" not in after and "une chatte" in after


# -- another image folder ------------------------------------------------------------------------


def test_another_image_folder_is_refused_unless_replace_root(tmp_path: Path, model: list[str]) -> None:
    first = pictures(tmp_path / "images", ["a.png", "b.png", "c.png"], seed=1)
    other = pictures(tmp_path / "other", ["x.png"], seed=2)
    (other / "b.png").write_bytes((first / "b.png").read_bytes())  # one file in common
    out = tmp_path / "index"
    assert report(build(first, out, model, "--json"))["images"]["indexed"] == 3
    manifest = (out / "manifest.json").read_bytes()

    refused = build(other, out, model)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert str(first.resolve()) in refused.stderr and "--replace-root" in refused.stderr
    assert (out / "manifest.json").read_bytes() == manifest  # nothing changed

    images = report(build(other, out, model, "--replace-root", "--json"))["images"]
    assert (images["indexed"], images["encoded"], images["reused"], images["deleted"]) == (2, 1, 1, 3)
    assert sorted(live(out, "images").column("path").to_pylist()) == ["b.png", "x.png"]

    # Back to the first folder: every vector is still there (deleted rows stay until a rebuild).
    back = report(build(first, out, model, "--replace-root", "--json"))["images"]
    assert (back["indexed"], back["encoded"], back["reused"]) == (3, 0, 3)


def test_a_touched_file_keeps_its_row_and_id(tmp_path: Path, model: list[str]) -> None:
    images = pictures(tmp_path / "images", [f"{i}.png" for i in range(6)])
    out = tmp_path / "index"
    build(images, out, model)
    before = live(out, "images")
    for path in images.iterdir():
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    (images / "5.png").write_bytes((images / "0.png").read_bytes())  # other content

    result = build(images, out, model)
    assert result.returncode == 0, result.stderr
    assert "5 touched, kept" in result.stdout and "1 new: 0 encoded, 1 reused; 1 removed" in result.stdout
    after = live(out, "images")
    old = dict(zip(before.column("path").to_pylist(), before.column("id").to_pylist(), strict=True))
    new = dict(zip(after.column("path").to_pylist(), after.column("id").to_pylist(), strict=True))
    assert all(new[f"{i}.png"] == old[f"{i}.png"] for i in range(5))
    assert new["5.png"] not in old.values()
    mtimes = dict(zip(after.column("path").to_pylist(), after.column("mtime_ns").to_pylist(), strict=True))
    assert mtimes["1.png"] == (images / "1.png").stat().st_mtime_ns  # the new stats are recorded

    again = build(images, out, model, "--json")
    assert report(again)["images"]["added"] == 0 and report(again)["images"]["refreshed"] == 0
