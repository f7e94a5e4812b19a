"""The command line: the three console scripts, one-line errors, --json, --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stores import model_flags

BIN = Path(sys.executable).parent


def cli(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", ["retrieval", "index", "search"])
def test_help(script: str) -> None:
    result = cli(script, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: {script} " in result.stdout


def test_retrieval_lists_its_groups() -> None:
    out = cli("retrieval", "--help").stdout
    for command in ("version", "index", "search", "model"):
        assert command in out


def test_version_json() -> None:
    result = cli("retrieval", "version", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= {"retrieval", "torch", "transformers", "faiss"}
    assert data["retrieval"] == "0.1.0"


def test_model_info(checkpoint: Path, towers: tuple[Path, Path]) -> None:
    args = ["--checkpoint", str(checkpoint), "--text-model", str(towers[0]), "--vision-model", str(towers[1])]
    result = cli("retrieval", "model", "info", *args, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["epoch"], data["global_step"], data["best_loss"], data["dim"]) == (5, 10000, 0.1234, 16)
    assert len(data["fingerprint"]["digest"]) == 64
    table = cli("retrieval", "model", "info", *args).stdout
    assert "global_step" in table and "10000" in table and data["fingerprint"]["digest"] in table


def test_library_error_is_one_line_and_exit_2(tmp_path: Path, towers: tuple[Path, Path]) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00" * 100)
    args = ["model", "info", *model_flags(bad, *towers)]
    result = cli("retrieval", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "broken.pt" in result.stderr and "Traceback" not in result.stderr

    debug = cli("retrieval", "--debug", *args)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_usage_error_exit_code() -> None:
    result = cli("retrieval", "model", "info", "--no-such-flag")
    assert result.returncode == 2
    assert "No such option" in result.stderr


def test_default_checkpoint_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "retrieval"), "model", "info"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: checkpoint checkpoints/best_checkpoint.pt does not exist"


def test_index_build_and_info(tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "bad.jpg").write_text("not an image")
    (images / "0.txt").write_text("a dog on the street")
    model = model_flags(checkpoint, *towers)
    out = tmp_path / "index"
    args = [str(images), "--out", str(out), *model, "--device", "cpu", "--workers", "1"]

    result = cli("index", "build", *args, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["collections"]["images"]["indexed"] == 3
    assert report["collections"]["images"]["failed"] == 1
    assert report["collections"]["captions"]["indexed"] == 1

    again = cli("index", "build", *args)
    assert again.returncode == 0, again.stderr
    assert "images: 3 indexed (0 new" in again.stdout and "1 failed" in again.stdout

    info = cli("retrieval", "index", "info", str(out), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    images_info = data["collections"]["images"]
    assert (images_info["indexed"], images_info["skipped"], images_info["failed"]) == (3, 0, 1)
    assert images_info["failures"] == [
        {"source": "bad.jpg", "stage": "decode", "reason": "not an image in a known format"}
    ]
    table = cli("index", "info", str(out)).stdout
    assert "failed  bad.jpg: not an image in a known format" in table


def test_index_build_errors_are_one_line(tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]) -> None:
    model = model_flags(checkpoint, *towers)
    missing = cli("index", "build", str(tmp_path / "nope"), *model)
    assert missing.returncode == 2
    assert (
        missing.stderr.strip() == f"error: image folder {tmp_path / 'nope'} does not exist or is not a folder"
    )
    nothing = cli("index", "build", *model)
    assert nothing.returncode == 2 and "nothing to index" in nothing.stderr
    info = cli("index", "info", str(tmp_path))
    assert info.returncode == 2 and "not an index folder" in info.stderr


def test_commands_without_a_model_import_neither_torch_nor_transformers(tmp_path: Path) -> None:
    # `index info` (and `--help`) must not pay seconds of imports for a model they never load.
    code = (
        "import sys; sys.argv = ['index', 'info', sys.argv[1]]\n"
        "from retrieval.cli import index_app, run\n"
        "try:\n    run(index_app)\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
