"""The seed's own usage manual, run as written with one line changed.

``tests/data/seed_checkpoint_manual.md`` is the users' checkpoint manual. Its Python blocks run in
order in one namespace, in a folder laid out as the manual expects (``./models/...``,
``./checkpoints/best_checkpoint.pt``, ``example.jpg``), with ``from pretrain import
MultiModalEncoder`` replaced by ``from retrieval import MultiModalEncoder``. The resume block's
``MultiModalEncoder(...)`` placeholder is given the same two folders as the first block.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_text_tower, make_vision_tower
from PIL import Image

from retrieval import MultiModalEncoder

MANUAL = Path(__file__).parent / "data" / "seed_checkpoint_manual.md"
CONSTRUCTOR = (
    'MultiModalEncoder(bert_model_name="./models/bert-base-uncased", '
    'vit_model_name="./models/vit-base-patch16-224")'
)


def seed_blocks() -> list[str]:
    text = MANUAL.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    # The structure block is a dict literal with `{...}` placeholders, documentation only.
    return [b for b in blocks if "'model_state_dict': {...}" not in b]


@pytest.fixture
def seed_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder laid out like the users' project, with a checkpoint after one training step."""
    monkeypatch.chdir(tmp_path)
    make_text_tower(tmp_path / "models" / "bert-base-uncased")
    make_vision_tower(tmp_path / "models" / "vit-base-patch16-224")
    torch.manual_seed(0)
    model = MultiModalEncoder("./models/bert-base-uncased", "./models/vit-base-patch16-224")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    text = model.text_tokenizer(["a dog", "a cat"], return_tensors="pt", padding=True)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    image = model.image_processor(images=pictures, return_tensors="pt")
    t, v = model(text, image)
    loss = F.cross_entropy(t @ v.T / model.temperature, torch.arange(2))
    loss.backward()
    optimizer.step()
    (tmp_path / "checkpoints").mkdir()
    torch.save(
        {
            "epoch": 5,
            "global_step": 10000,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "best_loss": 0.1234,
        },
        tmp_path / "checkpoints" / "best_checkpoint.pt",
    )
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "example.jpg")
    return tmp_path


def test_manual_has_the_expected_snippets() -> None:
    blocks = seed_blocks()
    assert len(blocks) == 7
    assert sum("from pretrain import MultiModalEncoder" in b for b in blocks) == 1
    assert sum("MultiModalEncoder(...)" in b for b in blocks) == 1


def test_seed_snippets_run_with_one_import_changed(
    seed_workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace: dict[str, object] = {}
    for block in seed_blocks():
        code = block.replace(
            "from pretrain import MultiModalEncoder", "from retrieval import MultiModalEncoder"
        )
        code = code.replace("MultiModalEncoder(...)", CONSTRUCTOR)
        exec(compile(code, str(MANUAL), "exec"), namespace)

    printed = capsys.readouterr().out
    assert "Loaded from epoch 5, step 10000" in printed
    assert "Best loss: 0.1234" in printed
    assert re.search(r"Text-Image similarity: -?\d\.\d{4}", printed)

    text_features = namespace["text_features"]
    image_features = namespace["image_features"]
    assert isinstance(text_features, torch.Tensor) and isinstance(image_features, torch.Tensor)
    assert text_features.shape == (1, 256) and image_features.shape == (1, 256)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(1), atol=1e-5)
    similarity = namespace["similarity"]
    assert isinstance(similarity, torch.Tensor)
    assert similarity.item() == pytest.approx(float(text_features[0] @ image_features[0]), abs=1e-6)

    # The towers used alone give the unnormalized projection of the same [CLS] state.
    projected = namespace["projected"]
    assert isinstance(projected, torch.Tensor) and projected.shape == (1, 256)
    assert torch.allclose(F.normalize(projected, dim=-1), image_features, atol=1e-5)

    # Resuming: the optimizer state of the saved step is restored, and the counters follow the seed.
    assert namespace["start_epoch"] == 6
    assert namespace["global_step"] == 10000
    optimizer = namespace["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    saved = torch.load("checkpoints/best_checkpoint.pt", weights_only=True)["optimizer_state_dict"]
    restored = optimizer.state_dict()
    assert len(restored["state"]) == len(saved["state"]) > 0
    for key, state in saved["state"].items():
        assert torch.equal(restored["state"][key]["exp_avg"], state["exp_avg"])
