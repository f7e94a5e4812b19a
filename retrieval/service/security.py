"""The request guards: the API key, the body size limit, and the per-request metrics.

The key is compared in constant time (``hmac.compare_digest``) and read from
``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. The body limit is pure ASGI, so it answers 413
before any handler parses a byte: from ``Content-Length`` when the client sends one, otherwise by
counting the chunks as they arrive.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from fastapi import Request

from retrieval.service.resources import ServiceError

__all__ = ["BodyLimit", "MetricsMiddleware", "require_key"]

Scope = dict[str, Any]


async def require_key(request: Request) -> None:
    """Refuse a request without the configured key (nothing to check when none is configured).

    ``async`` although it never awaits: FastAPI runs a plain function dependency on a worker
    thread, a hop per request that costs more than the check."""
    expected = request.app.state.config.api_key
    if not expected:
        return
    given = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization", "")
    if given is None and authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), str(expected).encode()):
        raise ServiceError(401, "a valid API key is required (Authorization: Bearer KEY, or X-API-Key: KEY)")


async def _send_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over ``limit`` bytes."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = f"the request body is larger than the {self.limit:,}-byte limit"
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await _send_error(send, 413 if length.isdigit() else 400, too_large)
                return
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read the body here, bounded, and hand it on whole.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _send_error(send, 413, too_large)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class MetricsMiddleware:
    """Counts each request by route and status, and times it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (
                "/static" if scope["path"].startswith("/static/") else "other"
            )
            service = getattr(scope["app"].state, "service", None) if "app" in scope else None
            if service is not None:
                service.metrics.requests.labels(endpoint, str(status)).inc()
                service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
