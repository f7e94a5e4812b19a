"""``create_app(config)``: the FastAPI app of ``retrieval serve`` (SPEC 11).

Resources are made in the lifespan and reach handlers through ``Depends``: the ``Service`` holds
the served indexes, the coalescer, the thread pools and the metrics. Handlers validate, call the
library (on a worker thread, never on the event loop) and shape the response; one set of error
handlers maps the library's exceptions to statuses, always as ``{"error": message}``.

Threads: the model and FAISS run on one worker thread (the coalescer's), with torch and FAISS
set to the machine's cores once, at start, and set back at shutdown; uploads decode on a small
pool of their own, and row, filter and thumbnail reads on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval.errors import RetrievalError
from retrieval.service.config import ServeConfig
from retrieval.service.resources import Service, ServiceError, status_of
from retrieval.service.schemas import BatchBody, EmbedBody, SearchBody
from retrieval.service.security import BodyLimit, MetricsMiddleware, require_key

__all__ = ["create_app"]

log = logging.getLogger("retrieval.service")


def create_app(config: ServeConfig) -> FastAPI:
    """The app for ``config`` (checked first: an unsafe host without a key is refused here)."""
    config = config.check()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(config)
        app.state.service = service
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="retrieval", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    _error_handlers(app)
    app.include_router(_health())
    app.include_router(_api(), dependencies=[Depends(require_key)])
    _ui(app)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware)
    # Bodies hold at most an upload in base64 (4/3 of its bytes) and some JSON around it.
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes * 4 // 3 + 2**20)
    return app


async def service_of(request: Request) -> Service:
    return request.app.state.service


async def ready(service: Annotated[Service, Depends(service_of)]) -> Service:
    if not service.ready:
        raise ServiceError(503, service.failure or "the indexes are still loading")
    return service


Ready = Annotated[Service, Depends(ready)]


def _health() -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz(service: Annotated[Service, Depends(service_of)]) -> JSONResponse:
        if service.ready:
            return JSONResponse({"ready": True, "indexes": list(service.indexes)})
        return JSONResponse({"ready": False, "error": service.failure}, status_code=503)

    return router


def _api() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/indexes")
    async def indexes(service: Ready) -> Response:
        return _json({"indexes": [live.describe() for live in service.indexes.values()]})

    @router.post("/v1/search")
    async def search(body: SearchBody, service: Ready) -> Response:
        started = time.perf_counter()
        image = await _body_image(service, body.image) if body.image is not None else None
        return _json(await service.search(body, image, started))

    @router.post("/v1/search/image")
    async def search_image(
        service: Ready,
        file: Annotated[UploadFile, File(description="The query image.")],
        target: Annotated[str, Form()] = "captions",
        k: Annotated[int, Form(ge=1)] = 10,
        index: Annotated[str | None, Form()] = None,
        where: Annotated[list[str] | None, Form()] = None,
        plus: Annotated[list[str] | None, Form()] = None,
        minus: Annotated[list[str] | None, Form()] = None,
        dedup: Annotated[float | None, Form()] = None,
        min_confidence: Annotated[float | None, Form()] = None,
    ) -> Response:
        started = time.perf_counter()
        data = await file.read(service.config.max_upload_bytes + 1)
        if len(data) > service.config.max_upload_bytes:
            raise ServiceError(413, f"the upload is larger than {service.config.max_upload_bytes:,} bytes")
        # The form's fields as a search body; "image" only marks it an image query (the upload is the image).
        fields: dict[str, Any] = {"index": index, "image": "", "target": target, "k": k, "where": where}
        fields |= {"plus": plus}
        fields |= {"minus": minus, "dedup": dedup, "min_confidence": min_confidence}
        body = SearchBody.model_validate(fields)
        image = await service.decode(data, file.filename or "upload")
        return _json(await service.search(body, image, started))

    @router.post("/v1/search/batch")
    async def search_batch(body: BatchBody, service: Ready) -> Response:
        started = time.perf_counter()
        images = await asyncio.gather(
            *(_body_image(service, q.image) for q in body.queries if q.image is not None)
        )
        return _json(await service.search_batch(body.queries, list(images), started))

    @router.post("/v1/embed")
    async def embed(body: EmbedBody, service: Ready) -> Response:
        images = [await _body_image(service, b) for b in body.images] if body.images is not None else None
        return _json(await service.embed(body, images))

    @router.get("/v1/items/{collection}/{id}")
    async def item(collection: str, id: int, service: Ready, index: str | None = None) -> Response:
        return _json(await service.item(index, _collection(collection), id))

    @router.get("/v1/images/{id}")
    async def image(id: int, service: Ready, size: int | None = None, index: str | None = None) -> Response:
        if size is not None and not 16 <= size <= 1024:
            raise ServiceError(422, "size must be between 16 and 1024")
        if size is None:
            path = await service.image_file(index, id)
            return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})
        data = await service.thumbnail(index, id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/metrics")
    async def metrics(service: Annotated[Service, Depends(service_of)]) -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return router


def _collection(name: str) -> Any:
    if name not in ("images", "captions"):
        raise ServiceError(404, f"no collection {name!r}: images or captions")
    return name


async def _body_image(service: Service, encoded: str | None) -> Any:
    return await service.decode_base64(str(encoded))


def _ui(app: FastAPI) -> None:
    static = resources.files("retrieval.service") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=str(static)), name="static")


def _json(data: Any) -> Response:
    """A JSON response written directly: the handlers' data is plain JSON types already, so
    FastAPI's generic encoder (a large share of a search's time under load) is skipped."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return Response(body.encode(), media_type="application/json")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> JSONResponse:
        return _error(e.status, e.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(e))

    @app.exception_handler(ValidationError)
    async def invalid_fields(request: Request, e: ValidationError) -> JSONResponse:
        return _error(422, _validation_message(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RetrievalError)
    async def library_error(request: Request, e: RetrievalError) -> JSONResponse:
        status = status_of(e)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, e)
        return _error(status, str(e))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, "internal error (the service log has the details)")


def _validation_message(e: RequestValidationError | ValidationError) -> str:
    parts = []
    for error in e.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"
