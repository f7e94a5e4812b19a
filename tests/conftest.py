"""Shared fixtures: tiny random-init towers in temporary folders, checkpoints in the seed's format.

Nothing is downloaded: configs are written with ``save_pretrained`` and a 60-word vocabulary.
Every index folder a test leaves in its ``tmp_path`` must pass ``index verify`` afterwards,
unless the test is marked ``damages_stores``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from corpus import make_corpus
from PIL import Image
from stores import build_config
from transformers import BertConfig, ViTConfig, ViTImageProcessor

from retrieval import MultiModalEncoder
from retrieval.build.pipeline import BuildConfig
from retrieval.build.verify import verify_index

WORDS = (
    "a an the person people man woman child dog cat bird bicycle car street walking running "
    "sitting on in at with red blue green black white small big photo of picture drawing flag "
    "tree house road beach water sky food plate fruit apple banana sun moon star book table chair"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGE_SIZE = 32


def make_text_tower(folder: Path, hidden: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS + [".", ","]) + "\n")
    BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS) + 2,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    ).save_pretrained(folder)
    return folder


def make_vision_tower(folder: Path, hidden: int = 32, with_processor: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        image_size=IMAGE_SIZE,
        patch_size=8,
    ).save_pretrained(folder)
    if with_processor:
        ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


def seed_checkpoint(model: MultiModalEncoder, path: Path, **extra: object) -> Path:
    """Write ``model`` the way the seed's pretrain.py does."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    torch.save(
        {
            "epoch": 5,
            "global_step": 10000,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            **extra,
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def towers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return make_text_tower(root / "bert-tiny"), make_vision_tower(root / "vit-tiny")


@pytest.fixture(scope="session")
def checkpoint(towers: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = MultiModalEncoder(bert_model_name=towers[0], vit_model_name=towers[1], embed_dim=16)
    path = tmp_path_factory.mktemp("checkpoints") / "best_checkpoint.pt"
    return seed_checkpoint(model, path, best_loss=0.1234)


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (32, 32), (64, 48), (17, 50), (100, 80), (33, 33)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


TEXTS = [
    "A person is walking on the street.",
    "a dog",
    "a red car on the road with a big tree and a small house in the picture",
    "",
    "a photo of a cat sitting on a chair",
    "people",
]


@pytest.fixture(autouse=True)
def _verify_the_stores_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, ``verify_index`` on every index folder under its ``tmp_path``."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if folder is None or request.node.get_closest_marker("damages_stores"):
        return
    for catalog in sorted(folder.rglob("catalog.json")):
        report = verify_index(catalog.parent)
        if not report.ok:
            pytest.fail(f"{catalog.parent} fails index verify: {report.problems}")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A made-up image folder with every mode and every kind of bad file (``corpus.py``)."""
    return make_corpus(tmp_path / "images", tmp_path / "outside")


@pytest.fixture
def config(tmp_path: Path, corpus: Path, checkpoint: Path, towers: tuple[Path, Path]) -> BuildConfig:
    """A build of ``corpus`` and three captions into ``tmp_path / "index"``, in small shards."""
    return build_config(tmp_path, corpus, checkpoint, towers)
