"""The shipped demo corpus is whole: every row has its image, the split is clean, the size is small."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data"


def rows(name: str) -> list[dict[str, str]]:
    with (DATA / name).open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_every_row_has_its_image_and_category() -> None:
    everything = rows("captions.csv")
    assert 1000 <= len({r["image"] for r in everything}) <= 2000
    assert len({(r["image"], r["caption"]) for r in everything}) == len(everything)
    for row in everything:
        path = DATA / row["image"]
        assert path.is_file(), row["image"]
        assert path.parent.name == row["category"].replace(" ", "_")
        assert row["caption"].strip()
    assert len(Counter(r["category"] for r in everything)) == 16


def test_the_split_is_disjoint_and_covers_every_category() -> None:
    everything = {r["image"]: r for r in rows("captions.csv")}  # an image's rows share a category
    train = {r["image"] for r in rows("train.csv")}
    heldout = {r["image"] for r in rows("heldout.csv")}
    assert not train & heldout
    assert train | heldout == set(everything)
    categories = Counter(everything[i]["category"] for i in heldout)
    assert set(categories) == {r["category"] for r in everything.values()}
    assert 0.1 <= len(heldout) / len(everything) <= 0.2


def test_training_pairs_are_the_fullest_caption_and_the_category() -> None:
    captions: dict[str, list[str]] = {}
    for r in rows("captions.csv"):
        captions.setdefault(r["image"], []).append(r["caption"])
    train: dict[str, list[dict[str, str]]] = {}
    for r in rows("train.csv"):
        train.setdefault(r["image"], []).append(r)
    for image, pair in train.items():
        fullest, category = (r["caption"] for r in pair)
        assert fullest == max(captions[image], key=len)
        assert category in (f"a {pair[0]['category']}", f"an {pair[0]['category']}")


def test_images_are_small_and_the_corpus_fits_in_git() -> None:
    files = sorted((DATA / "images").rglob("*.png"))
    assert sum(f.stat().st_size for f in files) < 20 * 1024 * 1024
    for path in files[::50]:
        with Image.open(path) as image:
            assert max(image.size) <= 128
