"""Group commit for upstream calls (policies/batch.py).

A lone request goes out at once, so light load keeps its latency. Requests that arrive while
``max_concurrency`` calls to the same batch target are already in flight wait, and all of them
(up to ``max_batch``) travel together in the next call. Under load the batch grows by itself
to whatever arrived during one round trip: the HTTP request, the API's work and the MQTT
PUBACKs are paid once per batch instead of once per device message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from policies import batch
from policies.batch import BatchFormatError, BatchItem
from proxy.errors import ProxyError
from proxy.upstream import Upstream

log = logging.getLogger(__name__)

Outcome = tuple[int, str | None]  # HTTP status for the item, Retry-After of its batch


class GroupCommit:
    def __init__(
        self,
        upstream: Upstream,
        url: str,
        headers: dict[str, str],
        *,
        max_batch: int = 256,
        max_concurrency: int = 2,
    ) -> None:
        self._upstream = upstream
        self._url = url
        self._headers = {**headers, "Content-Type": batch.BATCH_CONTENT_TYPE}
        self._max_batch = max_batch
        self._max_concurrency = max_concurrency
        self._waiting: deque[tuple[BatchItem, asyncio.Future[Outcome]]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        self.items = 0

    async def call(self, item: BatchItem) -> Outcome:
        """The HTTP status the batch target gave this item (raises ProxyError like a call)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._in_flight < self._max_concurrency:
            self._launch()
        return await future

    def _launch(self) -> None:
        waiting = self._waiting
        count = min(len(waiting), self._max_batch)
        group = [waiting.popleft() for _ in range(count)]
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[BatchItem, asyncio.Future[Outcome]]]) -> None:
        self.calls += 1
        self.items += len(group)
        try:
            outcomes = await self._exchange([item for item, _ in group])
        except ProxyError as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
        except Exception as exc:  # a bug must fail the requests, never leave them hanging
            log.exception("batch call to %s failed", self._url)
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), outcome in zip(group, outcomes, strict=True):
                if not future.done():
                    future.set_result(outcome)
        finally:
            self._in_flight -= 1
            if self._waiting:
                self._launch()

    async def _exchange(self, items: list[BatchItem]) -> list[Outcome]:
        answer = await self._upstream.request(
            "POST", self._url, self._headers, batch.encode_batch(items)
        )
        if answer.status != 200:
            # The batch as a whole was refused (403 bad token, 503 ...): every item shares it.
            return [(answer.status, answer.retry_after)] * len(items)
        try:
            statuses = batch.decode_statuses(answer.body, len(items))
        except BatchFormatError as exc:
            log.warning("batch target %s answered garbage: %s", self._url, exc)
            return [(502, None)] * len(items)  # HTTP 502: translated to 5.02
        return [(code, answer.retry_after) for code in statuses]

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
