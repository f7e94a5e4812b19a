"""Shared by the benchmarks: a real-size random-init model in the seed's format, test corpora."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BertConfig, ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import ModelSpec, MultiModalEncoder, Runtime

OPENCLIPART = Path("/usr/share/openclipart/png")
WORDS = (
    "a an the one two three person man woman child people dog cat horse bird cow sheep bicycle car "
    "bus train truck boat plane street road field beach snow water river park kitchen table plate "
    "pizza sandwich cake banana apple bowl cup chair couch bed window door building tower clock sign "
    "red blue green white black yellow brown small large young old walking running sitting standing "
    "riding holding eating looking playing flying parked next to near on in at with of under over "
    "front behind top side group several its their some very tall little"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_model_dir(root: Path, rng: np.random.Generator, tiny: bool = False) -> ModelSpec:
    """BERT-base and ViT-B/16 configs with a bert-base-sized vocabulary; a seed-format checkpoint.

    ``tiny``: two-layer 64-wide towers instead, for runs where the model is not what is measured.
    Their weights are drawn wide (initializer range 0.5, not BERT's 0.02): at 0.02 a random tower
    maps every caption to nearly one point (random pairs at cosine 0.99999), and a nearest-neighbour
    benchmark on such vectors measures only ties; at 0.5 random pairs sit near 0.75.
    """
    text, vision = root / "bert-base-uncased", root / "vit-base-patch16-224"
    text.mkdir()
    vision.mkdir()
    vocab = SPECIAL + WORDS + ["."]
    vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    (text / "vocab.txt").write_text("\n".join(vocab) + "\n")
    small = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "initializer_range": 0.5,
    }
    BertConfig(**(small if tiny else {})).save_pretrained(text)  # bert-base: 12 x 768, 30522 tokens
    ViTConfig(**(small if tiny else {})).save_pretrained(vision)  # ViT-B/16 at 224 px
    torch.manual_seed(int(rng.integers(1 << 31)))
    model = MultiModalEncoder(text, vision, embed_dim=256)
    checkpoint = root / "best_checkpoint.pt"
    torch.save(
        {"epoch": 0, "global_step": 0, "model_state_dict": model.state_dict(), "optimizer_state_dict": {}},
        checkpoint,
    )
    return ModelSpec(checkpoint, text, vision)


def make_images(
    folder: Path, n: int, rng: np.random.Generator, distinct: int = 200, shape: tuple[int, int] | None = None
) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields plus grain) of typical web sizes.

    At most ``distinct`` files are written and the list cycles through them: decoding costs the
    same, and writing thousands of JPEGs would dominate the run.
    """
    folder.mkdir()
    sizes = [shape] if shape else [(640, 480), (500, 375), (480, 640), (800, 533), (612, 612)]
    paths = []
    for i in range(min(n, distinct)):
        w, h = sizes[i % len(sizes)]
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (w, h), Image.BICUBIC
        )
        grain = rng.normal(0, 8, (h, w, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return [paths[i % len(paths)] for i in range(n)]


def make_captions(n: int, rng: np.random.Generator) -> list[str]:
    lengths = np.clip(rng.lognormal(np.log(11), 0.45, n).astype(int), 3, 60)
    return [" ".join(rng.choice(WORDS, size=k)) + "." for k in lengths]


def openclipart_images(n: int) -> list[Path]:
    """``n`` real clip-art PNGs from Debian's openclipart-png, spread over its categories."""
    found = sorted(OPENCLIPART.rglob("*.png")) if OPENCLIPART.is_dir() else []
    if len(found) < n:
        return []
    step = len(found) / n
    return [found[int(i * step)] for i in range(n)]


def rate(fn: Callable[[], object], items: int, sync: Callable[[], None] = lambda: None) -> float:
    """Items per second of one call of ``fn`` (after ``sync`` waits for the device)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return items / (time.perf_counter() - start)


def seed_image_loop(model: MultiModalEncoder, runtime: Runtime, paths: list[Path]) -> None:
    """The users' manual, one image at a time: the baseline every image ratio is taken against."""
    with torch.no_grad(), runtime.autocast():
        for path in paths:
            image = Image.open(path).convert("RGB")
            model.encode_image(model.image_processor(images=[image], return_tensors="pt")).cpu()


def seed_caption_loop(model: MultiModalEncoder, runtime: Runtime, captions: list[str]) -> None:
    """The users' manual, one caption at a time."""
    with torch.no_grad(), runtime.autocast():
        for caption in captions:
            inputs = model.text_tokenizer(caption, return_tensors="pt", padding=True, truncation=True)
            model.encode_text(inputs).cpu()


def vector_store(
    folder: Path,
    files: Iterable[tuple[np.ndarray, list[str], list[str], np.ndarray]],
    dim: int,
    root: str = "/",
    index: str | None = None,
) -> None:
    """An index folder of given vectors, as images, written through the Store API: each of
    ``files`` is one data file, ``(ids, paths, sha256s, vectors)``; then, with ``index`` (a kind),
    its FAISS index, built and published as ``index build`` would."""
    import dataclasses

    from retrieval import Store
    from retrieval.ann.faiss_index import IndexConfig, build_collection_index
    from retrieval.model.fingerprint import ModelFingerprint
    from retrieval.store.folder import new_manifest
    from retrieval.store.manifest import CollectionState
    from retrieval.store.schema import ImageRow, schema, shard_table, table_description

    fingerprint = ModelFingerprint("bench", "text", "vision", "tokenizer", "preprocess", dim).to_dict()
    with Store.open(folder, write=True) as store:
        manifest = store.commit_catalog(new_manifest({"fingerprint": fingerprint}))
        refs, rows = [], 0
        for number, (ids, paths, digests, vectors) in enumerate(files):
            records = [ImageRow(p, d, 1, 0, 1, 1) for p, d in zip(paths, digests, strict=True)]
            table = shard_table("images", ids, records, vectors, fingerprint)
            refs.append(store.write_table(f"images/part-{number:05d}.parquet", table))
            rows += len(ids)
        state = CollectionState(next_id=rows, counts={"indexed": rows}, root=root)
        description = table_description("images", fingerprint)
        state = store.commit_rows(store.table("images"), state, schema("images", dim), description, refs)
        store.manifest = store.commit_catalog(dataclasses.replace(manifest, collections={"images": state}))
        if index is not None:
            record = build_collection_index(store, "images", IndexConfig(kind=index), None, "self")
            assert record is not None
            record = dataclasses.replace(record, version=state.version, rows_version=state.rows_version)
            published = {"images": dataclasses.replace(state, index=record)}
            store.commit_catalog(dataclasses.replace(store.manifest, collections=published))
