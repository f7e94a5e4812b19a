"""The README's library example runs as written, in a folder laid out as it says."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_text_tower, make_vision_tower, seed_checkpoint
from PIL import Image

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
