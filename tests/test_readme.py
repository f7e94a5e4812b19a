"""The README's commands and library example, run as written where they can be: its first screen,
its search examples and its Python example."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text_tower, make_vision_tower, seed_checkpoint
from PIL import Image
from stores import model_flags

from retrieval import MultiModalEncoder

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    text = make_text_tower(tmp_path / "models" / "bert-base-uncased")
    vision = make_vision_tower(tmp_path / "models" / "vit-base-patch16-224")
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(0)
    seed_checkpoint(MultiModalEncoder(text, vision), tmp_path / "checkpoints" / "best_checkpoint.pt")
    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
            tmp_path / "photos" / f"{name}.jpg"
        )

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "the README has a Python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)

    images, texts = namespace["images"], namespace["texts"]
    assert isinstance(images, np.ndarray) and images.shape == (2, 256) and images.dtype == np.float32
    assert isinstance(texts, np.ndarray) and texts.shape == (2, 256)
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # the 2x2 similarity matrix


ROOT = README.parent
TEXT = README.read_text(encoding="utf-8")
VENV = Path(sys.executable).parent.parent


def first_block() -> tuple[int, list[str]]:
    """The line number and the lines of the README's first code block."""
    match = re.search(r"```bash\n(.*?)```", TEXT, re.S)
    assert match is not None
    return TEXT[: match.start()].count("\n"), match.group(1).splitlines()


def test_the_first_screen_goes_from_clone_to_a_search_result() -> None:
    start, lines = first_block()
    assert start < 20  # on the first screen
    commands = [line.split("#")[0].strip() for line in lines]
    steps = [
        next(i for i, c in enumerate(commands) if c.startswith(prefix))
        for prefix in ("git clone", "make demo", "source .venv/bin/activate", "search text")
    ]
    assert steps == sorted(steps)  # clone, demo, PATH, then the search
    assert "--index indexes/demo" in commands[steps[-1]]


def test_activating_the_environment_puts_the_commands_on_the_path() -> None:
    found = subprocess.run(
        ["bash", "-c", f"source {VENV}/bin/activate && command -v index search retrieval"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(VENV / "bin" / name) for name in ("index", "search", "retrieval")]


@pytest.mark.skipif(
    not (ROOT / ".venv" / ".installed").is_file() or VENV != ROOT / ".venv",
    reason="runs make in the project's own .venv",
)
def test_make_install_says_how_to_reach_the_commands() -> None:
    result = subprocess.run(["make", "-s", "install"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "source .venv/bin/activate" in result.stdout


def test_the_readme_where_example_finds_what_it_says(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]
) -> None:
    line = next(
        line.split("#")[0].strip()
        for line in TEXT.splitlines()
        if line.startswith('search text "a red flag"') and "--where" in line
    )
    # A small copy of the demo corpus, in the same folders, indexed with a tiny model.
    images = tmp_path / "data" / "images"
    for category in ("flag", "animal", "vehicle"):
        for path in sorted((ROOT / "data" / "images" / category).glob("*.png"))[:3]:
            (images / category).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, images / category / path.name)
    index = tmp_path / "indexes" / "demo"
    bin_ = Path(sys.executable).parent
    flags = [*model_flags(checkpoint, *towers), "--device", "cpu", "--workers", "1"]
    built = subprocess.run(
        [str(bin_ / "index"), "build", "data/images", "--out", str(index), *flags],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    args = shlex.split(line)
    result = subprocess.run(
        [str(bin_ / args[0]), *args[1:], "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert len(hits) == 3 and all(Path(h["path"]).parent.name == "flag" for h in hits)
    assert (tmp_path / "flags.png").is_file()
