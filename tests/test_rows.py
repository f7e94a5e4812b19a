"""Rows for results: fetched from only the data files that hold them; ``--where`` as Arrow compute."""

from __future__ import annotations

import fnmatch

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from retrieval import Retriever
from retrieval.build.pipeline import BuildConfig, build_index
from retrieval.search import filters
from retrieval.store.folder import Store


def test_a_search_reads_only_the_files_of_its_hits(
    config: BuildConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_index(config)
    read: list[str] = []
    original = Store.read_table

    def spy(self: Store, ref, columns=None):  # type: ignore[no-untyped-def]
        read.append(ref.file)
        return original(self, ref, columns)

    with Retriever.open(config.out, device="cpu") as r:
        files = r.store.state("images").shards
        assert len(files) >= 3
        everything = r.rows("images").table
        monkeypatch.setattr(Store, "read_table", spy)
        hit = r.search_text("a dog", k=1)[0]
        assert len(read) == 1 and read[0] == next(f.file for f in files if f.first <= hit.id <= f.last)
        ids = everything.column("id").to_numpy()[::-1].copy()  # every file, in reverse order
        taken = r.source("images").take(ids)
        assert taken.column("id").to_pylist() == ids.tolist()
        assert taken.column("path").to_pylist() == everything.column("path").to_pylist()[::-1]
        assert r.size("images") == len(ids)


NAMES = ["a.png", "b.jpg", "abc", "a/b/c.png", "]x", "x[", "[ab]", "a.b", "A.PNG", "dir/x.jpeg", ""]
PATTERNS = ["*.png", "a?c", "[ab]*", "[!a]*", "*[]]*", "x[", "*.[pj]*g", "a/*/c.png", "*", "?", "a.b", "[]]x"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_glob_patterns_match_as_the_shell_does(pattern: str) -> None:
    column = pa.array(NAMES)
    ours = pc.match_substring_regex(column, filters._glob_regex(pattern)).to_pylist()
    assert ours == [fnmatch.fnmatchcase(n, pattern) for n in NAMES], pattern


def test_where_streams_one_file_at_a_time() -> None:
    files = [
        pa.table({"id": [0, 1], "path": ["a.png", "b.png"]}),
        pa.table({"id": [5, 7], "path": ["c.jpg", "d.png"]}),
    ]
    ids = filters.matching_ids("images", iter(files), [("path", "~", "*.png")], "/data/pics")
    np.testing.assert_array_equal(ids, [0, 1, 7])
    ids = filters.matching_ids("images", iter(files), [("path", "=", "/data/pics/c.jpg")], "/data/pics")
    np.testing.assert_array_equal(ids, [5])
    assert filters.needed_columns("captions", [("lang", "=", "fr"), ("text", "~", "a*")]) == [
        "id",
        "metadata",
        "text",
    ]
