"""``index migrate``: an index folder of the earlier format (``manifest.json``, schema version 1)
converted in place to Delta tables and a catalog.

Every file of the old folder is checked against the sha256 its manifest recorded before it is
read. Each collection's live rows (its shards less its deletion list) become the first version of
its Delta table, vectors unchanged; its outcomes are kept; a FAISS index that covered exactly the
live rows is kept (the next build rebuilds any other). The catalog is the commit point: a
migration that stops before it is written is started over by the next ``index migrate``, and one
that stops after it only leaves old files, removed by the next one. A folder with a ``--rebuild``
in progress is refused: finish or abandon the rebuild with the engine that started it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.durable import before_read
from retrieval.errors import StoreError
from retrieval.store.folder import CATALOG, LEGACY_MANIFEST, Store, engine_folder, new_manifest
from retrieval.store.manifest import COLLECTIONS, CollectionState, IndexRecord
from retrieval.store.schema import schema, stored_table, table_description

__all__ = ["MigrationReport", "migrate_folder"]


@dataclasses.dataclass
class MigrationReport:
    folder: str
    rows: dict[str, int]
    indexes_kept: list[str]
    already: bool = False


def migrate_folder(folder: Path) -> MigrationReport:
    """Convert ``folder`` from the earlier format; a folder already converted is left as it is."""
    legacy = folder / LEGACY_MANIFEST
    if (folder / CATALOG).is_file():
        left = [p for p in (legacy, folder / f"{LEGACY_MANIFEST}.old") if p.is_file()]
        if left:  # a migration that stopped after its catalog: the old files are still there
            with Store.open(folder, write=True) as store:
                _remove_old_files(store, json.loads(left[0].read_text()))
        return MigrationReport(str(folder), {}, [], already=True)
    if not legacy.is_file():
        raise StoreError(f"{folder} is not an index folder of the earlier format (no {LEGACY_MANIFEST})")
    try:
        old = json.loads(legacy.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{legacy} is unreadable or damaged: {e}") from e
    if old.get("schema_version") != 1:
        raise StoreError(f"{legacy}: schema version {old.get('schema_version')} cannot be migrated")
    if old.get("rebuild"):
        raise StoreError(
            f"{folder}: a --rebuild is in progress; finish it (or delete the folder) with the engine "
            "that started it, then migrate"
        )
    legacy.rename(folder / f"{LEGACY_MANIFEST}.old")  # Store.open refuses a folder with manifest.json
    try:
        return _migrate(folder, old)
    finally:
        if not (folder / CATALOG).is_file():
            (folder / f"{LEGACY_MANIFEST}.old").rename(legacy)


def _migrate(folder: Path, old: dict[str, Any]) -> MigrationReport:
    model = dict(old["model"])
    fingerprint = model["fingerprint"]
    dim = int(fingerprint["dim"])
    report = MigrationReport(str(folder), {}, [])
    with Store.open(folder, write=True) as store:
        for name in COLLECTIONS:
            shutil.rmtree(folder / name / "_delta_log", ignore_errors=True)  # an earlier attempt's
            shutil.rmtree(folder / engine_folder(name), ignore_errors=True)
        manifest = new_manifest(model)
        states: dict[str, CollectionState] = {}
        for name, raw in old["collections"].items():
            if name not in COLLECTIONS:
                continue
            deleted = _ids(folder, raw.get("deleted"))
            adds = []
            for ref in raw["shards"]:
                table = pq.read_table(pa.BufferReader(_checked(folder, ref)))
                table = table.filter(pa.array(~np.isin(table.column("id").to_numpy(), deleted)))
                if not table.num_rows:
                    continue
                first = int(table.column("id").to_numpy().min())
                adds.append(
                    store.write_table(
                        f"{name}/shard-{first:012d}-v000000.parquet", stored_table(table, name, fingerprint)
                    )
                )
            outcomes = None
            if raw.get("outcomes"):
                data = _checked(folder, raw["outcomes"])
                lines = [line for line in data.decode().splitlines() if line]
                target = f"{engine_folder(name)}/outcomes-v000000.jsonl"
                outcomes = store.write_bytes(target, data, len(lines))
            state = CollectionState(
                next_id=int(raw["next_id"]),
                outcomes=outcomes,
                root=raw.get("root"),
                sources={k: list(v) for k, v in raw.get("sources", {}).items()},
                counts=dict(raw.get("counts", {})),
            )
            state = store.commit_rows(
                store.table(name), state, schema(name, dim), table_description(name, fingerprint), adds
            )
            report.rows[name] = state.rows
            index = _kept_index(folder, store, name, raw, state)
            if index is not None:
                report.indexes_kept.append(name)
            states[name] = dataclasses.replace(state, index=index)
        manifest = dataclasses.replace(manifest, collections=states, generation=int(old.get("generation", 0)))
        store.commit_catalog(manifest)
        _remove_old_files(store, old)
    return report


def _kept_index(
    folder: Path, store: Store, name: str, raw: dict[str, Any], state: CollectionState
) -> IndexRecord | None:
    """The old FAISS index, moved beside the tables, if it covered exactly the live rows."""
    index = raw.get("index")
    if not index:
        return None
    covers_all = index.get("shards") in (None, len(raw["shards"])) and (index.get("deleted") or {}).get(
        "sha256"
    ) == (raw.get("deleted") or {}).get("sha256")
    if not covers_all or index["rows"] != state.rows:
        return None
    data = _checked(folder, index["file"])
    target = f"faiss/{name}-{index['kind']}-g{0:06d}.faiss"
    ref = store.write_bytes(target, data, int(index["rows"]))
    fields = {f.name for f in dataclasses.fields(IndexRecord)}
    kept = {k: v for k, v in index.items() if k in fields and k not in ("file", "version", "rows_version")}
    return IndexRecord(**kept, file=ref, version=state.version, rows_version=state.rows_version)


def _checked(folder: Path, ref: dict[str, Any]) -> bytes:
    path = folder / ref["file"]
    try:
        before_read(path)
        data = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{path}: missing or unreadable ({e.strerror or e})") from e
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise StoreError(f"{path} does not match its sha256 in {LEGACY_MANIFEST} (truncated or altered)")
    return data


def _ids(folder: Path, ref: dict[str, Any] | None) -> np.ndarray:
    if not ref:
        return np.empty(0, dtype=np.int64)
    return pq.read_table(pa.BufferReader(_checked(folder, ref)), columns=["id"]).column("id").to_numpy()


def _remove_old_files(store: Store, old: dict[str, Any]) -> None:
    """The earlier format's files, once the catalog is written: none of them is named any more."""
    for raw in old["collections"].values():
        index = raw.get("index") or {}
        refs = [
            *raw["shards"],
            raw.get("deleted"),
            raw.get("outcomes"),
            index.get("file"),
            index.get("deleted"),
        ]
        plan = raw.get("plan")
        if plan:
            refs.append(plan["file"])
        for ref in refs:
            if ref:
                (store.folder / ref["file"]).unlink(missing_ok=True)
    for name in (LEGACY_MANIFEST, f"{LEGACY_MANIFEST}.old"):
        (store.folder / name).unlink(missing_ok=True)
