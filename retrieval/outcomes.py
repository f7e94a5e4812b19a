"""What became of an input that was not indexed: its status, where it stopped, a reason code and
a message for people.

Decisions read the code, never the message: ``Reason.retried`` says whether the next build tries
the input again although it did not change (a permission or I/O error, a folder that could not be
listed, a decode that ran out of time), or leaves it failed until it does (content that cannot be
used).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

__all__ = ["Outcome", "Reason", "Status"]

Status = Literal["indexed", "skipped", "failed"]


class Reason(Enum):
    """Why an input was skipped or failed."""

    # Access, not content: retried on every run.
    UNREADABLE = "unreadable"  # cannot open, read or stat (permissions, I/O)
    CANNOT_LIST = "cannot_list"  # a folder that could not be listed: its rows are kept meanwhile
    TIMEOUT = "timeout"  # decoding took longer than the limit (the machine may have been busy)
    LEGACY = "legacy"  # recorded by an engine that kept no code: tried again once
    # Content: left as it is until the file changes.
    EMPTY = "empty"  # a 0-byte file, or a caption with no text
    NOT_AN_IMAGE = "not_an_image"
    UNDECODABLE = "undecodable"  # an image that fails while decoding (truncated, damaged)
    TOO_LARGE = "too_large"  # over the pixel limit (a decompression bomb)
    WRONG_SIZE = "wrong_size"  # the model takes a fixed size and does not resize
    BAD_TEXT = "bad_text"  # not UTF-8, invalid JSON or CSV
    # What the walk leaves out.
    OUTSIDE_ROOT = "outside_root"  # a symlink out of the image folder
    LINK_LOOP = "link_loop"  # a broken symlink or a cycle
    NOT_A_FILE = "not_a_file"  # a FIFO or device named like an image
    BAD_NAME = "bad_name"  # a name that is not valid UTF-8
    # Pairs files.
    NO_IMAGE = "no_image"  # a pairs row that names no image, or one the index does not hold

    @property
    def retried(self) -> bool:
        return self in _RETRIED


_RETRIED = frozenset({Reason.UNREADABLE, Reason.CANNOT_LIST, Reason.TIMEOUT, Reason.LEGACY})


@dataclass(frozen=True)
class Outcome:
    """Why an input was not indexed: ``status`` is skipped or failed, ``stage`` where it happened
    (walk, read, decode, match), ``code`` the reason as a value to decide on, ``reason`` in words."""

    source: str
    status: Status
    stage: str
    reason: str
    code: Reason
    size: int | None = None
    mtime_ns: int | None = None
    parent: str | None = None  # for a caption row: the file it belongs to

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"code": self.code.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        code = Reason(data["code"]) if "code" in data else Reason.LEGACY
        fields = {f.name for f in dataclasses.fields(cls)} - {"code"}
        return cls(**{k: v for k, v in data.items() if k in fields}, code=code)
