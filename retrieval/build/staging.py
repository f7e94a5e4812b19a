"""Staged items: what a worker on another process or machine wrote for one work item, before the
build's driver commits it.

A worker writes an item's rows as a Parquet file, then a receipt (JSON: the file's reference, the
item's outcomes and counters), both in ``<table>/_retrieval/staging/`` under names fixed by the
item: its first id and a digest of the model, its ids and its inputs. A retried worker so writes
the same names again, and a rerun after a killed driver finds what the killed one staged and
commits it instead of encoding it again. ``take`` moves the data file into the table under the
committing version's name (one rename on the same file system) and ``release`` removes the
receipt, both before the commit; ``clear`` removes whatever no plan needs any more. Receipts are
written last, atomically: a receipt names a whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from retrieval import durable
from retrieval.build.items import WorkItem
from retrieval.outcomes import Outcome
from retrieval.store.folder import engine_folder, parquet_bytes, table_ref
from retrieval.store.manifest import FileRef

__all__ = ["StagedItem", "Staging", "item_name"]

STAGING = "staging"


@dataclass(frozen=True)
class StagedItem:
    """One work item as a worker wrote it: its data file (None when no input became a row), the
    outcomes of its failed inputs, and how its rows were made."""

    name: str
    file: FileRef | None
    outcomes: tuple[Outcome, ...]
    encoded: int
    reused: int
    truncated: int
    seconds: float = 0.0  # the writer's time (assembling and writing the file)

    @property
    def rows(self) -> int:
        return self.file.rows if self.file is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": vars(self.file) if self.file is not None else None,
            "outcomes": [o.to_dict() for o in self.outcomes],
            "encoded": self.encoded,
            "reused": self.reused,
            "truncated": self.truncated,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagedItem:
        return cls(
            data["name"],
            FileRef.parse(data["file"]),
            tuple(Outcome.from_dict(o) for o in data["outcomes"]),
            int(data["encoded"]),
            int(data["reused"]),
            int(data["truncated"]),
        )


def item_name(item: WorkItem, model_digest: str) -> str:
    """The staged name of ``item``: the same for the same model, ids and inputs, on any machine."""
    keys = [list(x.key) for x in item.inputs]
    data = json.dumps([model_digest, item.collection, list(item.ids), keys]).encode()
    return f"item-{item.ids[0]:012d}-{hashlib.sha256(data).hexdigest()[:20]}"


class Staging:
    """The staging folder of one table (``prefix``, relative to the index folder ``folder``)."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        self.relative = f"{engine_folder(prefix)}/{STAGING}"
        self.path = folder / self.relative

    # -- the worker's side ---------------------------------------------------------------------

    def write(
        self,
        name: str,
        table: pa.Table | None,
        outcomes: tuple[Outcome, ...],
        *,
        encoded: int,
        reused: int,
        truncated: int,
    ) -> StagedItem:
        """Stage an item: its rows (``table``, sorted by id; None: no row), then its receipt."""
        ref = None
        if table is not None and table.num_rows:
            relative = f"{self.relative}/{name}.parquet"
            data = parquet_bytes(table)
            durable.atomic_write_bytes(self.folder / relative, data)
            digest = hashlib.sha256(data).hexdigest()
            ref = table_ref(relative, table, FileRef(relative, digest, table.num_rows, len(data)))
        staged = StagedItem(name, ref, outcomes, encoded, reused, truncated)
        receipt = json.dumps(staged.to_dict(), sort_keys=True, ensure_ascii=False).encode()
        durable.atomic_write_bytes(self.path / f"{name}.json", receipt)
        return staged

    # -- the driver's side ---------------------------------------------------------------------

    def find(self, name: str) -> StagedItem | None:
        """The item staged as ``name``, if its receipt and its whole data file are there."""
        try:
            staged = StagedItem.from_dict(json.loads((self.path / f"{name}.json").read_bytes()))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none, or not whole: the item is done again
        if staged.name != name:
            return None
        if staged.file is not None:
            path, ref = self.folder / staged.file.file, staged.file
            try:
                if path.stat().st_size != ref.bytes or durable.file_sha256(path) != ref.sha256:
                    return None
            except OSError:
                return None
        return staged

    def take(self, staged: StagedItem, name: str) -> FileRef | None:
        """Move the staged data file to ``name`` (relative to the index folder) for its commit."""
        if staged.file is None:
            return None
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.folder / staged.file.file, target)
        durable.fsync_dir(target.parent)
        return replace(staged.file, file=name)

    def release(self, staged: StagedItem) -> None:
        """The item is about to be committed: its receipt goes first (a driver killed before the
        commit then does the item again; staging never holds a receipt of a committed item)."""
        (self.path / f"{staged.name}.json").unlink(missing_ok=True)
        durable.fsync_dir(self.path)

    def clear(self) -> None:
        """Remove everything staged: the collection's plan is done, no item of it is left."""
        shutil.rmtree(self.path, ignore_errors=True)
