"""The engine's exceptions: one hierarchy, so callers can catch precisely or catch all.

Only the CLI turns these into exit codes; the library raises and chains them (``raise ... from e``).
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "IndexMismatchError",
    "InputError",
    "ModelError",
    "RetrievalError",
    "RetrievalWarning",
    "StoreError",
    "TruncationWarning",
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


class StoreError(RetrievalError):
    """An index folder is missing, locked, damaged, or was altered after it was written."""


class IndexMismatchError(StoreError):
    """An index folder holds vectors of another model (a different fingerprint)."""


class RetrievalWarning(UserWarning):
    """Base class of the engine's warnings: the command line shows them as one ``warning:`` line."""


class TruncationWarning(RetrievalWarning):
    """A text was longer than the tokenizer's limit and only its beginning was used."""
