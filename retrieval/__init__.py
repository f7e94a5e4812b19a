"""A multimodal retrieval engine for a checkpointed BERT + ViT dual encoder.

Importing the package is cheap: names load their module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "retrieval.checkpoint",
    "CheckpointInfo": "retrieval.checkpoint",
    "load_checkpoint": "retrieval.checkpoint",
    "Encoder": "retrieval.encoder",
    "ModelSpec": "retrieval.encoder",
    "load_model": "retrieval.encoder",
    "BuildConfig": "retrieval.indexer",
    "BuildReport": "retrieval.indexer",
    "build_index": "retrieval.indexer",
    "Store": "retrieval.store",
    "Retriever": "retrieval.search",
    "Hit": "retrieval.search",
    "IndexConfig": "retrieval.index",
    "StoreError": "retrieval.errors",
    "IndexMismatchError": "retrieval.errors",
    "CheckpointError": "retrieval.errors",
    "ConfigError": "retrieval.errors",
    "InputError": "retrieval.errors",
    "ModelError": "retrieval.errors",
    "RetrievalError": "retrieval.errors",
    "ModelFingerprint": "retrieval.fingerprint",
    "MultiModalEncoder": "retrieval.model",
    "Runtime": "retrieval.runtime",
    "resolve_runtime": "retrieval.runtime",
    "EvalConfig": "retrieval.evaluation",
    "EvalReport": "retrieval.evaluation",
    "evaluate": "retrieval.evaluation",
    "TrainConfig": "retrieval.train",
    "TrainReport": "retrieval.train",
    "train": "retrieval.train",
}

__all__ = [
    "BuildConfig",
    "BuildReport",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "ConfigError",
    "Encoder",
    "EvalConfig",
    "EvalReport",
    "Hit",
    "IndexConfig",
    "IndexMismatchError",
    "InputError",
    "ModelError",
    "ModelFingerprint",
    "ModelSpec",
    "MultiModalEncoder",
    "RetrievalError",
    "Retriever",
    "Runtime",
    "Store",
    "StoreError",
    "TrainConfig",
    "TrainReport",
    "__version__",
    "build_index",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "resolve_runtime",
    "train",
]

if TYPE_CHECKING:
    from retrieval.checkpoint import Checkpoint, CheckpointInfo, load_checkpoint
    from retrieval.encoder import Encoder, ModelSpec, load_model
    from retrieval.errors import (
        CheckpointError,
        ConfigError,
        IndexMismatchError,
        InputError,
        ModelError,
        RetrievalError,
        StoreError,
    )
    from retrieval.evaluation import EvalConfig, EvalReport, evaluate
    from retrieval.fingerprint import ModelFingerprint
    from retrieval.index import IndexConfig
    from retrieval.indexer import BuildConfig, BuildReport, build_index
    from retrieval.model import MultiModalEncoder
    from retrieval.runtime import Runtime, resolve_runtime
    from retrieval.search import Hit, Retriever
    from retrieval.store import Store
    from retrieval.train import TrainConfig, TrainReport, train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
