"""Inputs: the folder walk stays inside its root; caption files of every format, row by row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import BAD, GOOD, SKIPPED, make_corpus

from retrieval import InputError
from retrieval.ingest.sources import (
    CaptionRecord,
    ImageFile,
    Outcome,
    SidecarFile,
    read_caption_file,
    walk_images,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("walk")
    return make_corpus(base / "images", base / "outside")


def test_walk_finds_every_image_once_in_order(corpus: Path) -> None:
    walked = list(walk_images(corpus))
    files = [w.path for w in walked if isinstance(w, ImageFile)]
    # Depth-first, names sorted at every level.
    assert files == [
        "anim.gif",
        "broken/bomb.png",
        "broken/empty.png",
        "broken/html.jpg",
        "broken/truncated.jpg",
        "clipart/flag.png",
        "clipart/grey-alpha.png",
        "clipart/palette.png",
        "duplicate-of-leaf.jpeg",
        "nested/deeper/leaf.jpeg",
        "photos/big.jpg",
        "photos/cmyk.jpg",
        "photos/deep.png",
        "photos/rotated.jpg",
        "pic.bmp",
        "pic.webp",
        "scan.tiff",
    ]
    assert set(files) == set(GOOD) | set(BAD)
    skipped = {w.source: w.reason for w in walked if isinstance(w, Outcome)}
    assert set(skipped) == SKIPPED
    assert skipped["links/outside.jpg"] == "symlink points outside the root"
    assert skipped["fifo.jpg"] == "not a regular file"
    assert "cycle" in skipped["links/loop"]
    assert list(walk_images(corpus)) == walked  # deterministic


def test_sidecars_pair_with_their_image(corpus: Path) -> None:
    sidecars = {s.path: s.image for s in walk_images(corpus) if isinstance(s, SidecarFile)}
    assert sidecars == {"clipart/flag.txt": "clipart/flag.png", "pic.txt": "pic.bmp", "scan.txt": "scan.tiff"}


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        list(walk_images(tmp_path / "nope"))


def records(path: Path) -> tuple[list[CaptionRecord], list[Outcome]]:
    rows = list(read_caption_file(path))
    return [r for r in rows if isinstance(r, CaptionRecord)], [r for r in rows if isinstance(r, Outcome)]


def test_txt_one_caption_per_line_bom_stripped(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfa dog\n\n  a   cat  \nbad \xff byte\n")
    good, bad = records(path)
    assert [(r.row, r.text) for r in good] == [(0, "a dog"), (2, "a cat")]
    assert {(o.source.rsplit("#", 1)[1], o.status) for o in bad} == {("1", "skipped"), ("3", "failed")}


def test_csv_keeps_other_columns_as_metadata(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text('image,caption,lang,score\na.jpg,"a dog, running",en,0.9\nb.jpg,,fr,0.1\n')
    good, bad = records(path)
    assert len(good) == 1 and good[0].image == "a.jpg" and good[0].text == "a dog, running"
    assert good[0].metadata == {"lang": "en", "score": "0.9"}
    assert bad[0].reason == "empty caption"


def test_tsv_jsonl_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "c.tsv").write_text("text\tsource\nhello world\tweb\n")
    assert records(tmp_path / "c.tsv")[0][0].metadata == {"source": "web"}

    (tmp_path / "c.jsonl").write_text('{"caption": "one", "n": 1}\nnot json\n[1, 2]\n\n{"caption": "two"}\n')
    good, bad = records(tmp_path / "c.jsonl")
    assert [r.text for r in good] == ["one", "two"] and good[0].metadata == {"n": 1}
    assert [o.status for o in bad] == ["failed", "failed"]
    assert "invalid JSON" in bad[0].reason

    pq.write_table(pa.table({"caption": ["x", None, "y"], "tag": [1, 2, 3]}), tmp_path / "c.parquet")
    good, bad = records(tmp_path / "c.parquet")
    assert [(r.text, r.metadata["tag"]) for r in good] == [("x", 1), ("y", 3)]
    assert len(bad) == 1


def test_long_caption_is_kept_whole_for_the_tokenizer_to_cut(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text(" ".join(["word"] * 5000) + "\n")
    good, _ = records(path)
    assert len(good[0].text.split()) == 5000


def test_table_without_text_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("image,label\na.jpg,dog\n")
    with pytest.raises(InputError, match="no 'caption' or 'text' column"):
        list(read_caption_file(path))


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "c.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(InputError, match="unsupported caption format"):
        list(read_caption_file(path))


def test_metadata_values_survive_json(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"caption": "x", "tags": ["a", "b"], "nested": {"k": 1}}) + "\n")
    assert records(path)[0][0].metadata == {"tags": ["a", "b"], "nested": {"k": 1}}


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_caption_files_are_read_as_a_stream(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never the whole file at once; line endings, a BOM and bad bytes as a whole-file read gave."""
    captions = ["a dog", "a cat\u2028on a mat", "caf\xe9", "the end"]
    if suffix == ".txt":
        body = "\ufeffa dog\r\na cat\u2028on a mat\rcaf\xe9\nthe end".encode()
        expected = ["a dog", "a cat", "on a mat", "caf\xe9", "the end"]
    elif suffix == ".csv":
        body = ("\ufeffcaption\r\n" + "\r\n".join(f'"{c}"' for c in captions) + "\r\n").encode()
        expected = [c.replace("\u2028", " ") for c in captions]  # whitespace normalized, as before
    else:
        body = "\n".join(json.dumps({"caption": c}) for c in captions).encode()
        expected = [c.replace("\u2028", " ") for c in captions]
    path = tmp_path / f"captions{suffix}"
    path.write_bytes(body + b"\n" + (b"\xff\xfe broken" if suffix == ".txt" else b""))

    def whole(self: Path) -> bytes:
        raise AssertionError(f"{self} was read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)
    records = list(read_caption_file(path))
    texts = [r.text for r in records if not isinstance(r, Outcome)]
    assert texts == expected
    if suffix == ".txt":
        assert [o.reason for o in records if isinstance(o, Outcome)] == ["caption is not valid UTF-8"]
