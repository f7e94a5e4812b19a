"""``retrieval serve`` as users run it: a real uvicorn process on a loopback port, searched by a
bounded client loop while ``index build`` adds and deletes files and commits. No request may
fail, and the new rows are found once the service has swapped to the new version."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from served import Served
from stores import build_args
from test_service import build

from retrieval.client import Client, ServiceCallError


def test_a_build_commits_while_clients_search_without_one_failed_request(
    tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]
) -> None:
    config = build(tmp_path, checkpoint, towers)
    with Served(config.out, "--poll-seconds", "0.2", log=tmp_path / "serve.log") as served:
        served.wait_ready()
        with Client(served.url) as client:
            generation = client.indexes()[0]["version"]["generation"]
            failures: list[str] = []
            seen: set[int] = set()
            done = threading.Event()

            def search_loop() -> None:
                # Bounded: at most 2,000 requests or 120 s, whichever comes first.
                deadline = time.monotonic() + 120
                with httpx.Client(base_url=served.url, timeout=30) as http:
                    for number in range(2000):
                        if done.is_set() or time.monotonic() > deadline:
                            return
                        body = {"text": ["a dog", "a red car", "people"][number % 3], "k": 5}
                        try:
                            response = http.post("/v1/search", json=body)
                        except httpx.HTTPError as e:
                            failures.append(f"{type(e).__name__}: {e}")
                            continue
                        if response.status_code != 200:
                            failures.append(f"{response.status_code}: {response.text}")
                            continue
                        seen.add(response.json()["version"]["generation"])

            loops = [threading.Thread(target=search_loop) for _ in range(3)]
            for loop in loops:
                loop.start()
            rng = np.random.default_rng(3)
            added = []
            for n in range(3):
                path = config.images / f"arrived-{n}.png"
                Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
                added.append(path)
            (config.images / "pic.bmp").unlink()
            (config.images / "scan.tiff").unlink()
            built = subprocess.run(build_args(config), capture_output=True, text=True)
            assert built.returncode == 0, built.stderr
            deadline = time.monotonic() + 60
            while max(seen, default=generation) <= generation and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # a little more traffic on the new version
            done.set()
            for loop in loops:
                loop.join()

            assert not failures, failures[:5]
            assert max(seen) > generation  # the swap happened while they searched
            for path in added:
                hits = client.search_image(path, k=1, target="images")
                assert hits[0].path == str(path)
            paths = [h.path for h in client.search_text("anything", k=100)]
            assert not any(p.endswith(("pic.bmp", "scan.tiff")) for p in paths)
            with pytest.raises(ServiceCallError, match="at most") as refused:
                client.search_text("a", k=10**9)
            assert refused.value.status == 422
        # SIGTERM: a graceful shutdown (uvicorn then re-raises the signal, as a stopped server should).
        assert served.stop() in (0, -15)
    log = (tmp_path / "serve.log").read_text()
    assert "now serving generation" in log and "Application shutdown complete" in log


def test_the_client_mirrors_the_library(tmp_path: Path, checkpoint: Path, towers: tuple[Path, Path]) -> None:
    from retrieval import Retriever

    config = build(tmp_path, checkpoint, towers)
    picture = config.images / "photos" / "rotated.jpg"
    with Retriever.open(config.out, device="cpu") as r:
        ids, scores = r.search_texts(["a dog", "a cat"], k=3)
        by_image = r.search_image(picture, k=2)
        vectors = r.encode_texts(["a dog"])
        vector_ids, _ = r.search_vectors(vectors, k=3, target="captions")
    with Served(config.out, "--api-key", "k3y", log=tmp_path / "serve.log") as served:
        served.wait_ready()
        with Client(served.url, api_key="k3y") as client:
            got_ids, got_scores = client.search_texts(["a dog", "a cat"], k=3)
            assert (got_ids == ids).all() and np.allclose(got_scores, scores, atol=1e-5)
            assert [h.id for h in client.search_image(picture, k=2)] == [h.id for h in by_image]
            assert (client.search_vectors(vectors, k=3, target="captions")[0] == vector_ids).all()
            assert np.allclose(client.embed_texts(["a dog"]), vectors, atol=1e-5)
            hits = client.search_text("a dog", k=2, target="captions")
            assert hits[0].collection == "captions" and hits[0].text
        with Client(served.url) as keyless:
            with pytest.raises(ServiceCallError) as refused:
                keyless.search_text("a dog")
            assert refused.value.status == 401
