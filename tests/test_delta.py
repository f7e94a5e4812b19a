"""Collections as Delta Lake tables: what third-party readers see, pinned snapshots, vacuum, and
the migration of folders of the earlier format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import duckdb_ext
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from conftest import seed_checkpoint
from corpus import GOOD
from deltalake import DeltaTable
from stores import cli, live

from retrieval import ModelSpec, Retriever, StoreError
from retrieval.build.pipeline import BuildConfig, build_index
from retrieval.build.verify import verify_index
from retrieval.model.dual_encoder import MultiModalEncoder
from retrieval.store.folder import Store
from retrieval.vectors import embedding_matrix

V1_INDEX = Path(__file__).parent / "data" / "v1-index"


def delta_extension() -> str:
    """The path of duckdb's delta extension as the duckdb-ext-delta wheel ships it (no download)."""
    found = sorted(Path(next(iter(duckdb_ext.__path__))).rglob("delta.duckdb_extension"))
    assert found, "duckdb-ext-delta ships no delta extension"
    return str(found[0])


def change_files(config: BuildConfig) -> None:
    """An incremental run's work: a file deleted, one changed, one touched, one added."""
    assert config.images is not None
    (config.images / "pic.webp").unlink()
    (config.images / "pic.bmp").write_bytes((config.images / "clipart" / "flag.png").read_bytes())
    (config.images / "scan.tiff").touch()
    shutil.copy(config.images / "clipart" / "flag.png", config.images / "new-flag.png")


def test_duckdb_and_polars_read_exactly_the_live_rows(config: BuildConfig) -> None:
    build_index(config)
    change_files(config)
    report = build_index(config)
    assert report.collections["images"].deleted == 2  # the deleted file and the changed one's old row
    con = duckdb.connect()
    con.execute(f"INSTALL '{delta_extension()}'")
    con.execute("LOAD delta")
    for collection, key in (("images", "path"), ("captions", "text")):
        ours = live(config.out, collection)
        expected = list(zip(ours.column("id").to_pylist(), ours.column(key).to_pylist(), strict=True))
        table = str(config.out / collection)
        by_duckdb = con.execute(f"SELECT id, {key} FROM delta_scan('{table}') ORDER BY id").fetchall()
        by_polars = pl.scan_delta(table).select("id", key).sort("id").collect().rows()
        by_deltalake = DeltaTable(table).to_pyarrow_table(columns=["id", key]).sort_by("id")
        assert by_duckdb == expected, collection
        assert by_polars == expected, collection
        assert list(zip(*by_deltalake.to_pydict().values(), strict=True)) == expected, collection
        vectors = np.array(
            pl.scan_delta(table).sort("id").select("embedding").collect()["embedding"].to_list()
        )
        np.testing.assert_array_equal(vectors, embedding_matrix(ours.column("embedding"), 16))
    paths = {p for (p,) in con.execute(f"SELECT path FROM delta_scan('{config.out / 'images'}')").fetchall()}
    assert "pic.webp" not in paths and "new-flag.png" in paths
    assert len(paths) == len(GOOD)  # one gone, one added


def test_one_commit_per_item_and_the_schema_in_the_table(config: BuildConfig) -> None:
    build_index(config)
    table = DeltaTable(str(config.out / "images"))
    description = json.loads(table.metadata().description)
    with Store.open(config.out) as store:
        state = store.committed.collections["images"]
        assert description == {
            "collection": "images",
            "dim": 16,
            "fingerprint": store.committed.fingerprint,
            "schema_version": 2,
        }
    # the plan, then one commit per item adding its data file, then the plan cleared
    log = sorted((config.out / "images" / "_delta_log").glob("*.json"))
    actions = [[json.loads(line) for line in p.read_text().splitlines()] for p in log]
    adds = [sum("add" in a for a in entry) for entry in actions]
    assert adds[0] == adds[-1] == 0 and set(adds[1:-1]) <= {0, 1} and sum(adds) == len(state.shards)
    assert not any("remove" in a for entry in actions for a in entry)
    sizes = [p.stat().st_size for p in log[1:-1]]
    assert max(sizes) - min(sizes) < 200  # an entry's size does not grow with the table


def test_a_reader_keeps_its_snapshot_through_a_rebuild_and_a_vacuum(
    config: BuildConfig, tmp_path: Path, towers: tuple[Path, Path]
) -> None:
    build_index(config)
    with Retriever.open(config.out, device="cpu") as first:
        before = [(h.id, h.path) for h in first.search_text("a dog", k=5)]
    pinned = Retriever.open(config.out, device="cpu")  # nothing read yet: files are read lazily
    doomed = Retriever.open(config.out, device="cpu")
    torch.manual_seed(3)
    other = seed_checkpoint(MultiModalEncoder(*towers, embed_dim=16), tmp_path / "other.pt")
    rebuild = BuildConfig(**{**vars(config), "model": ModelSpec(other, *towers), "rebuild": True})
    build_index(rebuild)
    assert cli(["vacuum", str(config.out), "--retain", "1h"]) == 0
    assert [(h.id, h.path) for h in pinned.search_text("a dog", k=5)] == before  # old model, old files

    with Retriever.open(config.out, device="cpu") as fresh:
        after = [(h.id, h.path) for h in fresh.search_text("a dog", k=5)]
    assert pinned.refresh()
    assert [(h.id, h.path) for h in pinned.search_text("a dog", k=5)] == after
    assert not pinned.refresh()  # nothing new
    pinned.close()

    assert cli(["vacuum", str(config.out), "--retain", "0h"]) == 0  # the old version's files go
    with pytest.raises(StoreError, match="missing or unreadable"):
        doomed.search_text("a dog", k=5)
    doomed.close()
    assert verify_index(config.out).ok


def test_a_reader_sees_new_rows_only_after_refresh(config: BuildConfig) -> None:
    build_index(config)
    with Retriever.open(config.out, device="cpu") as reader:
        count = len(reader.rows("images").ids)
        assert config.images is not None
        shutil.copy(config.images / "clipart" / "flag.png", config.images / "another.png")
        (config.images / "pic.webp").unlink()
        build_index(config)
        assert len(reader.rows("images").ids) == count
        assert reader.refresh()
        ids = reader.rows("images").ids
        assert len(ids) == count  # one added, one deleted
        paths = set(reader.rows("images").table.column("path").to_pylist())
        assert "another.png" in paths and "pic.webp" not in paths


def test_vacuum_keeps_what_readers_within_the_retention_need(
    config: BuildConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    build_index(config)
    change_files(config)
    build_index(config)
    removed = set((config.out / "images").glob("shard-*.parquet"))
    with Store.open(config.out) as store:
        removed -= {config.out / f.file for f in store.committed.collections["images"].shards}
    assert removed  # the rewritten and deleted files are still there
    assert cli(["vacuum", str(config.out), "--retain", "24h", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == []
    assert all(p.exists() for p in removed)
    assert cli(["vacuum", str(config.out), "--retain", "0m"]) == 0
    assert not any(p.exists() for p in removed)
    assert verify_index(config.out).ok
    assert cli(["vacuum", str(config.out), "--retain", "soon"]) == 2
    assert "give a number and a unit" in capsys.readouterr().err


def test_an_earlier_format_folder_is_refused_then_migrated(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    shutil.copytree(V1_INDEX, folder)
    old = json.loads((folder / "manifest.json").read_text())
    deleted = set(pq.read_table(folder / old["collections"]["images"]["deleted"]["file"])["id"].to_pylist())
    expected = {}
    for collection in ("images", "captions"):
        ids = [
            i
            for ref in old["collections"][collection]["shards"]
            for i in pq.read_table(folder / ref["file"])["id"].to_pylist()
        ]
        expected[collection] = sorted(set(ids) - (deleted if collection == "images" else set()))
    assert deleted
    with pytest.raises(StoreError, match="earlier format: run `index migrate"):
        Store.open(folder)
    assert cli(["migrate", str(folder)]) == 0
    assert not (folder / "manifest.json").exists()
    assert verify_index(folder).ok
    for collection in ("images", "captions"):
        assert (
            pl.scan_delta(str(folder / collection)).select("id").sort("id").collect()["id"].to_list()
            == (expected[collection])
        )
    with Retriever.open(folder) as r:  # the FAISS indexes were kept: a search needs no rebuild
        _, rows = next(r.store.iter_shards("images", ["id", "embedding"]))
        ids, scores = r.search_vectors(embedding_matrix(rows.column("embedding"), 16)[:1], k=3)
        assert ids[0, 0] == rows.column("id")[0].as_py() and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        assert r.store.outcomes("images")  # the broken file's failure is kept
    assert cli(["migrate", str(folder)]) == 0  # a second time: nothing to do


def test_commits_do_not_reread_the_table(config: BuildConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each commit brings the kept table up to date from the new log entries only: the number of
    full opens (each reading the last checkpoint, which lists every file) does not grow with
    the commits."""
    from retrieval.store import table as delta_table

    opens: list[str] = []

    class Counted(DeltaTable):
        def __init__(self, uri: str, *args: object, **kwargs: object) -> None:
            opens.append(uri)
            super().__init__(uri, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta_table, "DeltaTable", Counted)
    build_index(BuildConfig(**{**vars(config), "image_shard_rows": 1, "caption_shard_rows": 1}))
    commits = len(list((config.out / "images" / "_delta_log").glob("*.json")))
    assert commits > len(GOOD)  # one commit per image, and the plan's
    assert opens.count(str(config.out / "images")) <= 3, opens


def test_a_table_left_with_a_stale_description_is_described_again(config: BuildConfig) -> None:
    """As a promotion stopped before it described its tables leaves them: the next build
    describes them (a commit of its own) and then commits its rows after it."""
    build_index(config)
    table = DeltaTable(str(config.out / "images"))
    table.alter.set_table_description(json.dumps({"fingerprint": "an older model"}))
    assert not verify_index(config.out).ok
    assert config.images is not None
    shutil.copy(config.images / "clipart" / "flag.png", config.images / "one-more.png")
    report = build_index(config)
    assert report.collections["images"].added == 1
    assert verify_index(config.out).ok


def test_a_second_rebuild_with_the_same_model_is_promoted_too(
    config: BuildConfig, tmp_path: Path, towers: tuple[Path, Path]
) -> None:
    build_index(config)
    torch.manual_seed(3)
    other = seed_checkpoint(MultiModalEncoder(*towers, embed_dim=16), tmp_path / "other.pt")
    rebuild = BuildConfig(**{**vars(config), "model": ModelSpec(other, *towers), "rebuild": True})
    build_index(rebuild)
    assert config.images is not None
    (config.images / "pic.webp").unlink()
    shutil.copy(config.images / "clipart" / "flag.png", config.images / "new-flag.png")
    build_index(rebuild)
    paths = set(live(config.out, "images").column("path").to_pylist())
    assert "pic.webp" not in paths and "new-flag.png" in paths
    with Retriever.open(config.out, device="cpu") as r:
        assert len(r.search_text("a flag", k=100)) == len(paths)
    assert not (config.out / "_rebuild").exists()


def test_vacuum_keeps_the_version_an_index_covered_until_lately(config: BuildConfig) -> None:
    """A version stops being published when a newer index replaces it, maybe long after its files
    were removed from the table: readers that opened before still read them, so a vacuum keeps
    them for the retention counted from then."""
    build_index(config)
    reader = Retriever.open(config.out, device="cpu")  # pinned to the first index's version
    old = reader.store.state("images").version
    change_files(config)
    build_index(config)
    catalog = json.loads((config.out / "catalog.json").read_text())
    assert f"images@{old}" in catalog["retired_versions"]
    # As if the old index (its version, its FAISS file) was retired an hour after the removal.
    catalog["retired_versions"][f"images@{old}"] += 3600
    catalog["retired"] = {name: since + 3600 for name, since in catalog["retired"].items()}
    (config.out / "catalog.json").write_text(json.dumps(catalog))
    with Store.open(config.out, write=True) as store:
        store.vacuum(retain_hours=0)  # every removed file is past the retention, that version is not
    assert len(reader.search_text("a dog", k=100)) == len(GOOD)  # every file of its version is there
    reader.close()
