"""MultiModalEncoder: construction from local folders and equality with the seed's computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEXTS, make_text_tower, make_vision_tower
from PIL import Image
from transformers import BertConfig, BertModel

from retrieval import ModelError, MultiModalEncoder


def seed_text_reference(model: MultiModalEncoder, text: str) -> torch.Tensor:
    """The seed's computation, written out: tokenizer -> BERT -> [CLS] -> projection -> L2."""
    inputs = model.text_tokenizer(text, return_tensors="pt", padding=True, truncation=True)
    cls = model.text_encoder(**inputs).last_hidden_state[:, 0, :]
    return F.normalize(model.text_projection(cls), p=2, dim=-1)


def seed_image_reference(model: MultiModalEncoder, image: Image.Image) -> torch.Tensor:
    inputs = model.image_processor(images=[image], return_tensors="pt")
    cls = model.visual_encoder(**inputs).last_hidden_state[:, 0, :]
    return F.normalize(model.visual_projection(cls), p=2, dim=-1)


@pytest.fixture
def model(towers: tuple[Path, Path]) -> MultiModalEncoder:
    torch.manual_seed(1)
    return MultiModalEncoder(bert_model_name=towers[0], vit_model_name=towers[1]).eval()


@torch.no_grad()
def test_encode_text_equals_the_seed_computation(model: MultiModalEncoder) -> None:
    for text in TEXTS:
        inputs = model.text_tokenizer(text, return_tensors="pt", padding=True, truncation=True)
        got = model.encode_text(inputs)
        assert got.dtype == torch.float32 and got.shape == (1, 256)
        torch.testing.assert_close(got, seed_text_reference(model, text), rtol=0, atol=1e-6)


@torch.no_grad()
def test_encode_image_equals_the_seed_computation(
    model: MultiModalEncoder, images: list[Image.Image]
) -> None:
    for image in images:
        inputs = model.image_processor(images=[image], return_tensors="pt")
        got = model.encode_image(inputs)
        assert got.shape == (1, 256)
        torch.testing.assert_close(got, seed_image_reference(model, image), rtol=0, atol=1e-6)


def test_parts_are_the_seeds(model: MultiModalEncoder) -> None:
    assert model.text_encoder.config.model_type == "bert"
    assert model.visual_encoder.config.model_type == "vit"
    assert isinstance(model.text_projection, torch.nn.Linear)
    assert isinstance(model.visual_projection, torch.nn.Linear)
    assert model.text_projection.in_features == model.text_encoder.config.hidden_size
    assert model.visual_projection.in_features == model.visual_encoder.config.hidden_size
    assert model.temperature.requires_grad
    assert {k.split(".")[0] for k in model.state_dict()} == {
        "text_encoder",
        "visual_encoder",
        "text_projection",
        "visual_projection",
        "temperature",
    }


def test_widths_come_from_the_towers(tmp_path: Path) -> None:
    """A 384-wide text tower (MiniLM-like) and a 512-d space need no constant changed."""
    text = make_text_tower(tmp_path / "minilm", hidden=48)
    vision = make_vision_tower(tmp_path / "vit", hidden=64)
    model = MultiModalEncoder(text, vision, embed_dim=512)
    assert model.text_projection.weight.shape == (512, 48)
    assert model.visual_projection.weight.shape == (512, 64)
    assert model.embed_dim == 512


def test_folder_with_weights_loads_them(tmp_path: Path, towers: tuple[Path, Path]) -> None:
    folder = make_text_tower(tmp_path / "bert-with-weights")
    torch.manual_seed(7)
    tower = BertModel(BertConfig.from_pretrained(folder))
    tower.save_pretrained(folder)
    model = MultiModalEncoder(folder, towers[1])
    expected = tower.state_dict()["embeddings.word_embeddings.weight"]
    assert torch.equal(model.text_encoder.state_dict()["embeddings.word_embeddings.weight"], expected)


def test_folder_with_only_config_is_random_init(tmp_path: Path) -> None:
    text = make_text_tower(tmp_path / "t")
    vision = make_vision_tower(tmp_path / "v", with_processor=False)
    torch.manual_seed(0)
    a = MultiModalEncoder(text, vision)
    torch.manual_seed(1)
    b = MultiModalEncoder(text, vision)
    assert not torch.equal(
        a.text_encoder.embeddings.word_embeddings.weight, b.text_encoder.embeddings.word_embeddings.weight
    )
    # Without preprocessor_config.json the processor is ViT's default at the tower's image size.
    pixels = a.image_processor(images=[Image.new("RGB", (50, 40))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("which", ["text", "vision"])
def test_missing_folder_is_a_clear_error_and_downloads_nothing(
    tmp_path: Path, towers: tuple[Path, Path], which: str
) -> None:
    # A hub-style name must not be looked up online: only local folders are towers.
    text, vision = towers
    args = ("bert-base-uncased", vision) if which == "text" else (text, "google/vit-base-patch16-224")
    with pytest.raises(ModelError, match="no config.json"):
        MultiModalEncoder(*args)


def test_text_folder_without_vocabulary(tmp_path: Path, towers: tuple[Path, Path]) -> None:
    folder = make_text_tower(tmp_path / "novocab")
    (folder / "vocab.txt").unlink()
    with pytest.raises(ModelError, match="tokenizer"):
        MultiModalEncoder(folder, towers[1])


@torch.no_grad()
def test_forward_gives_both_modalities(model: MultiModalEncoder, images: list[Image.Image]) -> None:
    text = model.text_tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    pixels = model.image_processor(images=images[:2], return_tensors="pt")
    t, v = model(text, pixels)
    assert t.shape == v.shape == (2, 256)
    np.testing.assert_allclose(t.norm(dim=-1).numpy(), 1.0, atol=1e-5)
