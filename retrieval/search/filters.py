"""``--where``: rows kept by ``FIELD=VALUE`` (equal) or ``FIELD~GLOB`` (shell pattern) tests.

The tests become an id allow-list that FAISS applies inside the search (an ``IDSelector``), not
an over-fetch-and-drop. They run one data file at a time over the columns they name, as Arrow
compute (built-in columns) or over the ``metadata`` column alone (a caption file's own columns),
so memory holds one file's columns and the matching ids, never the collection. ``path`` is
matched in every form a user has at hand: as stored (relative to the image folder), absolute as
results print it in JSON, relative to the working folder as the table prints it, with ``./`` or
through a symlink: each form of the value is turned into the stored form before matching.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval.errors import ConfigError
from retrieval.search.hits import user_fields
from retrieval.store.schema import CAPTION_COLUMNS, IMAGE_COLUMNS

__all__ = ["Where", "matching_ids", "needed_columns", "parse_where"]

Where = tuple[str, str, str]  # (field, op, value); op "=" or "~"
_BUILT_IN = {"images": set(IMAGE_COLUMNS) - {"embedding"}, "captions": set(CAPTION_COLUMNS) - {"embedding"}}


def matching_ids(
    target: str, files: Iterable[pa.Table], where: Sequence[Where], root: str | None
) -> np.ndarray:
    """Ids of the rows of ``files`` (each one data file's ``needed_columns``) whose fields pass
    every test, sorted. Refuses a field no row has."""
    built_in = _BUILT_IN[target]
    if target == "images":
        for name, _, _ in where:
            if name not in built_in:
                fields = ", ".join(sorted(built_in - {"id"}))
                raise ConfigError(f"--where: no field {name!r} in {target} (fields: {fields})")
    paths = target == "images" and root is not None
    tests = [(n, op, _path_values(op, v) if paths and n == "path" else [v]) for n, op, v in where]
    found: list[np.ndarray] = []
    own_fields: set[str] = set()
    for table in files:
        keep = np.ones(table.num_rows, dtype=bool)
        metadata = None
        for name, op, values in tests:
            if paths and name == "path":
                forms = _path_forms(table.column("path"), str(root))
                keep &= np.logical_or.reduce([_column_matches(f, op, values) for f in forms])
                continue
            if name in built_in:
                keep &= _column_matches(table.column(name), op, values)
                continue
            if metadata is None:
                metadata = [user_fields(json.loads(m or "{}")) for m in table.column("metadata").to_pylist()]
                own_fields.update(*metadata)
            keep &= np.array([_value_matches(m.get(name), op, values) for m in metadata], dtype=bool)
        found.append(table.column("id").to_numpy()[keep])
    for name, _, _ in where:
        if name not in built_in and name not in own_fields:
            fields = ", ".join(sorted((built_in - {"id"}) | own_fields))
            raise ConfigError(f"--where: no field {name!r} in {target} (fields: {fields})")
    return np.sort(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)


def needed_columns(target: str, where: Sequence[Where]) -> list[str]:
    """The columns ``where`` reads: the built-in fields it names, ``metadata`` for the others."""
    built_in = _BUILT_IN[target]
    names = {n for n, _, _ in where if n in built_in}
    if target == "captions" and any(n not in built_in for n, _, _ in where):
        names.add("metadata")
    return ["id", *sorted(names - {"id"})]


def _column_matches(column: pa.ChunkedArray, op: str, values: Sequence[str]) -> np.ndarray:
    text = pc.cast(column, pa.string()) if not pa.types.is_list(column.type) else _joined(column)
    keep = np.zeros(len(column), dtype=bool)
    for value in values:
        hit = pc.equal(text, value) if op == "=" else pc.match_substring_regex(text, _glob_regex(value))
        keep |= hit.to_numpy(zero_copy_only=False).astype(bool) & ~np.asarray(pc.is_null(hit))
    return keep


def _joined(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A list column (``flags``) as text, its items joined by commas, as results print it."""
    return pa.chunked_array([pa.array([",".join(v or []) for v in column.to_pylist()], pa.string())])


def _value_matches(value: object, op: str, values: Sequence[str]) -> bool:
    if value is None:
        return False
    text = str(value)
    return any(text == v if op == "=" else fnmatch.fnmatchcase(text, v) for v in values)


def _glob_regex(pattern: str) -> str:
    """A shell pattern (``*``, ``?``, ``[...]``, ``[!...]``) as an anchored RE2 regular expression."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := _class_end(pattern, i)) > 0:
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "(?s)^" + "".join(out) + "$"


def _class_end(pattern: str, start: int) -> int:
    """Where the ``[...]`` class opening at ``start`` closes (a ``]`` right after ``[`` or ``[!`` is
    a member), or -1 for a lone ``[``."""
    first = start + 2 if pattern[start + 1 : start + 2] == "!" else start + 1
    return pattern.find("]", first + 1)


def _path_values(op: str, value: str) -> list[str]:
    """A path as a user may type or paste it: ``./`` dropped, and an existing file (through any
    symlink) also as its real path, which is how the image root is recorded."""
    while value.startswith("./"):
        value = value[2:]
    if op == "=" and os.path.exists(value) and os.path.realpath(value) != value:
        return [value, os.path.realpath(value)]
    return [value]


def _path_forms(stored: pa.ChunkedArray, root: str) -> list[pa.ChunkedArray]:
    """The path column as stored (relative to the root), absolute as results print it, and
    relative to the working folder as the table prints it."""
    absolute = pc.binary_join_element_wise(pa.scalar(root.rstrip("/")), stored, "/")
    relative = pc.binary_join_element_wise(pa.scalar(os.path.relpath(root)), stored, "/")
    return [stored, absolute, relative]


def parse_where(expressions: Sequence[str]) -> list[tuple[str, str, str]]:
    """``FIELD=VALUE`` (equal) or ``FIELD~GLOB`` (shell pattern) -> ``(field, op, value)``."""
    parsed = []
    for expression in expressions:
        match = re.fullmatch(r"\s*([\w.-]+)\s*([=~])\s*(.*)", expression)
        if not match:
            raise ConfigError(f"--where {expression!r}: expected FIELD=VALUE or FIELD~PATTERN")
        parsed.append((match.group(1), match.group(2), match.group(3)))
    return parsed
