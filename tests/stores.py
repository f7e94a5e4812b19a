"""Helpers for tests that build index folders: a build config over the made-up corpus, the live
rows of a store, a canonical form to compare two stores, and the CLI arguments of a build."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from retrieval import ModelSpec
from retrieval.ann.faiss_index import IndexConfig, build_collection_index
from retrieval.build.pipeline import BuildConfig
from retrieval.cli import index_app, run
from retrieval.model.fingerprint import ModelFingerprint
from retrieval.store.folder import Store, new_manifest
from retrieval.store.manifest import CollectionState
from retrieval.store.schema import ImageRow, schema, shard_table, table_description


def build_config(tmp_path: Path, corpus: Path, checkpoint: Path, towers: tuple[Path, Path]) -> BuildConfig:
    """The corpus and three captions (one paired with an image, one empty), in small shards."""
    captions = tmp_path / "captions.csv"
    captions.write_text("caption,image,lang\na dog walking on the street,pic.bmp,en\n,,en\nthe cat,,fr\n")
    return BuildConfig(
        out=tmp_path / "index",
        images=corpus,
        captions=(captions,),
        model=ModelSpec(checkpoint, *towers),
        device="cpu",
        workers=1,
        image_shard_rows=4,
        caption_shard_rows=2,
    )


def live(folder: Path, collection: str) -> pa.Table:
    """Rows of ``collection`` still in search, sorted by id."""
    with Store.open(folder) as store:
        tables = [t for _, t in store.iter_shards(collection)]
    return pa.concat_tables(tables).sort_by("id")


def committed(folder: Path) -> tuple[str, dict[str, int | None]]:
    """What a folder has committed, to compare before and after a run: the catalog's text and
    each table's newest version."""
    catalog = (folder / "catalog.json").read_text() if (folder / "catalog.json").exists() else ""
    with Store.open(folder) as store:
        versions = {c: s.version for c, s in store.committed.collections.items()} if store.committed else {}
    return catalog, versions


def catalog_of(folder: Path) -> dict:
    return json.loads((folder / "catalog.json").read_text())


def canonical(folder: Path) -> dict[str, list[tuple]]:
    """(id, source, sha256) of every live row, per collection."""
    out = {}
    with Store.open(folder) as store:
        present = [c for c in ("images", "captions") if store.state(c).shards]
    for collection in present:
        rows = live(folder, collection)
        key = "path" if collection == "images" else "text"
        out[collection] = list(
            zip(
                rows.column("id").to_pylist(),
                rows.column(key).to_pylist(),
                rows.column("sha256").to_pylist(),
                strict=True,
            )
        )
    return out


def cli(argv: list[str]) -> int:
    """Run the ``index`` app in this process; its exit code."""
    try:
        run(index_app, argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def model_flags(checkpoint: Path, text_model: Path, vision_model: Path) -> list[str]:
    """The CLI's model flags for a checkpoint and its two tower folders."""
    return [
        "--checkpoint",
        str(checkpoint),
        "--text-model",
        str(text_model),
        "--vision-model",
        str(vision_model),
    ]


def build_args(config: BuildConfig, *extra: str) -> list[str]:
    """The ``index build`` command line of ``config``."""
    return [
        str(Path(sys.executable).parent / "index"),
        "build",
        str(config.images),
        *(a for c in config.captions for a in ("--captions", str(c))),
        "--out",
        str(config.out),
        *model_flags(config.model.checkpoint, config.model.text_model, config.model.vision_model),
        "--device",
        "cpu",
        "--workers",
        "1",
        *extra,
    ]


def seeded_store(
    folder: Path,
    vectors: np.ndarray,
    *,
    ids: np.ndarray | None = None,
    digests: list[str] | None = None,
    shard_rows: int = 1000,
    kind: str = "flat",
) -> Path:
    """An index folder of ``vectors`` (unit norm) as images, with a FAISS index of ``kind``: the
    rows through ``shard_table`` in shards of ``shard_rows`` (stored in reverse order of id, so that
    no reader may take file order for id order), paths ``img/<id>.jpg``, ``digests`` as sha256."""
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    digests = digests or [f"{i:064x}" for i in ids]
    fingerprint = ModelFingerprint("seeded", "text", "vision", "tokenizer", "preprocess", dim).to_dict()
    with Store.open(folder, write=True) as store:
        manifest = store.commit_catalog(new_manifest({"fingerprint": fingerprint}))
        refs = []
        for start in range(0, n, shard_rows):
            part = slice(start, start + shard_rows)
            rows = [
                ImageRow(f"img/{i}.jpg", d, 1, 0, 8, 8) for i, d in zip(ids[part], digests[part], strict=True)
            ]
            table = shard_table("images", ids[part][::-1], rows[::-1], vectors[part][::-1], fingerprint)
            refs.append(store.write_table(f"images/part-{start:09d}.parquet", table))
        state = CollectionState(next_id=int(ids.max()) + 1, counts={"indexed": n}, root=str(folder))
        state = store.commit_rows(
            store.table("images"),
            state,
            schema("images", dim),
            table_description("images", fingerprint),
            refs,
        )
        store.manifest = dataclasses.replace(manifest, collections={"images": state})
        record = build_collection_index(store, "images", IndexConfig(kind=kind), None, "self")
        assert record is not None
        record = dataclasses.replace(record, version=state.version, rows_version=state.rows_version)
        store.commit_catalog(
            dataclasses.replace(
                store.manifest, collections={"images": dataclasses.replace(state, index=record)}
            )
        )
    return folder
