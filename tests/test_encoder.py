"""The batched encoder: exact against the seed's one-at-a-time path, in order, unit norm."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXTS, make_text_tower, make_vision_tower, seed_checkpoint
from PIL import Image

from retrieval import ConfigError, Encoder, InputError, ModelSpec, MultiModalEncoder, resolve_runtime
from retrieval.model.preprocess import ImagePreprocess


@pytest.fixture(scope="module")
def encoder(checkpoint: Path, towers: tuple[Path, Path]) -> Encoder:
    with Encoder.load(ModelSpec(checkpoint, *towers), device="cpu") as enc:
        yield enc


def one_at_a_time_texts(model: MultiModalEncoder, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        rows = [
            model.encode_text(model.text_tokenizer(t, return_tensors="pt", padding=True, truncation=True))
            for t in texts
        ]
    return torch.cat(rows).numpy()


def one_at_a_time_images(model: MultiModalEncoder, images: list[Image.Image]) -> np.ndarray:
    with torch.no_grad():
        rows = [model.encode_image(model.image_processor(images=[im], return_tensors="pt")) for im in images]
    return torch.cat(rows).numpy()


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_texts_match_the_seed_loop_in_order(encoder: Encoder, batch_size: int) -> None:
    texts = TEXTS * 3  # several batches of mixed lengths; with batch size 1, two tokenizer chunks
    got = encoder.encode_texts(texts, batch_size=batch_size)
    assert got.dtype == np.float32 and got.shape == (len(texts), encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert row_cosines(got, one_at_a_time_texts(encoder.model, texts)).min() >= 0.9999


def test_images_match_the_seed_loop_in_order(encoder: Encoder, images: list[Image.Image]) -> None:
    got = encoder.encode_images(images, batch_size=4)
    assert got.dtype == np.float32 and got.shape == (len(images), encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert row_cosines(got, one_at_a_time_images(encoder.model, images)).min() >= 0.9999


def test_batch_size_does_not_change_results(encoder: Encoder, images: list[Image.Image]) -> None:
    np.testing.assert_allclose(encoder.encode_texts(TEXTS, 1), encoder.encode_texts(TEXTS, 64), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_images(images, 1), encoder.encode_images(images, 64), atol=1e-5)


def test_preprocessing_equals_the_image_processor(encoder: Encoder, images: list[Image.Image]) -> None:
    reference = encoder.model.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = np.stack([encoder.prepare_image(im) for im in images])
    ours = encoder.preprocess.normalize(torch.from_numpy(pixels))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_paths_and_images_give_the_same_vectors(
    encoder: Encoder, images: list[Image.Image], tmp_path: Path
) -> None:
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    np.testing.assert_allclose(encoder.encode_images(paths), encoder.encode_images(images), atol=1e-6)


def test_undecodable_path_names_the_file(encoder: Encoder, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        encoder.encode_images([bad])


def test_empty_inputs(encoder: Encoder) -> None:
    assert encoder.encode_texts([]).shape == (0, encoder.dim)
    assert encoder.encode_images([]).shape == (0, encoder.dim)


def test_long_text_is_truncated_to_the_model_limit(encoder: Encoder) -> None:
    long_text = " ".join(["walking"] * 500)
    vec = encoder.encode_texts([long_text])
    assert encoder.text_batcher.max_length == 64  # the tiny tower's position embeddings
    np.testing.assert_allclose(np.linalg.norm(vec), 1.0, atol=1e-5)


def test_bf16_on_cpu_stays_close(
    checkpoint: Path, towers: tuple[Path, Path], images: list[Image.Image]
) -> None:
    with (
        Encoder.load(ModelSpec(checkpoint, *towers), device="cpu") as fp32,
        Encoder.load(ModelSpec(checkpoint, *towers), device="cpu", precision="bf16") as bf16,
    ):
        assert bf16.runtime.precision == "bf16"
        low = bf16.encode_images(images)
        assert low.dtype == np.float32
        assert row_cosines(low, fp32.encode_images(images)).min() > 0.99
        assert row_cosines(bf16.encode_texts(TEXTS), fp32.encode_texts(TEXTS)).min() > 0.99


def test_model_mode_is_restored(encoder: Encoder) -> None:
    encoder.model.train()
    encoder.encode_texts(["a dog"])
    assert encoder.model.training
    encoder.model.eval()


def test_encode_pixels_checks_its_input(encoder: Encoder) -> None:
    with pytest.raises(ConfigError, match="uint8"):
        encoder.encode_pixels(np.zeros((2, 32, 32, 3), dtype=np.float32))


def test_fingerprint_is_stable_and_specific(
    checkpoint: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = ModelSpec(checkpoint, *towers)
    with Encoder.load(spec, device="cpu") as a, Encoder.load(spec, device="cpu") as b:
        assert a.fingerprint is not None and b.fingerprint is not None
        assert a.fingerprint.digest == b.fingerprint.digest
        first = a.fingerprint

    # Other weights: another checkpoint file.
    torch.manual_seed(99)
    other = seed_checkpoint(MultiModalEncoder(*towers, embed_dim=16), tmp_path / "other.pt")
    with Encoder.load(ModelSpec(other, *towers), device="cpu") as c:
        assert c.fingerprint is not None
        assert c.fingerprint.checkpoint_sha256 != first.checkpoint_sha256
        assert c.fingerprint.digest != first.digest

    # Other preprocessing: same weights, a different normalization in the processor config.
    vision = make_vision_tower(tmp_path / "vit-imagenet")
    config = (vision / "preprocessor_config.json").read_text().replace("0.5", "0.45")
    (vision / "preprocessor_config.json").write_text(config)
    with Encoder.load(ModelSpec(checkpoint, towers[0], vision), device="cpu") as d:
        assert d.fingerprint is not None
        assert d.fingerprint.image_preprocess != first.image_preprocess
        assert d.fingerprint.digest != first.digest
    assert dataclasses.asdict(first)["dim"] == 16


def test_minilm_width_text_tower(tmp_path: Path) -> None:
    """384-wide text tower (as in MiniLM), 512-d space: everything follows the tensors."""
    text = make_text_tower(tmp_path / "minilm", hidden=48)
    vision = make_vision_tower(tmp_path / "vit")
    torch.manual_seed(0)
    path = seed_checkpoint(MultiModalEncoder(text, vision, embed_dim=512), tmp_path / "wide.pt")
    with Encoder.load(ModelSpec(path, text, vision), device="cpu") as enc:
        assert enc.encode_texts(["a dog"]).shape == (1, 512)


@pytest.mark.parametrize(
    ("device", "precision", "pattern"),
    [
        ("cpu", "fp16", "fp16 is not supported on the CPU"),
        ("cpu", "int8", "unknown precision"),
        ("tpu", "auto", "unknown device"),
    ],
)
def test_bad_runtime_choices(device: str, precision: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        resolve_runtime(device, precision)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_runtime("cuda")


def test_unsupported_processor_is_refused() -> None:
    class CropProcessor:
        def to_dict(self) -> dict[str, object]:
            return {"size": {"shortest_edge": 224}, "do_center_crop": True}

    with pytest.raises(Exception, match="not supported"):
        ImagePreprocess.from_processor(CropProcessor())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(checkpoint: Path, towers: tuple[Path, Path], images: list[Image.Image]) -> None:
    spec = ModelSpec(checkpoint, *towers)
    with (
        Encoder.load(spec, device="cpu") as cpu,
        Encoder.load(spec, device="cuda", precision="fp32") as gpu32,
    ):
        assert row_cosines(gpu32.encode_images(images), cpu.encode_images(images)).min() >= 0.9999
        assert row_cosines(gpu32.encode_texts(TEXTS), cpu.encode_texts(TEXTS)).min() >= 0.9999
        with Encoder.load(spec, device="cuda") as auto:
            assert auto.runtime.precision in ("bf16", "fp16")
            assert row_cosines(auto.encode_images(images), cpu.encode_images(images)).min() > 0.99
            assert row_cosines(auto.encode_texts(TEXTS), cpu.encode_texts(TEXTS)).min() > 0.99


def test_truncation_equals_the_tokenizers_and_is_flagged(encoder: Encoder) -> None:
    texts = ["a dog", " ".join(["walking"] * 200), "the cat " * 40]
    ids, truncated = encoder.text_batcher.tokenize_flagged(texts)
    limit = encoder.text_batcher.max_length
    reference = encoder.model.text_tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
    assert ids == [list(r) for r in reference]
    assert truncated.tolist() == [False, True, True]
    np.testing.assert_allclose(encoder.encode_text_ids(ids), encoder.encode_texts(texts), atol=1e-6)
