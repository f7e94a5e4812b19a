"""The engine's exceptions: one hierarchy, so callers can catch precisely or catch all.

Only the CLI turns these into exit codes; the library raises and chains them (``raise ... from e``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BuildInterrupted",
    "CheckpointError",
    "ClusterError",
    "ConfigError",
    "IndexMismatchError",
    "InputError",
    "InputWarning",
    "ModelError",
    "RetrievalError",
    "RetrievalWarning",
    "StaleIndexWarning",
    "StoreError",
    "TruncationWarning",
    "UnknownIdError",
]


class RetrievalError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(RetrievalError):
    """An option or argument has a value the engine cannot use (device, precision, batch size)."""


class ModelError(RetrievalError):
    """A tower folder, tokenizer or image processor is missing or unusable."""


class CheckpointError(RetrievalError):
    """A checkpoint file is unreadable, unsafe to load, or does not match the model."""


class InputError(RetrievalError):
    """A user input (image, caption, file) cannot be used."""


class UnknownIdError(InputError):
    """An id that is not a live row of the collection it was looked up in."""


class BuildInterrupted(RetrievalError):
    """A build stopped early on request: ``report`` (a ``BuildReport``) says what it committed."""

    def __init__(self, report: Any) -> None:
        super().__init__("the build was stopped before it finished")
        self.report = report


class ClusterError(RetrievalError):
    """A cluster engine could not start its workers, or lost work it could not redo."""


class StoreError(RetrievalError):
    """An index folder is missing, locked, damaged, or was altered after it was written."""


class IndexMismatchError(StoreError):
    """An index folder holds vectors of another model (a different fingerprint)."""


class RetrievalWarning(UserWarning):
    """Base class of the engine's warnings: the command line shows them as one ``warning:`` line."""


class TruncationWarning(RetrievalWarning):
    """A text was longer than the tokenizer's limit and only its beginning was used."""


class StaleIndexWarning(RetrievalWarning):
    """An index folder holds committed rows its FAISS index does not cover yet."""


class InputWarning(RetrievalWarning):
    """An input held nothing to index (an image folder without images, say)."""
