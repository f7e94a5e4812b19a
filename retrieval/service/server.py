"""Running the app: ``serve(config)`` starts uvicorn and returns when it stops (Ctrl-C, SIGTERM).

The indexes load after the server starts listening, so ``/healthz`` answers at once and
``/readyz`` says when search can begin; a first load that fails stops the server and raises.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from retrieval.errors import RetrievalError
from retrieval.service.app import create_app
from retrieval.service.config import ServeConfig

__all__ = ["serve"]

log = logging.getLogger("retrieval.service")


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Serve ``config`` until stopped; ``RetrievalError`` if its indexes cannot be loaded."""
    app = create_app(config)
    settings = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    server = uvicorn.Server(settings)

    async def watch() -> None:
        # Stop the server when the first load fails: a service without its index is no service.
        while not server.should_exit:
            service = getattr(app.state, "service", None)
            if service is not None and (service.ready or service.failure):
                if service.failure:
                    server.should_exit = True
                return
            await asyncio.sleep(0.1)

    async def main() -> None:
        watcher = asyncio.create_task(watch())
        try:
            await server.serve()
        finally:
            watcher.cancel()

    # uvicorn's own loop choice (uvloop where installed), which a plain asyncio.run would skip.
    with asyncio.Runner(loop_factory=settings.get_loop_factory()) as runner:
        runner.run(main())
    service = getattr(app.state, "service", None)
    if service is not None and service.failure:
        raise RetrievalError(f"could not load the indexes: {service.failure}")
