"""Composed queries, folded near-duplicates and calibrated scores, each against a numpy oracle."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stores import seeded_store

from retrieval import BuildConfig, Retriever, build_index
from retrieval.ann.calibration import TAIL, ScoreNull, score_null
from retrieval.errors import ConfigError, InputError
from retrieval.search.compose import Term, combine, fold_near, split_weight
from retrieval.store.folder import Store

BIN = Path(sys.executable).parent


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_parts_are_read_as_rclip_writes_them(tmp_path: Path) -> None:
    picture = tmp_path / "pool.jpg"
    picture.write_bytes(b"not read here")
    assert split_weight("2:a dog") == (2.0, "a dog")
    assert split_weight("0.5: a dog") == (0.5, "a dog")
    assert split_weight("note: a dog") == (1.0, "note: a dog")  # only a number before the colon weighs
    with pytest.raises(InputError, match="positive"):
        Term.parse("-1:a dog")
    assert Term.parse("2:golden retriever") == Term(text="golden retriever", weight=2.0)
    assert Term.parse(str(picture)) == Term(image=picture)
    assert Term.parse(f"1.5:{picture}") == Term(image=picture, weight=1.5)
    with pytest.raises(InputError, match="positive"):
        Term.parse("0:a dog")
    with pytest.raises(InputError, match="empty"):
        Term.parse("3:  ")
    with pytest.raises(InputError, match="one text"):
        Term(text="a", vector=np.zeros(4, np.float32))


def test_combine_is_the_normalised_weighted_sum() -> None:
    rng = np.random.default_rng(0)
    a, b, c = unit(rng.normal(size=(3, 16)))
    expected = 1 * a + 2 * b - 0.5 * c
    np.testing.assert_allclose(
        combine([(1, a), (2, b)], [(0.5, c)]), expected / np.linalg.norm(expected), atol=1e-6
    )
    with pytest.raises(InputError, match="cancel"):
        combine([(1, a)], [(1, a)])
    with pytest.raises(InputError, match="at least one"):
        combine([], [(1, a)])


def test_fold_near_keeps_the_best_of_each_near_set() -> None:
    rng = np.random.default_rng(1)
    base = unit(rng.normal(size=(6, 32)))
    ranked = unit(np.concatenate([base, base[[0, 2, 0]] + 0.05 * rng.normal(size=(3, 32))]))
    ranked = ranked[rng.permutation(len(ranked))]
    groups = fold_near(ranked, 0.9)
    # Oracle: in rank order, a vector joins the first kept one within 0.9, or is kept.
    kept: list[int] = []
    expected: dict[int, list[int]] = {}
    for n, v in enumerate(ranked):
        near = [m for m in kept if ranked[m] @ v >= 0.9]
        if near:
            expected[near[0]].append(n)
        else:
            kept.append(n)
            expected[n] = [n]
    assert groups == [expected[m] for m in kept]
    assert len(groups) == 6


@pytest.fixture(scope="module")
def near(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """600 vectors, 40 of them with two or three near copies each."""
    rng = np.random.default_rng(2)
    vectors = unit(rng.normal(size=(600, 24)))
    for base in range(0, 400, 10):
        for j in range(1, 2 + base % 3):
            vectors[base + j] = unit(vectors[base] + 0.08 * rng.normal(size=24))
    return seeded_store(tmp_path_factory.mktemp("near") / "index", vectors, shard_rows=150), vectors


def test_dedup_folds_near_hits_and_still_returns_k(near: tuple[Path, np.ndarray]) -> None:
    folder, vectors = near
    query = unit(vectors[0] + vectors[20] + vectors[30])
    with Retriever.open(folder) as retriever:
        hits = retriever.search_vector(query, 12, dedup=0.9)
        plain = retriever.search_vector(query, 12)
    order = np.argsort(-(vectors @ query), kind="stable")
    groups = fold_near(vectors[order], 0.9)[:12]  # the whole ranking, folded: the oracle
    assert [h.id for h in hits] == [int(order[g[0]]) for g in groups]
    last = groups[-1][0]  # folded hits are listed up to the last one returned
    for hit, group in zip(hits, groups, strict=True):
        assert hit.fields.get("near_duplicates", []) == [int(order[m]) for m in group[1:] if m < last]
    assert [h.rank for h in hits] == list(range(1, 13))
    assert len(plain) == 12 and any(h.fields.get("near_duplicates") for h in hits)
    kept = vectors[[h.id for h in hits]]
    assert (kept @ kept.T - 2 * np.eye(12)).max() < 0.9  # no two results within T of each other


def test_confidence_is_the_percentile_among_random_pairs(near: tuple[Path, np.ndarray]) -> None:
    folder, vectors = near
    with Retriever.open(folder) as retriever:
        null = retriever.calibration("images", "images")
        assert null is not None and retriever.calibration("images", "captions") is None  # no captions
        hits = retriever.search_vector(vectors[5], 20, query_from="images")
        sure = retriever.search_vector(vectors[5], 20, query_from="images", min_confidence=0.999)
        elsewhere = unit(np.random.default_rng(9).normal(size=24))  # like no stored vector
        none = retriever.search_vector(elsewhere, 20, query_from="images", min_confidence=0.9999)
        with pytest.raises(ConfigError, match="a bare vector"):
            retriever.search_vector(vectors[5], 5, min_confidence=0.5)  # a bare vector: of no known kind
        with pytest.raises(ConfigError, match="no captions to measure text queries"):
            retriever.search_vector(vectors[5], 5, min_confidence=0.5, query_from="captions")
    # Against every pair of the collection (the store has 600: the null's sample is all of them).
    pairs = (vectors @ vectors.T)[~np.eye(600, dtype=bool)]
    for hit in hits:
        empirical = float((pairs < hit.score).mean())
        assert hit.confidence == pytest.approx(null.percentile(hit.score))
        if empirical < 1 - TAIL:  # inside the body: the stored quantiles give it within a step
            assert abs(hit.confidence - empirical) < 0.011
    assert [h.id for h in sure] == [h.id for h in hits if h.confidence >= 0.999]
    assert none == []


@pytest.mark.parametrize("dim", [16, 64])
def test_the_tail_is_fitted_beyond_the_sampled_pairs(dim: int) -> None:
    rng = np.random.default_rng(3)
    sample = unit(rng.normal(size=(4_096, dim)))  # the engine's sample size
    null = score_null(sample, sample, ("images", "images"), same=True)
    fresh = unit(rng.normal(size=(8_000, dim)))
    pairs = (fresh[:4_000] @ fresh[4_000:].T).ravel()  # 16M new pairs
    for rate in (1e-2, 1e-4, 1e-5):
        t = null.threshold(rate)
        assert null.survival(t) == pytest.approx(rate, rel=1e-6)
        # Two decades past the top 0.1%: a few times too many at worst, or somewhat too few.
        assert rate / 20 <= (pairs > t).mean() <= 4 * rate
    copy = ScoreNull.from_dict(null.to_dict())
    assert copy.threshold(1e-5) == pytest.approx(null.threshold(1e-5), abs=1e-5)


def test_duplicates_in_the_sample_do_not_raise_the_null() -> None:
    rng = np.random.default_rng(4)
    sample = unit(rng.normal(size=(2_000, 32)))
    copied = sample.copy()
    count = len(copied[1::6])
    copied[1::6] = unit(copied[0::6][:count] + 0.05 * rng.normal(size=(count, 32)))
    clean = score_null(sample, sample, ("images", "images"), same=True)
    dirty = score_null(copied, copied, ("images", "images"), same=True)
    # One item in six with a copy (cosine about 0.96): the copies' own pairs are left out, so
    # the threshold stays well under them (other items' copies do raise it a little: a false
    # partner's copy is a second false partner).
    assert dirty.at_bound == 0.0
    assert clean.threshold(1e-5) < dirty.threshold(1e-5) < clean.threshold(1e-5) + 0.1 < 0.9


def test_composed_searches_on_a_built_index(config: BuildConfig, tmp_path: Path) -> None:
    build_index(config)
    picture = config.images / "photos" / "big.jpg"
    with Retriever.open(config.out) as retriever:
        null = retriever.calibration("images", "captions")
        assert null is not None and retriever.calibration("captions", "images") is not None
        texts = retriever.encode_queries(["a dog", "the cat"])
        image = retriever.encode_images([picture])[0]
        hits = retriever.search_composed(["a dog", f"2:{picture}"], ["the cat"], k=4)
        rows = retriever.rows("images").ids
        stored = retriever.vectors(rows)
    query = unit(texts[0] + 2 * image - texts[1])
    order = np.argsort(-(stored @ query), kind="stable")[:4]
    assert [h.id for h in hits] == rows[order].tolist()
    np.testing.assert_allclose([h.score for h in hits], (stored @ query)[order], atol=1e-5)
    # Texts and an image: no random pairs are of its kind, so no confidence, and no floor.
    assert all(h.confidence is None for h in hits)
    with Retriever.open(config.out) as retriever:
        with pytest.raises(ConfigError, match="both texts and images"):
            retriever.search_composed(["a dog", f"2:{picture}"], k=3, min_confidence=0.5)
        texts_only = retriever.search_composed(["a dog", "2:the cat"], k=3)
        captions_null = retriever.calibration("images", "captions")
    assert captions_null is not None
    assert texts_only[0].confidence == pytest.approx(captions_null.percentile(texts_only[0].score))

    # The command line: the same query, and a floor no result reaches.
    flags = ["--index", str(config.out), "-k", "4", "--plus", f"2:{picture}", "--minus", "the cat"]
    shown = run(["search", "text", "a dog", *flags, "--json"])
    assert [h["id"] for h in json.loads(shown.stdout)] == [h.id for h in hits]
    words = ["--index", str(config.out), "-k", "4", "--plus", "2:the cat"]
    nothing = run(["search", "text", "a dog", *words, "--min-confidence", "1"])
    assert nothing.returncode == 0 and nothing.stdout.startswith("no good match: no result beats 100%")
    missing = run(["search", "text", "a dog", "--index", str(config.out), "--plus", "nowhere/pool.jpg"])
    assert missing.returncode == 2 and "no such image file" in missing.stderr
    table = run(["search", "text", "a dog", "--index", str(config.out), "-k", "3", "--dedup", "0.99"])
    assert table.returncode == 0 and "%" in table.stdout.splitlines()[0]  # confidence column
    wrong = run(["search", "text", "a dog", "--index", str(config.out), "--minus", "a dog"])
    assert wrong.returncode == 2 and "cancel out" in wrong.stderr


def test_an_index_built_before_calibration_gets_it_on_the_next_build(config: BuildConfig) -> None:
    build_index(config)
    older = {"images": None, "captions": {"captions": {"queries": "captions", "tail_scale": 0.1}}}
    with Store.open(config.out, write=True) as store:
        manifest = store.manifest
        assert manifest is not None
        stripped = {
            c: replace(s, index=replace(s.index, calibration=older[c]))
            for c, s in manifest.collections.items()
        }
        store.commit_catalog(replace(manifest, collections=stripped))
    with Retriever.open(config.out) as retriever:
        files = {c: retriever.store.state(c).index.file.file for c in ("images", "captions")}
        assert retriever.calibration("images", "captions") is None
        assert retriever.calibration("captions", "captions") is None  # of another format: not misread
        with pytest.raises(ConfigError, match="rerun `index build`"):
            retriever.search_text("a dog", 3, min_confidence=0.5)
        assert retriever.search_text("a dog", 3)[0].confidence is None
    build_index(config)
    with Retriever.open(config.out) as retriever:
        assert retriever.calibration("images", "captions") is not None
        assert retriever.calibration("captions", "captions") is not None
        assert {c: retriever.store.state(c).index.file.file for c in files} == files  # not rebuilt
        assert retriever.search_text("a dog", 3, min_confidence=0.0)


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "retrieval"), *args], capture_output=True, text=True, timeout=300)


def test_folding_reads_a_bounded_number_of_hits(near: tuple[Path, np.ndarray], monkeypatch) -> None:
    folder, vectors = near
    monkeypatch.setattr("retrieval.search.retriever.FOLD_FETCH", 50)
    with Retriever.open(folder) as retriever:
        asked: list[int] = []
        search = retriever.search_vectors

        def counted(query, k, *args):  # type: ignore[no-untyped-def]
            asked.append(k)
            return search(query, k, *args)

        monkeypatch.setattr(retriever, "search_vectors", counted)
        hits = retriever.search_vector(vectors[0], 5, dedup=-1.0)  # everything folds into one
    assert len(hits) == 1 and max(asked) == 320  # 64 x k, not the 600 rows: fewer than k come back
    assert len(hits[0].fields["near_duplicates"]) == 319  # every other hit fetched, folded into it


def test_text_confidence_on_an_index_without_captions(config: BuildConfig, tmp_path: Path) -> None:
    pictures = tmp_path / "pictures"  # no sidecar captions
    pictures.mkdir()
    rng = np.random.default_rng(5)
    for n in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(pictures / f"{n}.png")
    config = replace(config, images=pictures)
    build_index(replace(config, captions=()))
    with Retriever.open(config.out) as retriever:
        assert retriever.calibration("images", "images") is not None
        with pytest.raises(ConfigError, match="no captions to measure text queries on images"):
            retriever.search_text("a dog", 3, min_confidence=0.5)
    build_index(config)  # captions added: the image index, unchanged, is calibrated for text too
    with Retriever.open(config.out) as retriever:
        assert retriever.calibration("images", "captions") is not None
        assert retriever.search_text("a dog", 3, min_confidence=0.0)
