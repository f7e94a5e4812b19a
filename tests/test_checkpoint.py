"""Checkpoint loading: safe unpickling, strict keys with real-world tolerance, clear errors."""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import seed_checkpoint

from retrieval import CheckpointError, ModelSpec, MultiModalEncoder, load_checkpoint, load_model


@pytest.fixture
def fresh(towers: tuple[Path, Path]) -> MultiModalEncoder:
    torch.manual_seed(3)
    return MultiModalEncoder(towers[0], towers[1], embed_dim=16)


def save(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "ckpt.pt", **extra: object) -> Path:
    path = tmp_path / name
    torch.save(
        {"epoch": 1, "global_step": 2, "model_state_dict": state, "optimizer_state_dict": {}, **extra}, path
    )
    return path


def assert_same_weights(model: MultiModalEncoder, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def test_seed_format_round_trip(checkpoint: Path, towers: tuple[Path, Path]) -> None:
    loaded = load_checkpoint(checkpoint)
    assert (loaded.epoch, loaded.global_step, loaded.best_loss) == (5, 10000, 0.1234)
    assert loaded.optimizer_state_dict is not None and "param_groups" in loaded.optimizer_state_dict
    assert loaded.optimizer_state_dict["param_groups"][0]["lr"] == 1e-4
    assert len(loaded.sha256) == 64
    model, _ = load_model(ModelSpec(checkpoint, *towers))
    assert model.embed_dim == 16
    assert not model.training
    assert_same_weights(model, loaded.model_state_dict)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(
    tmp_path: Path, fresh: MultiModalEncoder, towers: tuple[Path, Path], prefix: str
) -> None:
    state = fresh.state_dict()
    path = save(tmp_path, {prefix + k: v for k, v in state.items()})
    model, _ = load_model(ModelSpec(path, *towers))
    assert_same_weights(model, state)


def test_pooler_may_be_absent(tmp_path: Path, fresh: MultiModalEncoder, towers: tuple[Path, Path]) -> None:
    state = {k: v for k, v in fresh.state_dict().items() if ".pooler." not in k}
    model, _ = load_model(ModelSpec(save(tmp_path, state), *towers))
    assert_same_weights(model, state)
    # The model now matches the checkpoint's layout, so saving it back round-trips.
    assert set(model.state_dict()) == set(state)


def test_projection_without_bias_and_other_width(
    tmp_path: Path, fresh: MultiModalEncoder, towers: tuple[Path, Path]
) -> None:
    heads = {"text_projection.bias", "visual_projection.bias"}
    state = {k: v for k, v in fresh.state_dict().items() if k not in heads}
    state["text_projection.weight"] = torch.randn(40, 32)
    state["visual_projection.weight"] = torch.randn(40, 32)
    state["temperature"] = torch.tensor([0.05])
    model, _ = load_model(ModelSpec(save(tmp_path, state), *towers))
    assert model.embed_dim == 40
    assert model.text_projection.bias is None
    assert model.temperature.shape == (1,)
    assert_same_weights(model, state)


def test_legacy_position_ids_buffer_is_ignored(
    tmp_path: Path, fresh: MultiModalEncoder, towers: tuple[Path, Path]
) -> None:
    state = fresh.state_dict()
    state["text_encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    model, _ = load_model(ModelSpec(save(tmp_path, state), *towers))
    assert "text_encoder.embeddings.position_ids" not in model.state_dict()


def test_missing_and_unexpected_keys_are_listed(
    tmp_path: Path, fresh: MultiModalEncoder, towers: tuple[Path, Path]
) -> None:
    state = fresh.state_dict()
    del state["text_encoder.encoder.layer.1.output.dense.weight"]
    state["visual_encoder.extra_head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as info:
        load_model(ModelSpec(save(tmp_path, state), *towers))
    message = str(info.value)
    assert "1 missing keys: text_encoder.encoder.layer.1.output.dense.weight" in message
    assert "1 unexpected keys: visual_encoder.extra_head.weight" in message


def test_wrong_shape_is_listed(tmp_path: Path, fresh: MultiModalEncoder, towers: tuple[Path, Path]) -> None:
    state = fresh.state_dict()
    state["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(99, 32)
    with pytest.raises(
        CheckpointError, match=r"word_embeddings.weight: checkpoint \(99, 32\) vs model \(\d+, 32\)"
    ):
        load_model(ModelSpec(save(tmp_path, state), *towers))


def test_projection_of_the_wrong_tower_width_is_refused(
    tmp_path: Path, fresh: MultiModalEncoder, towers: tuple[Path, Path]
) -> None:
    state = fresh.state_dict()
    state["text_projection.weight"] = torch.zeros(16, 768)
    with pytest.raises(CheckpointError, match=r"text_projection.weight: checkpoint \(16, 768\)"):
        load_model(ModelSpec(save(tmp_path, state), *towers))


def test_numpy_best_loss_is_admitted(tmp_path: Path, fresh: MultiModalEncoder) -> None:
    path = seed_checkpoint(fresh, tmp_path / "best.pt", best_loss=np.float64(0.25), epoch=np.int64(3))
    loaded = load_checkpoint(path)
    assert loaded.best_loss == 0.25 and isinstance(loaded.best_loss, float)
    assert loaded.epoch == 3


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_checkpoint_that_runs_code_is_refused_without_running_it(
    tmp_path: Path, fresh: MultiModalEncoder
) -> None:
    marker = tmp_path / "pwned"
    path = save(tmp_path, fresh.state_dict(), payload=_RunsCode(marker))
    with pytest.raises(CheckpointError, match=r"needs to unpickle \w+\.open, .*--trust-checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_unknown_objects_need_trust(tmp_path: Path, fresh: MultiModalEncoder) -> None:
    path = save(tmp_path, fresh.state_dict(), args=argparse.Namespace(lr=1e-4))
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust_checkpoint=True).epoch == 1


def test_bare_state_dict_file_is_accepted(tmp_path: Path, fresh: MultiModalEncoder) -> None:
    path = tmp_path / "weights.pt"
    torch.save(OrderedDict(fresh.state_dict()), path)
    loaded = load_checkpoint(path)
    assert loaded.epoch is None and loaded.optimizer_state_dict is None
    assert set(loaded.model_state_dict) == set(fresh.state_dict())


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", "is empty"),
        (b"this is not a checkpoint\n", "not a readable PyTorch checkpoint"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_checkpoint(tmp_path: Path, checkpoint: Path, fraction: float) -> None:
    data = checkpoint.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ([1, 2, 3], "holds a list"),
        ({"epoch": 1}, "no 'model_state_dict'"),
        ({"model_state_dict": {"a": 1}}, "not a mapping of names to tensors"),
        ({"model_state_dict": {"a": torch.zeros(1)}, "epoch": "five"}, "'epoch' should be an integer"),
    ],
)
def test_malformed_checkpoints(tmp_path: Path, obj: object, pattern: str) -> None:
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path)


def test_a_recorded_hash_is_trusted_only_while_the_file_is_unchanged(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from retrieval.durable import file_sha256, stat_key
    from retrieval.model import checkpoint as module
    from retrieval.model.checkpoint import KnownHash

    checkpoint = Path(shutil.copy(checkpoint, tmp_path / "copy.pt"))
    real = file_sha256(checkpoint)
    same = load_checkpoint(checkpoint, known=KnownHash("0" * 64, stat_key(checkpoint) or []))
    assert same.sha256 == "0" * 64 and same.stat == stat_key(checkpoint)  # unchanged: not hashed again
    other = load_checkpoint(checkpoint, known=KnownHash("0" * 64, [1, 2, 3, 4]))
    assert other.sha256 == real  # its stats differ from the recorded ones: hashed

    read = module._read

    def replaced_meanwhile(path: Path, trust: bool) -> object:
        value = read(path, trust)
        os.utime(path, ns=(1, 2))  # a training run saving over it
        return value

    monkeypatch.setattr(module, "_read", replaced_meanwhile)
    with pytest.raises(CheckpointError, match="changed while it was being read"):
        load_checkpoint(checkpoint)
