"""``Client``: the service's search calls from Python, mirroring ``Retriever``'s.

    from retrieval.client import Client
    with Client("http://127.0.0.1:8000", api_key=...) as c:
        hits = c.search_text("a person walking", k=10)          # list[Hit]
        ids, scores = c.search_texts(["a dog", "a cat"], k=100)  # (n, k) int64, float32

Errors the service answers come back as ``ServiceCallError`` with its status and message.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from retrieval.errors import RetrievalError
from retrieval.search.compose import Term, split_weight
from retrieval.search.hits import Hit

__all__ = ["Client", "ServiceCallError"]

_KNOWN = {"rank", "id", "score", "path", "text", "confidence"}


class ServiceCallError(RetrievalError):
    """The service refused a call: ``status`` (HTTP) and its one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Client:
    """Calls one ``retrieval serve``; ``index`` picks a served index (default: the service's first)."""

    def __init__(
        self, url: str, *, api_key: str | None = None, index: str | None = None, timeout: float = 30.0
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.index = index
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    # -- searches ---------------------------------------------------------------------------------

    def search_text(self, text: str, k: int = 10, target: str = "images", **options: Any) -> list[Hit]:
        return self._hits(
            self._post("/v1/search", self._body(text=text, k=k, target=target, **options)), target
        )

    def search_image(
        self, image: Image.Image | str | Path | bytes, k: int = 10, target: str = "captions", **options: Any
    ) -> list[Hit]:
        body = self._body(image=_base64(image), k=k, target=target, **options)
        return self._hits(self._post("/v1/search", body), target)

    def search_composed(
        self,
        plus: Sequence[Term | str],
        minus: Sequence[Term | str] = (),
        k: int = 10,
        target: str = "images",
        **options: Any,
    ) -> list[Hit]:
        """``Retriever.search_composed`` through the service; a string part is a text
        (``"2:a dog"`` weighted), never a file name: give images as ``Term(image=...)``."""
        if not plus:
            raise ServiceCallError(422, "a composed query needs at least one part to search for")
        first, *rest = [_part(p) for p in plus]
        # The body's own query has weight 1: the others' weights are taken relative to the first's,
        # which the normalised sum does not see.
        scale = first.pop("weight")
        others = [p | {"weight": p["weight"] / scale} for p in rest]
        less = [p | {"weight": p["weight"] / scale} for p in map(_part, minus)]
        body = self._body(**first, k=k, target=target, plus=others or None, minus=less or None, **options)
        return self._hits(self._post("/v1/search", body), target)

    def search_id(
        self, id: int, k: int = 10, target: str = "images", collection: str | None = None
    ) -> list[Hit]:
        """Rows like row ``id`` of ``collection`` (default: ``target``), the row itself left out."""
        body = self._body(id=id, collection=collection or target, k=k, target=target)
        return self._hits(self._post("/v1/search", body), target)

    def search_texts(
        self, texts: Sequence[str], k: int = 100, target: str = "images", **options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries -> ids (n, k) int64 and scores (n, k) float32; -1 pads missing hits."""
        return self._batch([self._body(text=t, k=k, target=target, **options) for t in texts], k)

    def search_vectors(
        self, vectors: np.ndarray, k: int = 10, target: str = "images", **options: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        return self._batch([self._body(vector=v.tolist(), k=k, target=target, **options) for v in vectors], k)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        data = self._post("/v1/embed", {"index": self.index, "texts": list(texts)})
        return np.asarray(data["vectors"], dtype=np.float32)

    def indexes(self) -> list[dict[str, Any]]:
        return self._get("/v1/indexes")["indexes"]

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # -- plumbing ---------------------------------------------------------------------------------

    def _body(self, **fields: Any) -> dict[str, Any]:
        return {"index": self.index, **{k: v for k, v in fields.items() if v is not None}}

    def _batch(self, bodies: list[dict[str, Any]], k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(bodies), k), -1, dtype=np.int64)
        scores = np.full((len(bodies), k), -np.inf, dtype=np.float32)
        if not bodies:
            return ids, scores
        for row, result in enumerate(self._post("/v1/search/batch", {"queries": bodies})["results"]):
            if "error" in result:
                raise ServiceCallError(int(result.get("status", 500)), f"query {row}: {result['error']}")
            hits = result["hits"]
            ids[row, : len(hits)] = [h["id"] for h in hits]
            scores[row, : len(hits)] = [h["score"] for h in hits]
        return ids, scores

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return _checked(self._http.post(path, json=body))

    def _get(self, path: str) -> dict[str, Any]:
        return _checked(self._http.get(path))

    @staticmethod
    def _hits(data: dict[str, Any], target: str) -> list[Hit]:
        return [
            Hit(
                h["rank"],
                h["id"],
                h["score"],
                target,
                path=h.get("path"),
                text=h.get("text"),
                fields={k: v for k, v in h.items() if k not in _KNOWN},
                confidence=h.get("confidence"),
            )
            for h in data["hits"]
        ]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise ServiceCallError(response.status_code, str(message))
    return response.json()


def _part(term: Term | str) -> dict[str, Any]:
    """A query part as the service's body takes it."""
    if isinstance(term, str):
        weight, text = split_weight(term)
        return {"text": text, "weight": weight}
    if term.text is not None:
        return {"text": term.text, "weight": term.weight}
    if term.image is not None:
        return {"image": _base64(term.image), "weight": term.weight}
    return {"vector": np.asarray(term.vector, dtype=np.float32).tolist(), "weight": term.weight}


def _base64(image: Image.Image | str | Path | bytes) -> str:
    if isinstance(image, Image.Image):
        out = io.BytesIO()
        image.save(out, "PNG")
        data = out.getvalue()
    elif isinstance(image, bytes):
        data = image
    else:
        data = Path(image).read_bytes()
    return base64.b64encode(data).decode()
