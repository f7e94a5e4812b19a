"""The HTTP service through FastAPI's TestClient, lifespan included: every endpoint against the
library's own answers on the same index, every bad input of SPEC 11, coalescing and hot swaps."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from corpus import _bomb_png, make_corpus
from fastapi.testclient import TestClient
from PIL import Image

from retrieval import BuildConfig, ModelSpec, Retriever, Term, build_index
from retrieval.errors import ConfigError, InputError
from retrieval.service.app import create_app
from retrieval.service.config import ServeConfig
from retrieval.service.snapshots import EncoderPool, LiveIndex
from retrieval.store.location import ModelPaths


def build(root: Path, checkpoint: Path, towers: tuple[Path, Path]) -> BuildConfig:
    images = make_corpus(root / "images", root / "outside")
    captions = root / "captions.jsonl"
    rows = [("a dog", "en"), ("a red car", "en"), ("un chat", "fr"), ("a person walking", "en")]
    captions.write_text("".join(json.dumps({"caption": t, "lang": lang}) + "\n" for t, lang in rows))
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


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, towers: tuple[Path, Path]
) -> BuildConfig:
    return build(tmp_path_factory.mktemp("served"), checkpoint, towers)


def serve_config(folder: Path, **options: object) -> ServeConfig:
    return ServeConfig(indexes=(folder,), device="cpu", **options)  # type: ignore[arg-type]


@pytest.fixture
def client_of() -> Iterator:
    """``client_of(config)``: a TestClient of the app, entered (lifespan run) and ready."""
    clients: list[TestClient] = []

    def make(config: ServeConfig, ready: bool = True) -> TestClient:
        client = TestClient(create_app(config))
        client.__enter__()
        clients.append(client)
        if ready:
            wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def wait_ready(client: TestClient, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        if response.status_code == 200:
            return
        assert response.status_code == 503 and response.json()["ready"] is False
        assert response.json()["error"] is None, response.json()["error"]
        time.sleep(0.05)
    raise AssertionError("the service did not become ready")


@pytest.fixture
def client(built: BuildConfig, client_of) -> TestClient:
    return client_of(serve_config(built.out))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def as_pairs(hits: list[dict]) -> list[tuple[int, float]]:
    return [(h["id"], round(h["score"], 4)) for h in hits]


def library_pairs(hits: list) -> list[tuple[int, float]]:
    return [(h.id, round(h.score, 4)) for h in hits]


def test_health_readiness_and_indexes(client: TestClient, built: BuildConfig) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "indexes": ["index"]}
    (described,) = client.get("/v1/indexes").json()["indexes"]
    with Retriever.open(built.out, device="cpu") as r:
        assert described["fingerprint"] == r.manifest.fingerprint
        assert described["version"]["generation"] == r.manifest.generation
        for collection in ("images", "captions"):
            row = described["collections"][collection]
            assert row["rows"] == r.size(collection)
            assert row["kind"] == r.store.state(collection).index.kind
            assert row["table_version"] == r.store.state(collection).version
            assert 0.0 <= row["recall_at_10"] <= 1.0


def test_searches_answer_as_the_library_does(client: TestClient, built: BuildConfig) -> None:
    picture = built.images / "photos" / "rotated.jpg"
    with Retriever.open(built.out, device="cpu") as r:
        by_text = r.search_text("a dog on the street", k=5)
        by_image = r.search_image(picture, k=3, target="captions")
        some_id = by_text[0].id
        like = r.search_vector(r.vectors([some_id], "images")[0], k=6)
        batch_ids, batch_scores = r.search_texts(["a dog", "a red car"], k=4)
        vector = r.encode_texts(["a cat"])[0]
        by_vector = r.search_vector(vector, k=4, target="captions")

    answer = client.post("/v1/search", json={"text": "a dog on the street", "k": 5}).json()
    assert as_pairs(answer["hits"]) == library_pairs(by_text)
    assert answer["hits"][0]["path"] == by_text[0].path
    assert answer["version"]["generation"] >= 1 and answer["took_ms"] > 0

    upload = client.post(
        "/v1/search/image",
        files={"file": ("q.jpg", picture.read_bytes(), "image/jpeg")},
        data={"k": "3", "target": "captions"},
    ).json()
    assert as_pairs(upload["hits"]) == library_pairs(by_image)
    assert upload["hits"][0]["text"] == by_image[0].text
    encoded = base64.b64encode(picture.read_bytes()).decode()
    inline = client.post("/v1/search", json={"image": encoded, "k": 3}).json()  # target defaults to captions
    assert as_pairs(inline["hits"]) == library_pairs(by_image)

    more = client.post("/v1/search", json={"id": some_id, "collection": "images", "k": 5}).json()
    assert as_pairs(more["hits"]) == [p for p in library_pairs(like) if p[0] != some_id][:5]

    sent = client.post("/v1/search", json={"vector": (vector * 3).tolist(), "target": "captions", "k": 4})
    assert as_pairs(sent.json()["hits"]) == library_pairs(by_vector)  # scaled: made unit norm

    results = client.post(
        "/v1/search/batch", json={"queries": [{"text": "a dog", "k": 4}, {"text": "a red car", "k": 4}]}
    ).json()["results"]
    for row, result in enumerate(results):
        assert [h["id"] for h in result["hits"]] == batch_ids[row].tolist()
        assert np.allclose([h["score"] for h in result["hits"]], batch_scores[row], atol=1e-5)

    # One bad query of a batch fails alone.
    mixed = client.post(
        "/v1/search/batch", json={"queries": [{"id": 999_999, "k": 2}, {"text": "a dog", "k": 4}]}
    ).json()["results"]
    assert mixed[0]["status"] == 404 and "999999" in mixed[0]["error"]
    assert [h["id"] for h in mixed[1]["hits"]] == batch_ids[0].tolist()


def test_filters_embed_items_and_images(client: TestClient, built: BuildConfig) -> None:
    french = client.post("/v1/search", json={"text": "x", "target": "captions", "where": ["lang=fr"]}).json()
    assert [h["text"] for h in french["hits"]] == ["un chat"]
    photos = client.post("/v1/search", json={"text": "x", "where": ["path~photos/*"], "k": 10}).json()
    assert len(photos["hits"]) == 4 and all("/photos/" in h["path"] for h in photos["hits"])
    first = photos["hits"][0]["id"]
    allowed = client.post("/v1/search", json={"text": "x", "allow_ids": [first], "k": 10}).json()
    assert [h["id"] for h in allowed["hits"]] == [first]

    with Retriever.open(built.out, device="cpu") as r:
        expected = r.encode_texts(["a dog", "a cat"])
        row = r.item(first, "images")
    vectors = client.post("/v1/embed", json={"texts": ["a dog", "a cat"]}).json()
    assert np.allclose(vectors["vectors"], expected, atol=1e-5) and vectors["dim"] == expected.shape[1]

    item = client.get(f"/v1/items/images/{first}").json()["item"]
    assert item == json.loads(json.dumps(row)) and item["path"].endswith(".jpg")
    original = client.get(f"/v1/images/{first}")
    assert original.content == Path(item["path"]).read_bytes()
    thumbnail = client.get(f"/v1/images/{first}?size=32")
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 32
    assert client.get(f"/v1/images/{first}?size=32").content == thumbnail.content  # from the cache


def test_the_image_root_is_remapped(built: BuildConfig, client_of, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(built.images / "photos", moved / "photos")
    client = client_of(serve_config(built.out, image_root=moved))
    hit = client.post("/v1/search", json={"text": "x", "where": ["path~photos/*"], "k": 1}).json()["hits"][0]
    served = client.get(f"/v1/images/{hit['id']}")
    assert served.status_code == 200
    relative = Path(hit["path"]).relative_to(built.images)
    assert served.content == (moved / relative).read_bytes()


def error_of(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    assert "Traceback" not in response.text
    return str(body["error"])


def test_every_bad_input_is_refused_with_a_clear_error(client: TestClient) -> None:
    assert "not valid base64" in error_of(client.post("/v1/search", json={"image": "***not base64***"}), 422)
    assert "k must be at most 1000" in error_of(
        client.post("/v1/search", json={"text": "a", "k": 10**9}), 422
    )
    assert "k:" in error_of(client.post("/v1/search", json={"text": "a", "k": "many"}), 422)
    assert "text" in error_of(client.post("/v1/search", json={"text": 5}), 422)
    assert "exactly one" in error_of(client.post("/v1/search", json={"k": 3}), 422)
    assert "exactly one" in error_of(client.post("/v1/search", json={"text": "a", "id": 1}), 422)
    assert "empty" in error_of(client.post("/v1/search", json={"text": "   "}), 422)
    assert "plus" in error_of(client.post("/v1/search", json={"text": "a", "plus": "b"}), 422)
    assert error_of(
        client.post("/v1/search", content=b"[1, 2", headers={"content-type": "application/json"}), 422
    )
    assert error_of(client.post("/v1/search", json=["a", "list"]), 422)
    assert "vector must be" in error_of(client.post("/v1/search", json={"vector": [1.0, 2.0]}), 422)
    assert "no images with id" in error_of(client.post("/v1/search", json={"id": 999_999}), 404)
    assert "no index 'other'" in error_of(
        client.post("/v1/search", json={"text": "a", "index": "other"}), 404
    )
    assert "no captions with id" in error_of(client.get("/v1/items/captions/999999"), 404)
    assert error_of(client.get("/v1/items/secrets/1"), 404)
    assert error_of(client.get("/v1/nothing-here"), 404)
    assert error_of(client.get("/v1/search"), 405)

    for attempt in (
        "/v1/images/..%2f..%2fetc%2fpasswd",
        "/v1/images/%2e%2e/%2e%2e/etc/passwd",
        "/v1/images/-1",
    ):
        response = client.get(attempt)
        assert response.status_code in (404, 422), attempt
        assert "root:" not in response.text and set(response.json()) == {"error"}
    assert error_of(client.get("/v1/images/999999"), 404)
    assert "between 16 and 1024" in error_of(client.get("/v1/images/0?size=100000"), 422)

    bomb = _bomb_png()
    assert "pixel limit" in error_of(
        client.post("/v1/search/image", files={"file": ("bomb.png", bomb, "image/png")}), 422
    )
    inline_bomb = base64.b64encode(bomb).decode()
    assert "pixel limit" in error_of(client.post("/v1/search", json={"image": inline_bomb}), 422)
    assert "cannot decode" in error_of(
        client.post("/v1/search/image", files={"file": ("x.jpg", b"<html>no</html>", "image/jpeg")}), 422
    )
    huge = b"\xff" * (30 * 2**20)
    assert "larger than" in error_of(
        client.post("/v1/search/image", files={"file": ("huge.jpg", huge, "image/jpeg")}), 413
    )
    # Without a Content-Length (a chunked body) the limit holds too.
    chunks = (b"x" * 2**20 for _ in range(40))
    assert "larger than" in error_of(
        client.post("/v1/search", content=chunks, headers={"content-type": "application/json"}), 413
    )
    # The service still answers after all of that.
    assert client.post("/v1/search", json={"text": "a dog", "k": 2}).status_code == 200


def test_the_api_key_guards_everything_but_health(built: BuildConfig, client_of) -> None:
    client = client_of(serve_config(built.out, api_key="s3cret"), ready=False)
    wait_ready(client)
    assert client.get("/healthz").status_code == 200
    for call in (
        lambda h: client.post("/v1/search", json={"text": "a dog"}, headers=h),
        lambda h: client.get("/v1/indexes", headers=h),
        lambda h: client.get("/metrics", headers=h),
        lambda h: client.get("/v1/images/0?size=32", headers=h),
    ):
        assert "API key" in error_of(call({}), 401)
        assert "API key" in error_of(call({"Authorization": "Bearer wrong"}), 401)
        assert call({"Authorization": "Bearer s3cret"}).status_code in (200, 404)
        assert call({"X-API-Key": "s3cret"}).status_code in (200, 404)
    assert client.get("/").status_code == 200  # the page holds no data; its calls carry the key


def test_unsafe_or_unusable_settings_are_refused(built: BuildConfig) -> None:
    with pytest.raises(ConfigError, match="--api-key"):
        serve_config(built.out, host="0.0.0.0").check()
    serve_config(built.out, host="0.0.0.0", insecure=True).check()
    serve_config(built.out, host="0.0.0.0", api_key="k").check()
    serve_config(built.out, host="::1").check()
    with pytest.raises(ConfigError, match="origins"):
        serve_config(built.out, cors_origins=("*",)).check()
    with pytest.raises(ConfigError, match="max-batch"):
        serve_config(built.out, max_batch=0).check()
    with pytest.raises(ConfigError, match="no such folder"):
        serve_config(built.out / "missing").check()


def test_cors_is_off_unless_asked(built: BuildConfig, client_of) -> None:
    preflight = {"Origin": "http://127.0.0.1:3000", "Access-Control-Request-Method": "POST"}
    closed = client_of(serve_config(built.out))
    assert "access-control-allow-origin" not in closed.options("/v1/search", headers=preflight).headers
    opened = client_of(serve_config(built.out, cors_origins=("http://127.0.0.1:3000",)))
    allowed = opened.options("/v1/search", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "http://127.0.0.1:3000"


@pytest.mark.damages_stores
def test_a_failed_first_load_is_reported_not_ready(tmp_path: Path, built: BuildConfig, client_of) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(built.out, broken)
    for index_file in (broken / "faiss").glob("*.faiss"):
        index_file.write_bytes(b"not an index")
    client = client_of(serve_config(broken), ready=False)
    deadline = time.monotonic() + 30
    while client.get("/readyz").json().get("error") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    response = client.get("/readyz")
    assert response.status_code == 503 and "sha256" in response.json()["error"]
    assert error_of(client.post("/v1/search", json={"text": "a"}), 503)
    assert client.get("/healthz").status_code == 200


def test_metrics_count_requests_stages_and_batches(client: TestClient) -> None:
    client.post("/v1/search", json={"text": "a dog"})
    client.post("/v1/search", json={"text": "a dog", "k": 10**9})
    text = client.get("/metrics").text
    assert 'retrieval_requests_total{endpoint="/v1/search",status="200"}' in text
    assert 'retrieval_requests_total{endpoint="/v1/search",status="422"}' in text
    assert 'retrieval_stage_seconds_count{stage="encode"}' in text
    assert "retrieval_batch_size_count" in text
    assert 'retrieval_index_generation{index="index"}' in text


def test_the_page_and_its_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and '<form id="search"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    for asset in ("/", "/static/app.js", "/static/style.css"):
        assert "http://" not in client.get(asset).text and "https://" not in client.get(asset).text  # no CDN
    assert client.get("/static/../catalog.json").status_code == 404


# -- hot swap -------------------------------------------------------------------------------------


@pytest.fixture
def growing(tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]) -> BuildConfig:
    return build(tmp_path, checkpoint, towers)


def add_picture(config: BuildConfig, name: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path = config.images / name
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_a_new_version_is_swapped_in_and_in_flight_leases_keep_the_old(growing: BuildConfig) -> None:
    pool = EncoderPool(ModelPaths(), "cpu")
    live = LiveIndex("index", growing.out, pool)
    live.load()
    assert not live.check()  # nothing changed
    before = live.current
    assert before is not None
    with live.lease() as held:
        new = add_picture(growing, "new-picture.png", 7)
        (growing.images / "pic.bmp").unlink()
        build_index(growing)
        assert live.check() and live.current is not held and live.swaps == 1
        # The old snapshot still answers, from its own version, while it is held.
        old_hits = held.retriever.search_text("a dog", k=50)
        assert any(h.path.endswith("pic.bmp") for h in old_hits)
    assert before.retriever._indexes == {}  # closed once its last lease ended
    with live.lease() as fresh:
        hits = fresh.retriever.search_image(new, k=1, target="images")
        assert hits[0].path == str(new)
        assert fresh.version["generation"] > before.version["generation"]
    live.close()
    pool.close()


@pytest.mark.damages_stores
def test_a_version_that_fails_to_load_keeps_the_old_one_serving(growing: BuildConfig) -> None:
    pool = EncoderPool(ModelPaths(), "cpu")
    live = LiveIndex("index", growing.out, pool)
    live.load()
    generation = live.current.version["generation"]
    old_files = set((growing.out / "faiss").glob("*.faiss"))
    add_picture(growing, "another.png", 8)
    build_index(growing)
    for index_file in set((growing.out / "faiss").glob("*.faiss")) - old_files:
        index_file.write_bytes(b"damaged")
    assert not live.check()
    assert live.error is not None and "sha256" in live.error
    assert live.describe()["error"] == live.error
    with live.lease() as snapshot:
        assert snapshot.version["generation"] == generation
        assert snapshot.retriever.search_text("a dog", k=2)
    live.close()
    pool.close()


def test_the_service_swaps_while_answering(growing: BuildConfig, client_of) -> None:
    client = client_of(serve_config(growing.out, poll_seconds=0.1))
    before = client.get("/v1/indexes").json()["indexes"][0]["version"]["generation"]
    new = add_picture(growing, "arrived.png", 9)
    build_index(growing)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = client.post("/v1/search", json={"text": "a dog"})
        assert answer.status_code == 200
        if answer.json()["version"]["generation"] > before:
            break
        time.sleep(0.05)
    described = client.get("/v1/indexes").json()["indexes"][0]
    assert described["version"]["generation"] > before and described["swaps"] == 1
    upload = client.post(
        "/v1/search/image",
        files={"file": ("q.png", new.read_bytes(), "image/png")},
        data={"target": "images", "k": "1"},
    ).json()
    assert upload["hits"][0]["path"] == str(new)


def test_decode_refuses_what_the_indexer_refuses() -> None:
    from retrieval.model.imaging import decode_image

    with pytest.raises(InputError, match="pixel limit"):
        decode_image(_bomb_png(), name="upload")
    with pytest.raises(InputError, match="upload: cannot decode"):
        decode_image(b"GIF89a broken", name="upload")
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(png_bytes(rgba)).getpixel((0, 0)) == (255, 255, 255)  # alpha over white


def test_the_serve_command_refuses_bad_settings_in_one_line(
    built: BuildConfig, tmp_path: Path, capsys
) -> None:
    from retrieval.cli import app, run

    for args, message in [
        (["--index", str(tmp_path / "missing")], "no such folder"),
        (["--index", str(built.out), "--host", "0.0.0.0"], "--api-key"),
        (["--index", str(built.out), "--max-batch", "0"], "--max-batch must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            run(app, ["serve", *args])
        assert stopped.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.startswith("error:") and "Traceback" not in err


def test_composed_folded_and_calibrated_searches(client: TestClient, built: BuildConfig) -> None:
    picture = built.images / "photos" / "big.jpg"
    encoded = base64.b64encode(picture.read_bytes()).decode()
    with Retriever.open(built.out, device="cpu") as r:
        composed = r.search_composed(["a dog", f"2:{picture}"], ["a red car"], k=5)
        folded = r.search_text("a dog", k=5, dedup=0.99)
        sure = r.search_text("a dog", k=5, min_confidence=0.5)
        weird = r.search_composed(["a dog", Term(text="/etc/passwd", weight=2)], k=3)
    body = {"text": "a dog", "plus": [{"image": encoded, "weight": 2}], "minus": ["a red car"], "k": 5}
    answer = client.post("/v1/search", json=body).json()
    assert as_pairs(answer["hits"]) == library_pairs(composed)
    assert [h.get("confidence") for h in answer["hits"]] == [h.confidence for h in composed] == [None] * 5
    by_dedup = client.post("/v1/search", json={"text": "a dog", "k": 5, "dedup": 0.99}).json()["hits"]
    assert as_pairs(by_dedup) == library_pairs(folded)
    assert [h.get("near_duplicates", []) for h in by_dedup] == [
        h.fields.get("near_duplicates", []) for h in folded
    ]
    floor = client.post("/v1/search", json={"text": "a dog", "k": 5, "min_confidence": 0.5}).json()["hits"]
    assert as_pairs(floor) == library_pairs(sure)
    nothing = client.post("/v1/search", json={"text": "a dog", "k": 5, "min_confidence": 1.0}).json()
    assert nothing["hits"] == []
    # A string names no file of the server's: "/etc/passwd" is searched as words.
    text_only = client.post("/v1/search", json={"text": "a dog", "plus": ["2:/etc/passwd"], "k": 3}).json()
    assert as_pairs(text_only["hits"]) == library_pairs(weird)
    by_id = client.post("/v1/search", json={"text": "a dog", "plus": [{"id": composed[0].id}], "k": 3})
    assert by_id.status_code == 200
    # Stored images as parts of an image query: measured as image queries.
    rows = {"id": composed[0].id, "collection": "images", "target": "images", "k": 3, "min_confidence": 0.0}
    images = client.post("/v1/search", json=rows | {"plus": [{"id": composed[1].id, "weight": 3}]}).json()
    assert len(images["hits"]) == 3 and all("confidence" in h for h in images["hits"])
    mixed = {"text": "a dog", "plus": [{"id": composed[0].id}], "min_confidence": 0.5}
    assert "both texts and images" in error_of(client.post("/v1/search", json=mixed), 422)
    upload = client.post(
        "/v1/search/image",
        files={"file": ("q.jpg", picture.read_bytes(), "image/jpeg")},
        data={"k": "3", "target": "images", "plus": "a dog", "dedup": "0.99"},
    )
    assert upload.status_code == 200 and len(upload.json()["hits"]) == 3
    assert "weight" in error_of(
        client.post("/v1/search", json={"text": "a", "plus": [{"text": "b", "weight": 0}]}), 422
    )
    assert "exactly one" in error_of(
        client.post("/v1/search", json={"text": "a", "plus": [{"weight": 2}]}), 422
    )
    assert "cancel" in error_of(client.post("/v1/search", json={"text": "a dog", "minus": ["a dog"]}), 422)
    assert "dedup" in error_of(client.post("/v1/search", json={"text": "a", "dedup": 3}), 422)
    assert "no images with id" in error_of(
        client.post("/v1/search", json={"text": "a", "plus": [{"id": 10**6}]}), 404
    )
