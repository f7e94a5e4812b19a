"""The coalescer on its own, with a fake batch function: bounded batches and waits, results in
order, one failing item failing alone, and ``max_batch=1`` as coalescing off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from retrieval.service.batching import Coalescer


class Doubler:
    """Doubles each item; an item of -1 fails; records each batch it ran."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.batches: list[list[int]] = []

    def __call__(self, items: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        time.sleep(self.seconds)
        return [ValueError(f"bad item {i}") if i < 0 else 2 * i for i in items]


async def submit_all(coalescer: Coalescer, items: list[int], spacing: float = 0.0) -> list:
    async def one(item: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return await coalescer.submit(item)

    return await asyncio.gather(*(one(i, n * spacing) for n, i in enumerate(items)), return_exceptions=True)


def run(
    max_batch: int, max_wait: float, items: list[int], spacing: float = 0.0, quiet: float | None = None
) -> tuple[list, Doubler]:
    doubler = Doubler()

    async def main() -> list:
        with ThreadPoolExecutor(1) as pool:
            coalescer = Coalescer(doubler, pool, max_batch=max_batch, max_wait=max_wait, quiet=quiet)
            coalescer.start()
            try:
                return await submit_all(coalescer, items, spacing)
            finally:
                await coalescer.stop()

    return asyncio.run(main()), doubler


def test_concurrent_items_share_bounded_batches_and_keep_their_order() -> None:
    results, doubler = run(max_batch=8, max_wait=0.05, items=list(range(30)))
    assert results == [2 * i for i in range(30)]
    assert all(1 <= len(b) <= 8 for b in doubler.batches)
    assert len(doubler.batches) == 4  # 30 items, 8 a batch
    assert sorted(i for b in doubler.batches for i in b) == list(range(30))


def test_a_lone_item_waits_at_most_max_wait() -> None:
    started = time.perf_counter()
    results, doubler = run(max_batch=64, max_wait=0.03, items=[5])
    assert results == [10] and doubler.batches == [[5]]
    assert time.perf_counter() - started < 5  # bounded; the exact wait is the benchmark's business


def test_a_burst_joins_one_batch_and_a_lone_item_waits_only_the_quiet_gap() -> None:
    # Items 2 ms apart, a 100 ms quiet gap: the model is free, yet they all join one batch.
    results, doubler = run(max_batch=64, max_wait=5.0, items=list(range(10)), spacing=0.002, quiet=0.1)
    assert results == [2 * i for i in range(10)] and doubler.batches == [list(range(10))]
    started = time.perf_counter()
    results, doubler = run(max_batch=64, max_wait=30.0, items=[7], quiet=0.01)
    assert results == [14] and time.perf_counter() - started < 15  # the quiet gap, not max_wait


def test_max_wait_bounds_a_steady_trickle() -> None:
    # An item every 10 ms never leaves a 1 s lull: max_wait (50 ms) alone cuts the batches.
    results, doubler = run(max_batch=64, max_wait=0.05, items=list(range(30)), spacing=0.01, quiet=1.0)
    assert results == [2 * i for i in range(30)]
    assert len(doubler.batches) >= 3 and max(len(b) for b in doubler.batches) < 30


def test_one_failing_item_fails_alone() -> None:
    results, _ = run(max_batch=8, max_wait=0.05, items=[1, -1, 3])
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError) and "bad item -1" in str(results[1])


def test_max_batch_one_turns_coalescing_off() -> None:
    results, doubler = run(max_batch=1, max_wait=0.05, items=list(range(6)))
    assert results == [0, 2, 4, 6, 8, 10]
    assert doubler.batches == [[i] for i in range(6)]


def test_items_arriving_while_a_batch_runs_form_the_next_one() -> None:
    # Items 5 ms apart while each batch takes 20 ms: later batches hold the ones that arrived meanwhile.
    results, doubler = run(max_batch=64, max_wait=0.0, items=list(range(12)), spacing=0.005)
    assert results == [2 * i for i in range(12)]
    assert len(doubler.batches) < 12 and max(len(b) for b in doubler.batches) > 1


@pytest.mark.parametrize("max_batch", [1, 4])
def test_stop_fails_what_still_waits(max_batch: int) -> None:
    async def main() -> list:
        with ThreadPoolExecutor(1) as pool:
            coalescer = Coalescer(Doubler(0.2), pool, max_batch=max_batch, max_wait=0.0)
            coalescer.start()
            first = asyncio.ensure_future(coalescer.submit(1))
            await asyncio.sleep(0.05)  # the first batch is running
            waiting = asyncio.ensure_future(coalescer.submit(2))
            await asyncio.sleep(0.01)
            await coalescer.stop()
            return await asyncio.gather(first, waiting, return_exceptions=True)

    for error in asyncio.run(main()):  # the running batch's query and the waiting one
        assert isinstance(error, RuntimeError) and "shutting down" in str(error)
