"""Group commit, generically: callers submit one item each; items travel together.

A lone item is flushed at once (on the event loop's next turn, so that items submitted in the
same turn — one burst of datagrams, the answers of one batch resuming their callers — go
together), so light load keeps its latency. Items submitted while ``max_concurrency`` flushes
are already in flight wait, and all of them (up to ``max_batch``) go in the next flush. Under
load a batch grows by itself to whatever arrived during one round trip, so the fixed cost of a
round trip (an HTTP request, a Redis pipeline) is paid once per batch instead of once per item.

Measured on the E chain (64 clients, BENCHMARKS.md): launching the first item at once split
every burst into a batch of 1 and a batch of the rest, which then waited a whole round trip
(median HTTP batch 1 item, mean 15); flushing on the next turn gave batches of 32 and 1.4× the
throughput. One flush in flight per target beat two (two halved the batches and made the API
interleave them).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    def __init__(
        self,
        flush: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        max_batch: int = 256,
        max_concurrency: int = 1,
        name: str = "batch",
    ) -> None:
        """``flush`` answers a list of items with one result per item, in order; an exception
        it raises becomes every item's exception."""
        self._flush = flush
        self._max_batch = max_batch
        self._max_concurrency = max_concurrency
        self._name = name
        self._waiting: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._in_flight = 0
        self._launch_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.flushes = 0
        self.items = 0

    async def submit(self, item: Item) -> Result:
        return await self.submit_nowait(item)

    def submit_nowait(self, item: Item) -> asyncio.Future[Result]:
        """Queue ``item`` without waiting; the caller may attach callbacks to the future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, future))
        if self._in_flight < self._max_concurrency and not self._launch_scheduled:
            self._launch_scheduled = True
            loop.call_soon(self._scheduled_launch)
        return future

    def _scheduled_launch(self) -> None:
        self._launch_scheduled = False
        if self._waiting and self._in_flight < self._max_concurrency:
            self._launch()

    def _launch(self) -> None:
        waiting = self._waiting
        group = [waiting.popleft() for _ in range(min(len(waiting), self._max_batch))]
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        self.flushes += 1
        self.items += len(group)
        results: list[Result] | None = None
        failure: Exception | None = None
        try:
            results = await self._flush([item for item, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"{self._name}: {len(results)} results for {len(group)} items")
        except Exception as exc:
            if not isinstance(exc, ConnectionError | OSError | TimeoutError):
                log.debug("%s flush failed", self._name, exc_info=True)
            failure = exc
        finally:
            self._in_flight -= 1
            # The next flush starts before this one's callers resume: its task runs first, so
            # its request leaves before they do their work (answering their devices), not after.
            if self._waiting:
                self._launch()
        if failure is not None or results is None:
            for _, future in group:
                if not future.done():
                    future.set_exception(failure or RuntimeError(f"{self._name}: no results"))
            return
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
