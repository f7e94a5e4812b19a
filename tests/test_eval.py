"""Evaluation: metrics against hand-computed cases, then the whole protocol end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stores import model_flags
from transformers import ViTImageProcessor

from retrieval import BuildConfig, ModelSpec, build_index
from retrieval.ann.faiss_index import IndexConfig
from retrieval.errors import ConfigError, InputError
from retrieval.evaluation.metrics import exact_scan, gold_matrix, ranks_in_results, summarize
from retrieval.evaluation.protocol import EvalConfig, evaluate, score
from retrieval.evaluation.report import write_report
from retrieval.evaluation.sets import EvalSet
from retrieval.model.preprocess import ImagePreprocess


def unit(*v: float) -> np.ndarray:
    x = np.array(v, dtype=np.float32)
    return x / np.linalg.norm(x)


# -- metrics ----------------------------------------------------------------------------------------


def test_gold_rank_counts_only_non_gold_candidates_ahead() -> None:
    candidates = np.stack([unit(1, 0), unit(0, 1), unit(0.6, 0.8)])  # ids 0, 1, 2
    query = unit(1, 0)[None]  # scores 1.0, 0.0, 0.6
    for gold, expected in (([2], 2), ([0], 1), ([1], 3), ([1, 2], 2)):
        best = max(float(query[0] @ candidates[g]) for g in gold)
        _, _, ranks = exact_scan(
            query, [(np.arange(3), candidates)], 2, gold_matrix([gold]), np.array([best])
        )
        assert ranks is not None
        assert ranks.tolist() == [expected], gold


def test_ties_count_against_the_query() -> None:
    # Candidate 1 is an exact copy of the gold candidate 0: the query cannot tell them apart.
    candidates = np.stack([unit(1, 1), unit(1, 1), unit(-1, 0)])
    query = unit(1, 1)[None]
    _, _, ranks = exact_scan(query, [(np.arange(3), candidates)], 3, gold_matrix([[0]]), np.array([1.0]))
    assert ranks is not None
    assert ranks.tolist() == [2]


def test_blocks_and_unordered_ids_give_the_same_result_as_one_scan() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.permutation(1000)[:50].astype(np.int64)
    queries = vectors[:7] + 0.3 * rng.normal(size=(7, 8)).astype(np.float32)
    gold = gold_matrix([[int(ids[i]), int(ids[i + 10])] for i in range(7)])
    best = np.array([max(queries[i] @ vectors[i], queries[i] @ vectors[i + 10]) for i in range(7)])
    whole = exact_scan(queries, [(ids, vectors)], 5, gold, best)
    split = exact_scan(
        queries, [(ids[i : i + 3], vectors[i : i + 3]) for i in range(0, 50, 3)], 5, gold, best
    )
    np.testing.assert_array_equal(whole[0], split[0])
    np.testing.assert_array_equal(whole[2], split[2])
    # The oracle: sort every score.
    scores = queries @ vectors.T
    for q in range(7):
        order = ids[np.argsort(-scores[q], kind="stable")]
        first_gold = min(np.flatnonzero(np.isin(order, gold[q])))
        assert whole[2][q] == first_gold + 1
        np.testing.assert_array_equal(whole[0][q], order[:5])


def test_ranks_in_search_results() -> None:
    ids = np.array([[7, 3, 9, -1], [4, 5, 6, 8], [1, 2, 3, 4]])
    scores = np.array(
        [[0.9, 0.8, 0.7, -np.inf], [0.9, 0.8, 0.8, 0.1], [0.5, 0.4, 0.3, 0.2]], dtype=np.float32
    )
    gold = gold_matrix([[9], [6], [42]])
    # Row 1: gold 6 ties with 5 at 0.8, so 5 counts ahead of it. Row 2: no gold in the list.
    assert ranks_in_results(ids, scores, gold).tolist() == [3, 3, 0]


def test_summary_of_ranks() -> None:
    s = summarize(np.array([1, 2, 3, 10, 40]), ks=(1, 5, 10))
    assert s.recall == {1: 0.2, 5: 0.6, 10: 0.8}
    assert s.median_rank == 3
    assert s.mean_rank == pytest.approx(56 / 5)
    # From a search of depth 10, two misses: the median is still known, the mean is not.
    s = summarize(np.array([1, 4, 0, 2, 0]), ks=(1, 5), depth=10)
    assert s.recall == {1: 0.2, 5: 0.6}
    assert s.median_rank == 4
    assert s.mean_rank is None
    assert summarize(np.array([1, 0, 0]), ks=(1,), depth=10).median_rank is None


# -- the protocol on a hand-made case -----------------------------------------------------------------

# Every image is a solid colour; the fake model maps it to its normalised RGB. Each caption has a
# chosen vector, so every rank below is worked out by hand in the comments.
COLORS = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255)}
TEXTS = {
    "crimson": unit(1, 0, 0),  # red 1.0: rank 1
    "warm": unit(0.6, 0.8, 0),  # red .6 < green .8: rank 2
    "leaf": unit(0, 1, 0),  # green: rank 1
    "sky": unit(0.8, 0, 0.6),  # blue .6 < red .8: rank 2
    "apple": unit(0.6, 0, 0.8),  # gold is red (via its copy) .6 < blue .8: rank 2
    "color": unit(0, 0, 1),  # gold red and green, both 0; blue 1 is ahead: rank 2
    "hot": unit(1, 0, 0),
    "cold": unit(0, 0.6, 0.8),
}
PAIRS = """image,caption,kind
red.png,crimson,hot
red.png,warm,hot
green.png,leaf,hot
blue.png,sky,cold
copy_of_red.png,apple,hot
red.png,color,hot
green.png,color,hot
missing.png,ghost,cold
broken.png,junk,cold
,no image,cold
"""


class ColourModel:
    """The parts of ``Encoder`` evaluation uses, with vectors fixed by hand."""

    image_batch_size = 2
    dim = 3
    source = None
    fingerprint = None

    def __init__(self) -> None:
        self.preprocess = ImagePreprocess.from_processor(ViTImageProcessor(size={"height": 8, "width": 8}))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        rgb = pixels.reshape(len(pixels), -1, 3).mean(axis=1)
        return (rgb / np.linalg.norm(rgb, axis=1, keepdims=True)).astype(np.float32)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([TEXTS[t] for t in texts])

    def close(self) -> None:
        pass


@pytest.fixture
def colour_pairs(tmp_path: Path) -> Path:
    for name, rgb in COLORS.items():
        Image.new("RGB", (16, 16), rgb).save(tmp_path / name)
    shutil.copy(tmp_path / "red.png", tmp_path / "copy_of_red.png")  # same file: one image
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "pairs.csv").write_text(PAIRS)
    return tmp_path / "pairs.csv"


def test_protocol_by_hand(colour_pairs: Path) -> None:
    config = EvalConfig(pairs=colour_pairs, labels_column="kind", ks=(1, 5), workers=0, templates=("{}",))
    report = evaluate(config, encoder=ColourModel())  # type: ignore[arg-type]
    assert (report.images, report.captions, report.pairs) == (3, 6, 7)
    assert sorted(o.source.split("#")[0].split("/")[-1] for o in report.skipped) == [
        "broken.png",
        "missing.png",
        "pairs.csv",
    ]
    t2i, i2t = report.directions
    exact = t2i.methods[0].summary  # ranks 1, 2, 1, 2, 2, 2
    assert (t2i.queries, exact.recall, exact.median_rank) == (6, {1: 2 / 6, 5: 1.0}, 2.0)
    assert exact.mean_rank == pytest.approx(10 / 6)
    # red (and its copy): crimson 1.0 first, rank 1; green: leaf 1.0, rank 1; blue: its only
    # caption "sky" scores .6, behind "apple" .8 and "color" 1.0, rank 3.
    exact = i2t.methods[0].summary
    assert (i2t.queries, exact.recall, exact.median_rank) == (3, {1: 2 / 3, 5: 1.0}, 1.0)
    assert exact.mean_rank == pytest.approx(5 / 3)
    # Zero-shot with the prompts "hot" (1,0,0) and "cold" (0,.6,.8): green is labelled hot but
    # scores 0 against hot and .6 against cold.
    z = report.zeroshot
    assert z is not None
    assert (z.images, z.top1, z.top5) == (3, round(2 / 3, 4), 1.0)
    assert [(r.label, r.images, r.accuracy, r.precision_at_10) for r in z.labels] == [
        ("cold", 1, 1.0, round(1 / 3, 4)),
        ("hot", 2, 0.5, round(2 / 3, 4)),
    ]
    assert z.confusions == (("hot", "cold", 1),)


def test_an_index_that_loses_results_is_told_apart_from_the_model(colour_pairs: Path) -> None:
    """Exact figures stay; the index row drops, and its recall against exact says why."""
    report = evaluate(EvalConfig(pairs=colour_pairs, ks=(1,), workers=0), encoder=ColourModel())  # type: ignore[arg-type]
    assert report.directions[0].methods[0].summary.recall[1] == pytest.approx(2 / 6)

    class DropsTheBest:
        kind, param, value = "ivf", "nprobe", 1

        def __init__(self, vectors: np.ndarray) -> None:
            self.vectors = vectors

        def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            scores = queries @ self.vectors.T
            order = np.argsort(-scores, axis=1, kind="stable")[:, 1 : k + 1]  # loses each top hit
            ids = np.pad(order, ((0, 0), (0, 1)), constant_values=-1)
            return ids, np.pad(
                np.take_along_axis(scores, order, 1), ((0, 0), (0, 1)), constant_values=-np.inf
            )

    vectors = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    texts = np.stack([TEXTS[t] for t in ("crimson", "warm", "leaf")])
    evalset = EvalSet(
        image_vectors=vectors,
        image_ids=[np.array([i]) for i in range(3)],
        image_labels=[None] * 3,
        text_vectors=texts,
        text_ids=[np.array([t]) for t in range(3)],
        links=np.array([[0, 0], [0, 1], [1, 2]]),
        candidates={"images": (3, lambda: [(np.arange(3), vectors)])},
        encode_texts=ColourModel().encode_texts,
        model={},
        pair_count=3,
        indexes={"images": DropsTheBest(vectors)},
    )
    t2i = score(evalset, EvalConfig(pairs=Path("x"), ks=(1, 2), depth=2)).directions[0]
    exact, lossy = t2i.methods
    assert exact.summary.recall == {1: 2 / 3, 2: 1.0}  # ranks 1, 2, 1
    assert lossy.method == "ivf nprobe=1"
    assert lossy.summary.recall == {1: 1 / 3, 2: 1 / 3}  # "warm" still finds red; the others lose it
    assert lossy.recall_vs_exact == round(2 / 3, 4)  # 2 of each query's 3 exact results come back
    assert lossy.summary.mean_rank is None


def test_bad_requests_are_refused(colour_pairs: Path) -> None:
    model = ColourModel()
    with pytest.raises(ConfigError, match="--pairs, --index"):
        evaluate(EvalConfig())
    with pytest.raises(ConfigError, match="no column 'genre'"):
        evaluate(EvalConfig(pairs=colour_pairs, labels_column="genre", workers=0), encoder=model)  # type: ignore[arg-type]
    text_only = colour_pairs.with_name("captions.txt")
    text_only.write_text("a caption\n")
    with pytest.raises(InputError, match="needs an image column"):
        evaluate(EvalConfig(pairs=text_only, workers=0), encoder=model)  # type: ignore[arg-type]
    nothing = colour_pairs.with_name("nothing.csv")
    nothing.write_text("image,caption\nmissing.png,ghost\n")
    with pytest.raises(InputError, match="no image-caption pair"):
        evaluate(EvalConfig(pairs=nothing, workers=0), encoder=model)  # type: ignore[arg-type]


# -- with a real (tiny) model and an index ---------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(towers: tuple[Path, Path], checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("catalog")
    rng = np.random.default_rng(5)
    words = "red blue green dog cat car tree house sun moon".split()
    lines = ["image,caption,kind"]
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        kind = "animal" if i % 3 else "thing"
        lines.append(f"{i:02d}.png,a {words[i % 10]} {words[(3 * i) % 10]} {i},{kind}")
        if i % 5 == 0:
            lines.append(f"{i:02d}.png,the {words[(i + 4) % 10]} {i},{kind}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root


def test_index_eval_agrees_with_model_eval_and_its_own_pairs(
    catalog: Path, towers: tuple[Path, Path], checkpoint: Path, tmp_path: Path
) -> None:
    spec = ModelSpec(checkpoint, *towers)
    pairs = catalog / "pairs.csv"
    build_index(
        BuildConfig(
            out=tmp_path / "idx",
            images=catalog,
            captions=(pairs,),
            model=spec,
            workers=0,
            device="cpu",
            index=IndexConfig(kind="hnsw"),
        )
    )
    by_model = evaluate(EvalConfig(pairs=pairs, model=spec, workers=0, device="cpu", labels_column="kind"))
    by_index = evaluate(EvalConfig(index=tmp_path / "idx", labels_column="kind"))
    with_file = evaluate(EvalConfig(index=tmp_path / "idx", pairs=pairs))
    assert (by_model.images, by_model.captions) == (24, by_index.captions)
    for a, b, c in zip(by_model.directions, by_index.directions, with_file.directions, strict=True):
        assert a.methods[0].summary == b.methods[0].summary == c.methods[0].summary  # same candidates
        assert [m.method.split()[0] for m in b.methods] == ["exact", "hnsw"]
        assert b.methods[1].recall_vs_exact is not None
    assert by_model.zeroshot == by_index.zeroshot


def test_cli_eval_table_json_and_report(
    catalog: Path, towers: tuple[Path, Path], checkpoint: Path, tmp_path: Path
) -> None:
    model = model_flags(checkpoint, *towers)
    base = [
        str(Path(sys.executable).parent / "retrieval"),
        "eval",
        "--pairs",
        str(catalog / "pairs.csv"),
        *model,
    ]
    done = subprocess.run(
        [*base, "--json", "--report", str(tmp_path / "r.html"), "--workers", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(done.stdout)
    assert [d["direction"] for d in data["directions"]] == ["text_to_image", "image_to_text"]
    assert set(data["directions"][0]["methods"][0]["summary"]["recall"]) == {"1", "5", "10"}
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page and "text → image" in page
    done = subprocess.run([*base, "--workers", "0", "-k", "1,3"], capture_output=True, text=True, check=True)
    assert "R@3" in done.stdout and "text → image" in done.stdout
    bad = subprocess.run([*base, "-k", "one"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: -k takes comma-separated integers, got 'one'"


def test_markdown_report_has_the_figures_and_a_plot(colour_pairs: Path, tmp_path: Path) -> None:
    report = evaluate(
        EvalConfig(pairs=colour_pairs, workers=0, labels_column="kind", templates=("{}",)),
        encoder=ColourModel(),
    )  # type: ignore[arg-type]
    written = write_report(report, tmp_path / "eval.md")
    text = written[0].read_text()
    assert "| text → image | exact | 6 | 0.333 | 1.000 | 1.000 | 2 | 1.7 | - |" in text
    assert "![recall@K](eval.png)" in text
    assert Image.open(written[1]).size[0] > 400
    with pytest.raises(ConfigError, match=r"\.md or \.html"):
        write_report(report, tmp_path / "eval.pdf")
