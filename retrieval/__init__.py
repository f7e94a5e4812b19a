"""A multimodal retrieval engine for a checkpointed BERT + ViT dual encoder.

Importing the package is cheap: names load their module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "retrieval.model.checkpoint",
    "CheckpointInfo": "retrieval.model.checkpoint",
    "load_checkpoint": "retrieval.model.checkpoint",
    "Encoder": "retrieval.model.encoder",
    "ModelSpec": "retrieval.model.spec",
    "load_model": "retrieval.model.encoder",
    "BuildConfig": "retrieval.build.config",
    "BuildReport": "retrieval.build.config",
    "build_index": "retrieval.build.pipeline",
    "Store": "retrieval.store.folder",
    "Retriever": "retrieval.search.retriever",
    "Hit": "retrieval.search.hits",
    "Term": "retrieval.search.compose",
    "NeighborsConfig": "retrieval.search.neighbors",
    "write_neighbors": "retrieval.search.neighbors",
    "DuplicatesConfig": "retrieval.search.duplicates",
    "find_duplicates": "retrieval.search.duplicates",
    "IndexConfig": "retrieval.ann.faiss_index",
    "StoreError": "retrieval.errors",
    "IndexMismatchError": "retrieval.errors",
    "CheckpointError": "retrieval.errors",
    "ConfigError": "retrieval.errors",
    "InputError": "retrieval.errors",
    "ModelError": "retrieval.errors",
    "RetrievalError": "retrieval.errors",
    "ModelFingerprint": "retrieval.model.fingerprint",
    "MultiModalEncoder": "retrieval.model.dual_encoder",
    "Runtime": "retrieval.model.runtime",
    "resolve_runtime": "retrieval.model.runtime",
    "EvalConfig": "retrieval.evaluation.protocol",
    "EvalReport": "retrieval.evaluation.protocol",
    "evaluate": "retrieval.evaluation.protocol",
    "TrainConfig": "retrieval.training.config",
    "TrainReport": "retrieval.training.config",
    "train": "retrieval.training.loop",
}

__all__ = [
    "BuildConfig",
    "BuildReport",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "ConfigError",
    "DuplicatesConfig",
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
    "NeighborsConfig",
    "RetrievalError",
    "Retriever",
    "Runtime",
    "Store",
    "StoreError",
    "Term",
    "TrainConfig",
    "TrainReport",
    "__version__",
    "build_index",
    "evaluate",
    "find_duplicates",
    "load_checkpoint",
    "load_model",
    "resolve_runtime",
    "train",
    "write_neighbors",
]

if TYPE_CHECKING:
    from retrieval.ann.faiss_index import IndexConfig
    from retrieval.build.config import BuildConfig, BuildReport
    from retrieval.build.pipeline import build_index
    from retrieval.errors import (
        CheckpointError,
        ConfigError,
        IndexMismatchError,
        InputError,
        ModelError,
        RetrievalError,
        StoreError,
    )
    from retrieval.evaluation.protocol import EvalConfig, EvalReport, evaluate
    from retrieval.model.checkpoint import Checkpoint, CheckpointInfo, load_checkpoint
    from retrieval.model.dual_encoder import MultiModalEncoder
    from retrieval.model.encoder import Encoder, load_model
    from retrieval.model.fingerprint import ModelFingerprint
    from retrieval.model.runtime import Runtime, resolve_runtime
    from retrieval.model.spec import ModelSpec
    from retrieval.search.compose import Term
    from retrieval.search.duplicates import DuplicatesConfig, find_duplicates
    from retrieval.search.hits import Hit
    from retrieval.search.neighbors import NeighborsConfig, write_neighbors
    from retrieval.search.retriever import Retriever
    from retrieval.store.folder import Store
    from retrieval.training.config import TrainConfig, TrainReport
    from retrieval.training.loop import train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
