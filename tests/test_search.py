"""FAISS indexes and search: exact search is the oracle for every index type and every path."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
from corpus import GOOD, make_corpus
from stores import model_flags

from retrieval import (
    BuildConfig,
    Encoder,
    IndexMismatchError,
    ModelSpec,
    Retriever,
    Store,
    StoreError,
    build_index,
)
from retrieval.ann.faiss_index import IndexConfig, build_collection_index, index_ids, load_index, recall_at
from retrieval.store.folder import new_manifest
from retrieval.store.manifest import CollectionState
from retrieval.vectors import embedding_array, embedding_matrix


def clustered(n: int, dim: int, seed: int, centers: int = 50) -> np.ndarray:
    """Unit vectors around a few dozen centres: the structure real embeddings have."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centers, dim))
    x = middle[rng.integers(0, centers, n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vector_store(folder: Path, vectors: np.ndarray, ids: np.ndarray) -> Store:
    """A store holding ``vectors`` as one images shard, written through the Store API."""
    store = Store.open(folder, write=True)
    fingerprint = {"dim": vectors.shape[1], "digest": "test"}
    manifest = store.commit_catalog(new_manifest({"fingerprint": fingerprint}))
    dim = vectors.shape[1]
    offsets = pa.array(np.arange(0, (len(vectors) + 1) * dim, dim, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, embedding_array(vectors).flatten())
    table = pa.table({"id": pa.array(ids, pa.int64()), "embedding": column})
    ref = store.write_table("images/shard-000000000000-v000000.parquet", table)
    state = CollectionState(next_id=int(ids.max()) + 1, counts={"indexed": len(ids)})
    state = store.commit_rows(store.table("images"), state, table.schema, {"digest": "test"}, [ref])
    store.manifest = replace(manifest, collections={"images": state})
    return store


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, np.ndarray, np.ndarray, np.ndarray]:
    vectors = clustered(60_000, 32, seed=1)
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 7  # ids are not positions
    queries = clustered(300, 32, seed=2)
    store = vector_store(tmp_path_factory.mktemp("vectors"), vectors, ids)
    return store, vectors, ids, queries


def exact(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfsq", "ivfpq", "auto"])
def test_every_index_type_reaches_the_target_recall(data: tuple, kind: str) -> None:
    store, vectors, ids, queries = data
    record = build_collection_index(
        store, "images", IndexConfig(kind=kind, target_recall=0.95), queries, "captions"
    )
    assert record is not None
    assert record.kind == ("ivf" if kind == "auto" else kind)  # 60k vectors: auto goes approximate
    assert record.rows == len(vectors)
    assert record.recall_at_10 >= 0.95
    # Measured again, independently of the tuner, against a plain numpy oracle.
    index = load_index(store, record)
    found, scores = index.search(queries, 10)
    assert recall_at(found, exact(vectors, ids, queries, 10)) >= 0.95
    assert set(found[found >= 0].tolist()) <= set(ids.tolist())
    position = {int(i): p for p, i in enumerate(ids)}
    top = np.array([vectors[position[int(i)]] @ q for i, q in zip(found[:, 0], queries, strict=True)])
    np.testing.assert_allclose(scores[:, 0], top, atol=1e-4)  # scores are cosines of the stored vectors
    if kind in ("ivf", "ivfpq"):
        assert record.param == "nprobe" and record.value is not None
    if kind == "hnsw":
        assert record.param == "efSearch"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfsq", "ivfpq"])
def test_allow_list_is_applied_inside_faiss(data: tuple, kind: str) -> None:
    store, vectors, ids, queries = data
    record = build_collection_index(store, "images", IndexConfig(kind=kind), queries, "captions")
    index = load_index(store, record)
    allowed = ids[::97]  # about 600 ids scattered over every cluster
    found, _ = index.search(queries[:50], 10, allowed, value=4096)
    assert set(found[found >= 0].tolist()) <= set(allowed.tolist())
    if kind != "hnsw":  # HNSW may stop before reaching enough allowed nodes; IVF and flat may not
        assert (found >= 0).all()
        mask = np.isin(ids, allowed)
        truth = exact(vectors[mask], ids[mask], queries[:50], 10)
        assert recall_at(found, truth) >= (1.0 if kind in ("flat", "ivf") else 0.9)


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_altered_index_file_is_refused(data: tuple, tmp_path: Path) -> None:
    store, _, _, queries = data
    record = build_collection_index(store, "images", IndexConfig(kind="flat"), queries, "captions")
    flip_middle_byte(store.folder / record.file.file)
    with pytest.raises(StoreError, match="does not match its sha256"):
        load_index(store, record)


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, towers: tuple[Path, Path]
) -> BuildConfig:
    root = tmp_path_factory.mktemp("searchable")
    images = make_corpus(root / "images", root / "outside")
    captions = root / "captions.jsonl"
    captions.write_text(
        "".join(
            json.dumps({"caption": t, "lang": lang}) + "\n"
            for t, lang in [("a dog", "en"), ("a red car", "en"), ("un chat", "fr")]
        )
    )
    config = BuildConfig(
        out=root / "index",
        images=images,
        captions=(captions,),
        model=ModelSpec(checkpoint, *towers),
        device="cpu",
        workers=1,
    )
    build_index(config)
    return config


def test_scores_are_dot_products_with_an_independent_encoding(built: BuildConfig) -> None:
    with (
        Encoder.load(built.model, device="cpu") as encoder,
        Retriever.open(built.out, device="cpu") as retriever,
    ):
        query = encoder.encode_texts(["a person walking on the street"])[0]
        hits = retriever.search_text("a person walking on the street", k=5)
        rows = retriever.rows("images")
        with Store.open(built.out) as store:
            table = pa.concat_tables([t for _, t in store.iter_shards("images")])
        stored = dict(
            zip(table.column("id").to_pylist(), embedding_matrix(table.column("embedding"), 16), strict=True)
        )
        exact = sorted((float(v @ query) for v in stored.values()), reverse=True)[:5]
        # Same scores in the same order as exact search (identical files tie, in either order).
        np.testing.assert_allclose([h.score for h in hits], exact, atol=1e-5)
        for hit in hits:
            assert hit.score == pytest.approx(float(stored[hit.id] @ query), abs=1e-5)
            assert Path(hit.path).is_file() and hit.path.startswith(str(built.images.resolve()))
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert len(rows.ids) == len(GOOD)


def test_batched_and_single_searches_agree(built: BuildConfig) -> None:
    with Retriever.open(built.out, device="cpu") as retriever:
        queries = ["a dog", "a red flag", "a photo of a cat", "food on a plate"]
        ids, scores = retriever.search_texts(queries, k=4)
        assert ids.shape == scores.shape == (4, 4) and ids.dtype == np.int64 and scores.dtype == np.float32
        for row, query in enumerate(queries):
            assert [h.id for h in retriever.search_text(query, k=4)] == ids[row].tolist()
        vectors = retriever.encode_texts(queries)
        np.testing.assert_array_equal(retriever.search_vectors(vectors, k=4)[0], ids)


def test_image_queries(built: BuildConfig) -> None:
    with Retriever.open(built.out, device="cpu") as retriever:
        leaf = built.images / "nested" / "deeper" / "leaf.jpeg"
        similar = retriever.search_image(leaf, k=2, target="images")
        assert {Path(h.path).name for h in similar} == {"leaf.jpeg", "duplicate-of-leaf.jpeg"}
        assert similar[0].score == pytest.approx(1.0, abs=1e-4)
        captions = retriever.search_image(leaf, k=10)
        assert {h.text for h in captions} == {"a dog", "a red car", "un chat", "a red flag on a white pole"}
        french = next(h for h in captions if h.text == "un chat")
        assert french.fields["lang"] == "fr"


def test_allow_ids_and_where(built: BuildConfig) -> None:
    with Retriever.open(built.out, device="cpu") as retriever:
        allowed = retriever.filter_ids("images", [("path", "~", "photos/*")])
        assert len(allowed) == 4
        hits = retriever.search_text("anything", k=10, allow_ids=allowed)
        assert len(hits) == 4 and all("/photos/" in h.path for h in hits)
        fr = retriever.filter_ids("captions", [("lang", "=", "fr")])
        assert [h.text for h in retriever.search_text("x", k=5, target="captions", allow_ids=fr)] == [
            "un chat"
        ]


def test_deleted_files_leave_search(built: BuildConfig, tmp_path: Path) -> None:
    import shutil

    images = tmp_path / "images"
    shutil.copytree(built.images, images, symlinks=True, ignore=shutil.ignore_patterns("fifo.jpg"))
    config = BuildConfig(**{**vars(built), "images": images, "out": tmp_path / "index", "captions": ()})
    build_index(config)
    (images / "pic.webp").unlink()
    report = build_index(config)
    assert "images" in report.indexes  # the index follows the rows
    with Retriever.open(config.out, device="cpu") as retriever:
        paths = {Path(h.path).name for h in retriever.search_text("x", k=50)}
        assert "pic.webp" not in paths and len(paths) == len(GOOD) - 1


def test_index_of_another_model_is_refused(
    built: BuildConfig, tmp_path: Path, towers: tuple[Path, Path]
) -> None:
    import torch
    from conftest import seed_checkpoint

    from retrieval import MultiModalEncoder

    torch.manual_seed(11)
    other = seed_checkpoint(MultiModalEncoder(*towers, embed_dim=16), tmp_path / "other.pt")
    with Encoder.load(ModelSpec(other, *towers), device="cpu") as encoder:
        retriever = Retriever.open(built.out, encoder=encoder)
        with pytest.raises(IndexMismatchError, match="another model"):
            retriever.search_text("a dog")


def test_catalog_records_measured_recall(built: BuildConfig) -> None:
    catalog = json.loads((built.out / "catalog.json").read_text())
    for collection in ("images", "captions"):
        index = catalog["indexes"][collection]
        assert index["kind"] == "flat" and index["recall_at_10"] == 1.0
        assert index["queries"] == ("captions" if collection == "images" else "images")
        assert index["latency_ms"] > 0


def test_search_cli(built: BuildConfig) -> None:
    search = str(Path(sys.executable).parent / "search")
    result = subprocess.run(
        [search, "text", "a dog", "--index", str(built.out), "-k", "3", "--json", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3] and all("path" in h and "score" in h for h in hits)
    with Retriever.open(built.out, device="cpu") as retriever:
        # The command line folds files of identical content into their best hit.
        folded = retriever.search_text("a dog", k=3, fold_identical=True)
        assert [h["id"] for h in hits] == [h.id for h in folded]
    table = subprocess.run(
        [
            search,
            "image",
            str(built.images / "pic.bmp"),
            "--index",
            str(built.out),
            "--where",
            "lang=fr",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert table.returncode == 0, table.stderr
    assert table.stdout.strip().endswith("un chat")
    bad = subprocess.run(
        [search, "text", "x", "--index", str(built.out), "--where", "nope=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "no field 'nope'" in bad.stderr


def test_zero_shot_uses_the_learned_temperature(built: BuildConfig) -> None:
    from retrieval.model.zeroshot import classify

    labels = ["dog", "red flag", "car"]
    image = built.images / "clipart" / "flag.png"
    with Encoder.load(built.model, device="cpu") as encoder:
        ranked = classify(encoder, [image], labels, "a picture of a {}")[0]
        cosine = (
            encoder.encode_images([image]) @ encoder.encode_texts([f"a picture of a {x}" for x in labels]).T
        )
        logits = cosine[0] / encoder.temperature
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert [s.label for s in ranked] == [labels[i] for i in np.argsort(-expected)]
    np.testing.assert_allclose([s.probability for s in ranked], np.sort(expected)[::-1], rtol=1e-5)
    assert sum(s.probability for s in ranked) == pytest.approx(1.0)


def test_embed_and_contact_sheet_cli(built: BuildConfig, tmp_path: Path) -> None:
    from PIL import Image as PILImage

    retrieval = str(Path(sys.executable).parent / "retrieval")
    model = model_flags(built.model.checkpoint, built.model.text_model, built.model.vision_model)
    for suffix in ("npy", "parquet"):
        out = tmp_path / f"v.{suffix}"
        result = subprocess.run(
            [retrieval, "embed", "text", "a dog", "a cat", "--out", str(out), *model, "--device", "cpu"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        stored = (
            np.load(out)
            if suffix == "npy"
            else embedding_matrix(pa.parquet.read_table(out).column("embedding"), 16)
        )
        with Encoder.load(built.model, device="cpu") as encoder:
            np.testing.assert_allclose(stored, encoder.encode_texts(["a dog", "a cat"]), atol=1e-6)
    sheet = tmp_path / "sheet.png"
    search = str(Path(sys.executable).parent / "search")
    result = subprocess.run(
        [
            search,
            "text",
            "a dog",
            "--index",
            str(built.out),
            "-k",
            "7",
            "--grid",
            str(sheet),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert PILImage.open(sheet).size == (5 * 192, 18 + 2 * (192 + 30))  # two label lines a tile


def test_recall_counts_ties_at_the_kth_score() -> None:
    truth_ids = np.array([[1, 2, 3]])
    truth_scores = np.array([[0.9, 0.5, 0.5]], dtype=np.float32)
    found = np.array([[1, 2, 4]])  # 4 ties 3 at the k-th score
    found_scores = np.array([[0.9, 0.5, 0.5]], dtype=np.float32)
    assert recall_at(found, truth_ids) == pytest.approx(2 / 3)
    assert recall_at(found, truth_ids, found_scores, truth_scores) == 1.0
    worse = np.array([[0.9, 0.5, 0.4]], dtype=np.float32)
    assert recall_at(found, truth_ids, worse, truth_scores) == pytest.approx(2 / 3)


@pytest.mark.damages_stores
@pytest.mark.parametrize(("kind", "code"), [("ivfsq", 32), ("ivfpq", 16)])
def test_compressed_kinds_rerank_from_a_file_beside_them_and_refuse_that_file_damaged(
    tmp_path: Path, kind: str, code: int
) -> None:
    vectors, queries = clustered(20_000, 32, seed=3), clustered(200, 32, seed=4)
    ids = np.arange(len(vectors), dtype=np.int64) * 2 + 1
    store = vector_store(tmp_path / "s", vectors, ids)
    record = build_collection_index(store, "images", IndexConfig(kind=kind), queries, "captions")  # type: ignore[arg-type]
    assert record is not None and record.rerank is not None and record.refine is not None
    # The index file holds the codes and ids (a byte or half a byte an axis, 8 bytes of id; fast
    # scan pads each list to blocks of 32), not the 128 bytes of each vector.
    assert record.file.bytes < 1.5 * len(vectors) * (code + 8) < len(vectors) * 4 * 32
    assert record.rerank.bytes == len(vectors) * (8 + 4 * 32)
    index = load_index(store, record)
    assert index.rerank is not None and np.array_equal(np.asarray(index.rerank.ids), ids)
    listed = index_ids(index.index)
    assert listed is not None and np.array_equal(np.sort(listed), ids)
    found, scores = index.search(queries, 10)
    assert recall_at(found, exact(vectors, ids, queries, 10)) >= 0.95
    position = {int(i): p for p, i in enumerate(ids)}
    top = np.array([vectors[position[int(i)]] @ q for i, q in zip(found[:, 0], queries, strict=True)])
    np.testing.assert_allclose(scores[:, 0], top, atol=1e-5)  # the stored vectors' cosines
    flip_middle_byte(store.folder / record.rerank.file)
    with pytest.raises(StoreError, match="does not match its sha256"):
        load_index(store, record)
