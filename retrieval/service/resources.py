"""``Service``: what the app's handlers work with, made in its lifespan.

It loads the indexes (in the background: ``/healthz`` answers at once, ``/readyz`` once they are
loaded), polls each folder for a new version and swaps it in, runs queries through the coalescer
on the model thread, decodes uploads under the pixel and time limits, and keeps thumbnails.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.errors import ConfigError, InputError, RetrievalError, UnknownIdError
from retrieval.model.imaging import decode_image, open_image
from retrieval.search.compose import Term, split_weight
from retrieval.search.retriever import Target
from retrieval.service.batching import Coalescer
from retrieval.service.config import ServeConfig
from retrieval.service.metrics import Metrics
from retrieval.service.queries import Answer, Query, run_queries
from retrieval.service.schemas import EmbedBody, Part, SearchBody
from retrieval.service.snapshots import EncoderPool, LiveIndex, Snapshot

__all__ = ["Service", "ServiceError", "index_names", "status_of", "vector_array"]

log = logging.getLogger("retrieval.service")
_THUMBNAIL_BYTES = 64 * 2**20  # thumbnails kept in memory


class ServiceError(Exception):
    """An HTTP-level refusal: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def index_names(folders: Sequence[Path]) -> list[str]:
    """Each folder's name in the API: its own name, numbered where two share one."""
    names: list[str] = []
    for folder in folders:
        name = folder.resolve().name or "index"
        while name in names:
            name = f"{name}-{len(names) + 1}"
        names.append(name)
    return names


class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.encoders = EncoderPool(config.model, config.device)
        self.indexes = {
            name: LiveIndex(name, folder, self.encoders)
            for name, folder in zip(index_names(config.indexes), config.indexes, strict=True)
        }
        self.ready = False
        self.failure: str | None = None  # why the first load failed
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="retrieval-model")
        self.decoders = ThreadPoolExecutor(2, thread_name_prefix="retrieval-decode")
        self.readers = ThreadPoolExecutor(4, thread_name_prefix="retrieval-read")
        self.coalescer: Coalescer[Query, Answer] = Coalescer(
            lambda batch: run_queries(batch, self.metrics.observe_stage),
            self.model_thread,
            max_batch=config.max_batch,
            max_wait=config.max_wait_ms / 1000,
            quiet=config.quiet_ms / 1000,
            on_batch=self.metrics.batches.observe,
        )
        self._thumbnails: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._thumbnail_bytes = 0
        self._thumbnail_lock = threading.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._threads_before: tuple[int, int] | None = None

    # -- lifetime --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.coalescer.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._load_then_poll()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.coalescer.stop()
        await asyncio.get_running_loop().run_in_executor(self.model_thread, self._restore_threads)
        for pool in (self.model_thread, self.decoders, self.readers):
            pool.shutdown(wait=True, cancel_futures=True)
        for live in self.indexes.values():
            live.close()
        self.encoders.close()

    async def _load_then_poll(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.model_thread, self._load)
        except Exception as e:
            self.failure = f"{type(e).__name__}: {e}" if not isinstance(e, RetrievalError) else str(e)
            log.error("not ready: %s", self.failure)
            return
        self.ready = True
        log.info("ready: %s", ", ".join(self.indexes))
        while True:
            await asyncio.sleep(self.config.poll_seconds)
            for name, live in self.indexes.items():
                swapped = await loop.run_in_executor(self.readers, live.check)
                if swapped:
                    self.metrics.swaps.labels(name, "swapped").inc()
                elif live.error is not None:
                    self.metrics.swaps.labels(name, "failed").inc()
                self._observe_version(live)

    def _load(self) -> None:
        self._set_threads()
        for live in self.indexes.values():
            live.load()
            self._observe_version(live)

    def _observe_version(self, live: LiveIndex) -> None:
        if live.current is not None:
            self.metrics.versions.labels(live.name).set(live.current.manifest.generation)

    def _set_threads(self) -> None:
        """torch and FAISS threads, set once on the model thread, where all their work runs (and
        set back before it ends)."""
        import faiss
        import torch

        self._threads_before = (torch.get_num_threads(), faiss.omp_get_max_threads())
        torch.set_num_threads(self.config.cores)
        faiss.omp_set_num_threads(self.config.cores)

    def _restore_threads(self) -> None:
        if self._threads_before is not None:
            import faiss
            import torch

            torch.set_num_threads(self._threads_before[0])
            faiss.omp_set_num_threads(self._threads_before[1])

    # -- requests --------------------------------------------------------------------------------

    def live(self, name: str | None) -> LiveIndex:
        if name is None:
            return next(iter(self.indexes.values()))
        if name not in self.indexes:
            raise ServiceError(404, f"no index {name!r}; served: {', '.join(self.indexes)}")
        return self.indexes[name]

    async def decode(self, data: bytes, name: str) -> Image.Image:
        """An upload decoded on the decode pool, under the pixel limit and the time limit."""
        started = time.perf_counter()
        work = asyncio.get_running_loop().run_in_executor(
            self.decoders, decode_image, data, self.config.max_pixels, name
        )
        try:
            image = await asyncio.wait_for(work, self.config.decode_timeout or None)
        except TimeoutError:
            raise ServiceError(
                422, f"{name}: decoding took longer than {self.config.decode_timeout:g} s"
            ) from None
        self.metrics.observe_stage("decode", time.perf_counter() - started)
        return image

    async def decode_base64(self, encoded: str, name: str = "image") -> Image.Image:
        """A base64 image of a request body, decoded as an upload is."""
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ServiceError(422, f"{name} is not valid base64: {e}") from e
        if len(data) > self.config.max_upload_bytes:
            raise ServiceError(413, f"the {name} is larger than {self.config.max_upload_bytes:,} bytes")
        return await self.decode(data, name)

    async def _term(self, snapshot: Snapshot, part: Part | str) -> Term:
        """A part of a composed query -> a ``Term``: a string is a text (``"2:a dog"``: weighted);
        never a file of the server's, whatever the string says."""
        if isinstance(part, str):
            weight, text = split_weight(part)
            return Term(text=text, weight=weight)
        if part.text is not None:
            return Term(text=part.text, weight=part.weight)
        if part.image is not None:
            return Term(image=await self.decode_base64(part.image, "a part's image"), weight=part.weight)
        if part.vector is not None:
            dim = int(snapshot.manifest.model["fingerprint"]["dim"])
            return Term(vector=vector_array(part.vector, dim), weight=part.weight)
        collection = part.collection or "images"
        vectors = await self._read(snapshot.retriever.vectors, [int(part.id or 0)], collection)
        return Term(vector=vectors[0], weight=part.weight, like=collection)

    async def _read(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.readers, function, *args)

    async def query(self, snapshot: Snapshot, body: SearchBody, image: Image.Image | None) -> Query:
        target: Target = body.resolved_target
        if target not in snapshot.collections:
            raise ServiceError(404, f"this index has no searchable {target}")
        if body.k > self.config.max_k:
            raise ServiceError(422, f"k must be at most {self.config.max_k}, got {body.k}")
        allow = None
        if body.where:
            allow = await self._read(snapshot.allowed, target, tuple(body.where))
        if body.allow_ids is not None:
            given = np.asarray(body.allow_ids, dtype=np.int64)
            allow = given if allow is None else np.intersect1d(allow, given)
        common: dict[str, Any] = {"snapshot": snapshot, "target": target, "k": body.k, "allow": allow}
        common["plus"] = tuple([await self._term(snapshot, p) for p in body.plus or []])
        common["minus"] = tuple([await self._term(snapshot, p) for p in body.minus or []])
        common |= {"dedup": body.dedup, "min_confidence": body.min_confidence}
        if body.text is not None:
            return Query(text=body.text, **common)
        if image is not None:
            return Query(image=image, **common)
        if body.vector is not None:
            dim = int(snapshot.manifest.model["fingerprint"]["dim"])
            return Query(vector=vector_array(body.vector, dim), **common)
        return Query(item=(body.collection or target, int(body.id or 0)), **common)

    async def search(self, body: SearchBody, image: Image.Image | None, started: float) -> dict[str, Any]:
        live = self.live(body.index)
        with live.lease() as snapshot:
            answer = await self.coalescer.submit(await self.query(snapshot, body, image))
        return {
            "index": live.name,
            "hits": [hit.to_dict() for hit in answer.hits],
            "version": answer.version,
            "took_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    async def search_batch(
        self, bodies: Sequence[SearchBody], images: list[Image.Image], started: float
    ) -> dict[str, Any]:
        pictures = iter(images)
        with contextlib.ExitStack() as leases:
            snapshots = {}
            queries = []
            for body in bodies:
                live = self.live(body.index)
                if live.name not in snapshots:
                    snapshots[live.name] = leases.enter_context(live.lease())
                image = next(pictures) if body.image is not None else None
                queries.append(await self.query(snapshots[live.name], body, image))
            answers = await self.coalescer.submit_many(queries)
        results = []
        for answer in answers:
            if isinstance(answer, BaseException):
                status = status_of(answer)
                results.append({"error": str(answer), "status": status})
            else:
                results.append({"hits": [h.to_dict() for h in answer.hits], "version": answer.version})
        return {"results": results, "took_ms": round((time.perf_counter() - started) * 1000, 3)}

    async def embed(self, body: EmbedBody, images: list[Image.Image] | None) -> dict[str, Any]:
        live = self.live(body.index)
        with live.lease() as snapshot:
            retriever = snapshot.retriever
            work: Callable[[], np.ndarray]
            if body.texts is not None:
                work = functools.partial(retriever.encode_queries, body.texts)
            else:
                work = functools.partial(retriever.encode_images, images or [])
            vectors = await asyncio.get_running_loop().run_in_executor(self.model_thread, work)
            return {
                "index": live.name,
                "dim": int(vectors.shape[1]),
                "vectors": vectors.tolist(),
                "version": snapshot.version,
            }

    async def item(self, index: str | None, collection: Target, id: int) -> dict[str, Any]:
        live = self.live(index)
        with live.lease() as snapshot:
            if collection not in snapshot.collections:
                raise ServiceError(404, f"this index has no {collection}")
            row = await self._read(snapshot.retriever.item, id, collection)
            return {"index": live.name, "item": row, "version": snapshot.version}

    async def image_file(self, index: str | None, id: int) -> Path:
        live = self.live(index)
        with live.lease() as snapshot:
            path: Path = await self._read(snapshot.retriever.image_file, id, self.config.image_root)
        if not path.is_file():
            raise ServiceError(404, f"image {id}: its file is not there any more")
        return path

    async def thumbnail(self, index: str | None, id: int, size: int) -> bytes:
        path = await self.image_file(index, id)
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, size)
        with self._thumbnail_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        data: bytes = await self._read(self._make_thumbnail, path, size)
        with self._thumbnail_lock:
            self._thumbnails[key] = data
            self._thumbnail_bytes += len(data)
            while self._thumbnail_bytes > _THUMBNAIL_BYTES:
                _, dropped = self._thumbnails.popitem(last=False)
                self._thumbnail_bytes -= len(dropped)
        return data

    def _make_thumbnail(self, path: Path, size: int) -> bytes:
        image = open_image(path, self.config.max_pixels)
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()


def status_of(error: BaseException) -> int:
    """The HTTP status of an error: the library's by type (an unknown id 404, a bad input 422)."""
    if isinstance(error, ServiceError):
        return error.status
    if isinstance(error, UnknownIdError):
        return 404
    return 422 if isinstance(error, InputError | ConfigError) else 500


def vector_array(values: list[float], dim: int) -> np.ndarray:
    """A query vector from JSON: finite, of the index's dimension, made unit norm."""
    vector = np.asarray(values, dtype=np.float32)
    norm = float(np.linalg.norm(vector)) if vector.shape == (dim,) else 0.0
    if vector.shape != (dim,) or not np.all(np.isfinite(vector)) or norm == 0.0:
        raise ServiceError(422, f"vector must be {dim} finite numbers, not all zero")
    return vector / norm
