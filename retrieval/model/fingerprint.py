"""The model fingerprint: what must be equal for two vectors to be comparable.

Two embeddings are comparable only if they came from the same weights (the checkpoint's sha256),
the same tower architectures, the same preprocessing (tokenizer vocabulary and limits, image
size, resampling and normalization) and the same dimension. Stores and indexes record the
fingerprint and refuse vectors from any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.model.preprocess import ImagePreprocess

__all__ = ["ModelFingerprint", "config_digest", "tokenizer_digest"]

# Keys that record who wrote a config, not what it computes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}
_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def config_digest(config: Any) -> str:
    """sha256 of a transformers config, ignoring keys that do not change the computation."""
    values = {
        k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")
    }
    return _digest(values)


def tokenizer_digest(folder: Path, max_length: int) -> str:
    """sha256 of the tokenizer files in ``folder`` and the effective maximum length."""
    parts: dict[str, Any] = {"max_length": max_length}
    for name in _TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            parts[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _digest(parts)


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of an embedding space; ``digest`` is the one value to compare."""

    checkpoint_sha256: str
    text_config: str
    vision_config: str
    tokenizer: str
    image_preprocess: str
    dim: int

    @property
    def digest(self) -> str:
        return _digest(dataclasses.asdict(self))

    @classmethod
    def compute(
        cls,
        *,
        checkpoint_sha256: str,
        text_config: Any,
        vision_config: Any,
        tokenizer_folder: Path,
        max_length: int,
        preprocess: ImagePreprocess,
        dim: int,
    ) -> ModelFingerprint:
        return cls(
            checkpoint_sha256=checkpoint_sha256,
            text_config=config_digest(text_config),
            vision_config=config_digest(vision_config),
            tokenizer=tokenizer_digest(tokenizer_folder, max_length),
            image_preprocess=_digest(dataclasses.asdict(preprocess)),
            dim=dim,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "digest": self.digest}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
