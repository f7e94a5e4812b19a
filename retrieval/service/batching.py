"""Coalescing: concurrent requests' queries gathered into one batch for the model thread.

Batches run one at a time on a single worker thread that owns the model and FAISS (so their own
thread pools are never oversubscribed). Once that thread is free, the next batch starts when it
holds ``max_batch`` queries, when no query has arrived for ``quiet`` seconds (the burst is over),
or ``max_wait`` seconds after the model became free or its first query arrived, whichever comes
first. Queries that arrived while a batch ran join the next one; clients answered by that batch
usually send their next query within a few milliseconds, and the quiet gap lets those join too,
so a steady load is served in full batches rather than in halves that take turns. A lone query
waits ``quiet``; none waits more than ``max_wait`` once the model is free. ``max_batch=1`` turns
coalescing off: each query runs alone, in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """``await submit(item)`` -> its result from ``run(batch)`` (a list, one result or exception
    per item, in order), run on ``executor``."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Sequence[Result | Exception]],
        executor: Executor,
        *,
        max_batch: int,
        max_wait: float,
        quiet: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait = max_batch, max_wait
        self.quiet = max_wait if quiet is None else quiet  # (never past max_wait: see _gather)
        self.on_batch = on_batch or (lambda size: None)
        self._waiting: list[tuple[Item, asyncio.Future[Result], float]] = []
        self._running: list[asyncio.Future[Result]] = []  # the batch on the worker thread now
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._gather())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for future in [*self._running, *(f for _, f, _ in self._waiting)]:
            if not future.done():
                future.set_exception(RuntimeError("the service is shutting down"))
        self._waiting.clear()
        self._running = []

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, time.monotonic()))
        self._arrived.set()
        return await future

    async def submit_many(self, items: Sequence[Item]) -> list[Result | BaseException]:
        """Several items at once (a batch request): they join batches like any others."""
        return await asyncio.gather(*(self.submit(item) for item in items), return_exceptions=True)

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            free = time.monotonic()  # the model thread is idle from here
            deadline = max(free, self._waiting[0][2]) + self.max_wait
            while len(self._waiting) < self.max_batch:
                lull = max(free, self._waiting[-1][2]) + self.quiet  # no arrival since then
                left = min(deadline, lull) - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            live = [(item, future) for item, future, _ in batch if not future.done()]  # not cancelled
            if not live:
                continue
            self.on_batch(len(live))
            self._running = [future for _, future in live]
            try:
                results = await loop.run_in_executor(self.executor, self.run, [item for item, _ in live])
            except Exception as e:
                results = [e] * len(live)
            self._running = []  # (left set when cancelled: stop() fails them)
            for (_, future), result in zip(live, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
