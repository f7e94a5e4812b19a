"""What a user types in the first hour, through the real console scripts: sidecar captions, a
second image folder, touched files, odd queries, paths in filters and results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stores import canonical, catalog_of, committed, live, model_flags

from retrieval import InputError, Retriever
from retrieval.errors import TruncationWarning
from retrieval.store.folder import Store

BIN = Path(sys.executable).parent


def cli(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def pictures(folder: Path, names: list[str], seed: int = 0) -> Path:
    """Small random PNGs at ``folder / name`` (sub-folders made as needed)."""
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def model(checkpoint: Path, towers: tuple[Path, Path]) -> list[str]:
    return [*model_flags(checkpoint, *towers), "--device", "cpu", "--workers", "1"]


def build(images: Path | None, out: Path, model: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    args = [str(images)] if images is not None else []
    return cli("index", "build", *args, "--out", str(out), *model, *extra)


def report(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["collections"]


# -- sidecars ------------------------------------------------------------------------------------


def test_a_sidecar_holds_one_caption_per_line(tmp_path: Path, model: list[str]) -> None:
    images = pictures(tmp_path / "images", ["cat.png", "dog.png"])
    (images / "cat.txt").write_text("a cat on a chair\n\n  un chat   sur une chaise \n" + "walking " * 200)
    (images / "dog.txt").write_text("a dog\n")
    out = tmp_path / "index"

    result = build(images, out, model)
    assert result.returncode == 0, result.stderr
    # Four captions; the 200-word line is cut at the tiny tower's 64 positions and counted.
    assert "captions: 4 indexed (4 new" in result.stdout
    assert "1 cut to the tokenizer's limit" in result.stdout
    rows = live(out, "captions")
    assert sorted(zip(rows.column("source").to_pylist(), rows.column("row").to_pylist(), strict=True)) == [
        ("cat.txt", 0),
        ("cat.txt", 2),
        ("cat.txt", 3),
        ("dog.txt", 0),
    ]
    texts = dict(zip(rows.column("text").to_pylist(), rows.column("image").to_pylist(), strict=True))
    assert texts["a cat on a chair"] == texts["un chat sur une chaise"] == "cat.png"
    assert texts["a dog"] == "dog.png"

    # Editing one line re-encodes that line only; the other rows keep their ids.
    ids = dict(zip(rows.column("text").to_pylist(), rows.column("id").to_pylist(), strict=True))
    (images / "cat.txt").write_text("a cat on a chair\n\nune chatte\n" + "walking " * 200)
    captions = report(build(images, out, model, "--json"))["captions"]
    assert (captions["encoded"], captions["reused"], captions["deleted"], captions["indexed"]) == (1, 0, 1, 4)
    after = dict(
        zip(
            live(out, "captions").column("text").to_pylist(),
            live(out, "captions").column("id").to_pylist(),
            strict=True,
        )
    )
    assert after["a cat on a chair"] == ids["a cat on a chair"]
    assert after["a dog"] == ids["a dog"]
    assert "un chat sur une chaise" not in after and "une chatte" in after


# -- another image folder ------------------------------------------------------------------------


def test_another_image_folder_is_refused_unless_replace_root(tmp_path: Path, model: list[str]) -> None:
    first = pictures(tmp_path / "images", ["a.png", "b.png", "c.png"], seed=1)
    other = pictures(tmp_path / "other", ["x.png"], seed=2)
    (other / "b.png").write_bytes((first / "b.png").read_bytes())  # one file in common
    out = tmp_path / "index"
    assert report(build(first, out, model, "--json"))["images"]["indexed"] == 3
    state = committed(out)

    refused = build(other, out, model)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1
    assert str(first.resolve()) in refused.stderr and "--replace-root" in refused.stderr
    assert committed(out) == state  # nothing changed

    images = report(build(other, out, model, "--replace-root", "--json"))["images"]
    assert (images["indexed"], images["encoded"], images["reused"], images["deleted"]) == (2, 1, 1, 3)
    assert sorted(live(out, "images").column("path").to_pylist()) == ["b.png", "x.png"]

    # Back to the first folder: every vector is still there (deleted rows stay until a rebuild).
    back = report(build(first, out, model, "--replace-root", "--json"))["images"]
    assert (back["indexed"], back["encoded"], back["reused"]) == (3, 0, 3)


def test_a_touched_file_keeps_its_row_and_id(tmp_path: Path, model: list[str]) -> None:
    images = pictures(tmp_path / "images", [f"{i}.png" for i in range(6)])
    out = tmp_path / "index"
    build(images, out, model)
    before = live(out, "images")
    for path in images.iterdir():
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    (images / "5.png").write_bytes((images / "0.png").read_bytes())  # other content

    result = build(images, out, model)
    assert result.returncode == 0, result.stderr
    assert "5 touched, kept" in result.stdout and "1 new: 0 encoded, 1 reused; 1 removed" in result.stdout
    after = live(out, "images")
    old = dict(zip(before.column("path").to_pylist(), before.column("id").to_pylist(), strict=True))
    new = dict(zip(after.column("path").to_pylist(), after.column("id").to_pylist(), strict=True))
    assert all(new[f"{i}.png"] == old[f"{i}.png"] for i in range(5))
    assert new["5.png"] not in old.values()
    mtimes = dict(zip(after.column("path").to_pylist(), after.column("mtime_ns").to_pylist(), strict=True))
    assert mtimes["1.png"] == (images / "1.png").stat().st_mtime_ns  # the new stats are recorded

    again = build(images, out, model, "--json")
    assert report(again)["images"]["added"] == 0 and report(again)["images"]["refreshed"] == 0


# -- stopping a build ----------------------------------------------------------------------------

SLOW_INDEX = """
import sys, time
import retrieval.ingest.reader as reader
decode = reader.decode_file
reader.decode_file = lambda *a, **k: (time.sleep(0.05), decode(*a, **k))[1]
sys.argv[0] = "index"
from retrieval.cli import exit_promptly, index_app
exit_promptly(index_app)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_build_says_what_it_committed(
    tmp_path: Path, model: list[str], signum: signal.Signals
) -> None:
    images = pictures(tmp_path / "images", [f"{i:02d}.png" for i in range(60)])
    out = tmp_path / "index"
    args = [str(images), "--out", str(out), *model, "--shard-rows", "4"]
    # A slowed decoder, and the signal to the whole process group, as a terminal's Ctrl-C does.
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_INDEX, "build", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not _has_shards(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: {out}: images ") and "committed, not yet searchable" in last
    assert f"rerun `index build {images}" in last and last.endswith("to finish")
    with Store.open(out) as store:
        done = store.committed.collections["images"].counts["indexed"]
    assert 0 < done < 60
    assert f"images {done} indexed ({done} new this run)" in last
    if signum == signal.SIGTERM:
        return  # the same story from here on

    # index info and search tell the same story.
    info = cli("index", "info", str(out))
    assert f"images    {done} indexed" in info.stdout
    assert "committed, not yet searchable: rerun `index build` to finish" in info.stdout
    search = cli("search", "text", "a dog", "--index", str(out))
    assert search.returncode == 2
    assert search.stderr.strip() == (
        f"error: {out}: {done} images committed, not yet searchable: rerun `index build` to finish"
    )

    # The rerun finishes with the rows and ids of a build that was never stopped.
    finished = report(build(images, out, model, "--shard-rows", "4", "--json"))["images"]
    assert (finished["indexed"], finished["added"]) == (60, 60 - done)
    clean = tmp_path / "clean"
    report(build(images, clean, model, "--shard-rows", "4", "--json"))
    assert canonical(out) == canonical(clean)
    assert cli("search", "text", "a dog", "--index", str(out)).returncode == 0


def _has_shards(out: Path) -> bool:
    """Whether a data file of ``out``'s images is committed (its table's log has an entry adding one)."""
    log = out / "images" / "_delta_log"
    return log.is_dir() and any('"add"' in p.read_text() for p in log.glob("*.json"))


def test_the_caption_bar_moves_during_the_caption_phase(tmp_path: Path, model: list[str]) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"a red car on the street number {i}\n" for i in range(600)))
    env = os.environ | {"RETRIEVAL_PROGRESS": "1", "TQDM_MININTERVAL": "0"}  # every update drawn
    result = subprocess.run(
        [str(BIN / "index"), "build", "--captions", str(captions), "--out", str(tmp_path / "i"), *model],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    states = [part for part in result.stderr.replace("\r", "\n").splitlines() if "encoding captions" in part]
    shown = {int(s.split("%")[0].split()[-1]) for s in states if "%" in s}
    # 600 captions in one shard of 16,384: the bar is drawn between 0 and 100%, not only at the ends.
    assert {0, 100} <= shown and shown - {0, 100}, states


# -- queries, paths and fields -------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, towers: tuple[Path, Path]) -> Path:
    """An index of a few images in two folders, and captions whose file has a ``source`` column."""
    root = tmp_path_factory.mktemp("catalog")
    images = pictures(root / "images", ["flag/a.png", "flag/b.png", "animal/c.png", "animal/d.png"])
    captions = root / "captions.csv"
    captions.write_text("caption,source,lang\na red flag,museum,en\na dog,street,en\nun chien,street,fr\n")
    out = root / "catalog"
    flags = [*model_flags(checkpoint, *towers), "--device", "cpu", "--workers", "1"]
    assert build(images, out, flags, "--captions", str(captions)).returncode == 0
    return out


def test_empty_and_overlong_queries(catalog: Path) -> None:
    result = cli("search", "text", "   ", "--index", str(catalog))
    assert result.returncode == 2
    assert result.stderr == "error: empty query: give some words to search for\n"
    with Retriever.open(catalog, device="cpu") as retriever:
        for query in ("", "\t\n"):
            with pytest.raises(InputError, match="empty query"):
                retriever.search_text(query)
        with pytest.raises(InputError, match=r"empty query \(query 1\)"):
            retriever.search_texts(["a dog", " "])
        with pytest.warns(TruncationWarning, match="longer than the model's 64 tokens"):
            assert len(retriever.search_text("dog " * 500, k=2)) == 2
    long = cli("search", "text", " ".join(["dog"] * 10_000), "--index", str(catalog), "--json")
    assert long.returncode == 0, long.stderr
    assert len(json.loads(long.stdout)) == 4
    assert long.stderr.count("\n") == 1 and long.stderr.startswith("warning: query 'dog dog")
    assert "(10,000 words) is longer than the model's 64 tokens" in long.stderr


def test_where_path_takes_the_printed_path(catalog: Path) -> None:
    root = catalog.parent
    table = cli("search", "text", "a flag", "--index", str(catalog), cwd=root)
    printed = sorted(line.split()[-1] for line in table.stdout.splitlines())
    assert printed == ["images/animal/c.png", "images/animal/d.png", "images/flag/a.png", "images/flag/b.png"]
    # The printed form, pasted back, selects what it names.
    pasted = cli(
        "search",
        "text",
        "a flag",
        "--index",
        str(catalog),
        "--where",
        "path~images/flag/*",
        "--json",
        cwd=root,
    )
    assert sorted(Path(h["path"]).name for h in json.loads(pasted.stdout)) == ["a.png", "b.png"]
    absolute = str(root / "images/flag/a.png")
    exact = cli("search", "text", "a flag", "--index", str(catalog), "--where", f"path={absolute}", "--json")
    assert [h["path"] for h in json.loads(exact.stdout)] == [absolute]
    with Retriever.open(catalog) as retriever:
        for pattern in ("flag/*", f"{root}/images/flag/*", "*/flag/*"):
            ids = retriever.filter_ids("images", [("path", "~", pattern)])
            assert len(ids) == 2, pattern


def test_a_caption_column_never_hides_a_built_in_field(catalog: Path) -> None:
    result = cli("search", "text", "a dog", "--index", str(catalog), "--target", "captions", "--json")
    assert result.returncode == 0, result.stderr
    hits = {h["text"]: h for h in json.loads(result.stdout)}
    assert hits["a dog"]["source"] == str((catalog.parent / "captions.csv").resolve())  # its file
    assert hits["a dog"]["meta.source"] == "street" and hits["a dog"]["lang"] == "en"
    where = ["--where", "meta.source=street", "--target", "captions", "--json"]
    street = cli("search", "text", "a dog", "--index", str(catalog), *where)
    assert sorted(h["text"] for h in json.loads(street.stdout)) == ["a dog", "un chien"]


# -- the index's model ---------------------------------------------------------------------------


def test_commands_take_the_model_from_the_index_and_follow_it_when_it_moves(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]
) -> None:
    import shutil

    home = tmp_path / "models"
    shutil.copy(checkpoint, tmp_path / "model.pt")
    shutil.copytree(towers[0], home / "text")
    shutil.copytree(towers[1], home / "vision")
    flags = model_flags(tmp_path / "model.pt", home / "text", home / "vision")
    images = pictures(tmp_path / "images", ["a.png", "b.png"])
    out = tmp_path / "index"
    assert cli("index", "build", str(images), "--out", str(out), *flags, "--workers", "1").returncode == 0

    # No model flags needed: the index names its model.
    info = cli("retrieval", "model", "info", "--index", str(out), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["global_step"] == 10000
    label = cli("retrieval", "classify", str(images / "a.png"), "--labels", "dog,cat", "--index", str(out))
    assert label.returncode == 0 and "dog" in label.stdout
    embedded = cli("retrieval", "embed", "text", "a dog", "--index", str(out), "--json")
    assert embedded.returncode == 0 and len(json.loads(embedded.stdout)[0]["embedding"]) == 16

    # The checkpoint moves: the error names it and the flag that fixes it.
    (tmp_path / "moved").mkdir()
    (tmp_path / "model.pt").rename(tmp_path / "moved" / "model.pt")
    lost = cli("search", "text", "a dog", "--index", str(out))
    assert lost.returncode == 2 and lost.stderr.count("\n") == 1
    assert str(tmp_path / "model.pt") in lost.stderr and "pass --checkpoint" in lost.stderr
    # Another checkpoint is refused; the moved one is accepted once and then remembered.
    other = cli(
        "search",
        "text",
        "a dog",
        "--index",
        str(out),
        "--checkpoint",
        str(_other_checkpoint(tmp_path, towers)),
    )
    assert other.returncode == 2 and "another model" in other.stderr
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,caption\nimages/a.png,a dog\nimages/b.png,a cat\n")
    moved_flag = ["--checkpoint", str(tmp_path / "moved/model.pt")]
    evaluated = cli("retrieval", "eval", "--index", str(out), "--pairs", str(pairs), *moved_flag)
    assert evaluated.returncode == 0, evaluated.stderr  # eval --index takes the flags too
    found = cli(
        "search", "text", "a dog", "--index", str(out), "--checkpoint", str(tmp_path / "moved/model.pt")
    )
    assert found.returncode == 0, found.stderr
    assert cli("search", "text", "a dog", "--index", str(out)).returncode == 0

    # Moving the project as a whole keeps working: the paths are recorded relative to the index.
    shutil.move(str(tmp_path), str(tmp_path.parent / (tmp_path.name + "-elsewhere")))
    moved = tmp_path.parent / (tmp_path.name + "-elsewhere")
    try:
        again = cli("search", "text", "a dog", "--index", str(moved / "index"))
        assert again.returncode == 0, again.stderr
        assert catalog_of(moved / "index")["model"]["checkpoint"] == "../moved/model.pt"
    finally:
        shutil.move(str(moved), str(tmp_path))


def _other_checkpoint(tmp_path: Path, towers: tuple[Path, Path]) -> Path:
    import torch
    from conftest import seed_checkpoint

    from retrieval import MultiModalEncoder

    torch.manual_seed(123)
    return seed_checkpoint(MultiModalEncoder(*towers, embed_dim=16), tmp_path / "other.pt")


def test_an_unchanged_rerun_with_new_model_paths_records_them(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]
) -> None:
    import shutil

    images = pictures(tmp_path / "images", ["a.png"])
    out = tmp_path / "index"
    common = [str(images), "--out", str(out), "--workers", "1"]
    assert cli("index", "build", *common, *model_flags(checkpoint, *towers)).returncode == 0
    shutil.copy(checkpoint, tmp_path / "copy.pt")
    result = cli("index", "build", *common, *model_flags(tmp_path / "copy.pt", *towers))
    assert result.returncode == 0 and "0 new" in result.stdout
    assert catalog_of(out)["model"]["checkpoint"] == "../copy.pt"


# -- messages ------------------------------------------------------------------------------------


def test_a_text_file_as_checkpoint_gets_no_advice_to_unpickle(
    tmp_path: Path, towers: tuple[Path, Path]
) -> None:
    cases = (
        ("notes.pt", b"some notes, not a checkpoint\n", "(it looks like a text file)"),
        ("noise.pt", bytes(range(256)) * 4, "(truncated, damaged or another format)"),
    )
    for name, data, why in cases:
        (tmp_path / name).write_bytes(data)
        result = cli("retrieval", "model", "info", *model_flags(tmp_path / name, *towers))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"{tmp_path / name} is not a readable PyTorch checkpoint {why}" in result.stderr
        assert "weights_only" not in result.stderr


def test_a_folder_without_images_is_a_warning(tmp_path: Path, model: list[str]) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("no pictures here")
    result = build(tmp_path / "empty", tmp_path / "index", model)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"warning: no images in {tmp_path / 'empty'} (or its sub-folders)")


def test_caption_results_draw_as_a_text_sheet_with_labels(catalog: Path, tmp_path: Path) -> None:
    from PIL import Image as PILImage

    sheet = tmp_path / "captions.png"
    args = ["--index", str(catalog), "--target", "captions", "--grid", str(sheet)]
    result = cli("search", "text", "a dog", *args)
    assert result.returncode == 0, result.stderr
    assert f"contact sheet: {sheet}" in result.stdout
    assert PILImage.open(sheet).size == (3 * 192, 18 + 192 + 30)


def test_tiles_are_labelled_with_rank_score_and_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import retrieval.search.sheet
    from retrieval.cli.search import _draw
    from retrieval.search.hits import Hit

    drawn: list = []
    monkeypatch.setattr(
        retrieval.search.sheet, "contact_sheet", lambda tiles, out, title: drawn.extend(tiles)
    )
    hits = [
        Hit(1, 7, 0.5, "images", path="/data/flag/a.png"),
        Hit(2, 9, 0.25, "captions", text="a dog", fields={"image": "animal/d.png"}),
    ]
    _draw(hits, tmp_path / "x.png", "t")
    assert [(t.label, t.image, t.text) for t in drawn] == [
        ("#1 0.500 a.png", "/data/flag/a.png", None),
        ("#2 0.250 d.png", None, "a dog"),
    ]


def test_ivfpq_on_a_small_collection_is_sized_and_quiet(tmp_path: Path, model: list[str]) -> None:
    captions = tmp_path / "c.txt"
    captions.write_text("".join(f"a dog number {i}\n" for i in range(300)))
    result = build(None, tmp_path / "i", model, "--captions", str(captions), "--index-type", "ivfpq")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr and result.stderr == ""
    assert (
        "captions index flat (ivfpq needs at least 624 vectors to train its quantizers, 300 here)"
        in result.stdout
    )
    bigger = tmp_path / "d.txt"
    bigger.write_text("".join(f"a red car {i} on the street with a dog\n" for i in range(2000)))
    result = build(None, tmp_path / "j", model, "--captions", str(bigger), "--index-type", "ivfpq")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "captions index ivfpq" in result.stdout


def test_a_rerun_needs_no_model_flags(tmp_path: Path, model: list[str]) -> None:
    images = pictures(tmp_path / "images", ["a.png"])
    out = tmp_path / "index"
    assert build(images, out, model).returncode == 0
    pictures(images, ["b.png"], seed=3)
    again = cli("index", "build", str(images), "--out", str(out), "--workers", "1", "--json")
    assert report(again)["images"]["added"] == 1  # the index's own model, found from its record


def test_where_path_takes_dot_slash_and_symlinked_paths(catalog: Path) -> None:
    root = catalog.parent
    (root / "link").symlink_to(root / "images", target_is_directory=True)
    with Retriever.open(catalog) as retriever:
        for value in ("./images/flag/a.png", str(root / "link" / "flag" / "a.png")):
            old = os.getcwd()
            os.chdir(root)
            try:
                ids = retriever.filter_ids("images", [("path", "=", value)])
            finally:
                os.chdir(old)
            assert len(ids) == 1, value


def test_a_read_only_index_is_searched_without_remembering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from retrieval.model.spec import ModelSpec
    from retrieval.store import location

    def read_only(folder: Path, write: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(location.Store, "open", read_only)
    assert location.remember_model(tmp_path, ModelSpec(), None) is False
