"""``--where``: rows kept by ``FIELD=VALUE`` (equal) or ``FIELD~GLOB`` (shell pattern) tests.

The tests become an id allow-list that FAISS applies inside the search (an ``IDSelector``), not
an over-fetch-and-drop. ``path`` is matched in every form a user has at hand: as stored (relative
to the image folder), absolute as results print it in JSON, relative to the working folder as the
table prints it, with ``./`` or through a symlink.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from retrieval.errors import ConfigError
from retrieval.search.hits import user_fields

__all__ = ["Where", "matching_ids", "parse_where"]

Where = tuple[str, str, str]  # (field, op, value); op "=" or "~"


def matching_ids(
    target: str, rows: pa.Table, ids: np.ndarray, where: Sequence[Where], root: str | None
) -> np.ndarray:
    """Of ``ids`` (the rows of ``rows`` in order), those whose fields pass every test."""
    records = rows.to_pylist()
    if target == "captions":
        records = [r | user_fields(json.loads(r.get("metadata") or "{}")) for r in records]
    known = set().union(*records) if records else set()
    for name, _, _ in where:
        if name not in known:
            raise ConfigError(f"--where: no field {name!r} in {target} (fields: {', '.join(sorted(known))})")
    paths = target == "images" and root is not None
    if paths:
        where = [(n, op, _path_pattern(op, v)) if n == "path" else (n, op, v) for n, op, v in where]
    keep = np.ones(len(records), dtype=bool)
    for i, record in enumerate(records):
        for name, op, value in where:
            texts = ["" if record.get(name) is None else str(record[name])]
            if paths and name == "path":
                absolute = os.path.join(str(root), texts[0])
                texts += [absolute, os.path.relpath(absolute)]
            matches = (t == value if op == "=" else fnmatch.fnmatchcase(t, value) for t in texts)
            if name not in record or not any(matches):
                keep[i] = False
                break
    return ids[keep]


def _path_pattern(op: str, value: str) -> str:
    """A path as a user may type or paste it: ``./`` dropped, and an existing file (through any
    symlink) as its real path, which is how the image root is recorded."""
    while value.startswith("./"):
        value = value[2:]
    if op == "=" and os.path.exists(value):
        return os.path.realpath(value)
    return value


def parse_where(expressions: Sequence[str]) -> list[tuple[str, str, str]]:
    """``FIELD=VALUE`` (equal) or ``FIELD~GLOB`` (shell pattern) -> ``(field, op, value)``."""
    parsed = []
    for expression in expressions:
        match = re.fullmatch(r"\s*([\w.-]+)\s*([=~])\s*(.*)", expression)
        if not match:
            raise ConfigError(f"--where {expression!r}: expected FIELD=VALUE or FIELD~PATTERN")
        parsed.append((match.group(1), match.group(2), match.group(3)))
    return parsed
