"""Group commit for upstream calls: the batch form of a route (policies/batch.py)."""

from __future__ import annotations

import logging

from policies import batch
from policies.batch import BatchFormatError, BatchItem
from proxy.coalesce import Coalescer
from proxy.upstream import Upstream

log = logging.getLogger(__name__)

Outcome = tuple[int, str | None]  # HTTP status for the item, Retry-After of its batch


class GroupCommit:
    """Device requests bound for one batch target share HTTP calls (see proxy/coalesce.py)."""

    def __init__(
        self,
        upstream: Upstream,
        url: str,
        headers: dict[str, str],
        *,
        max_batch: int = 256,
        max_concurrency: int = 1,
    ) -> None:
        self._upstream = upstream
        self._url = url
        self._headers = {**headers, "Content-Type": batch.BATCH_CONTENT_TYPE}
        self._last_refusal = 0
        self._calls: Coalescer[BatchItem, Outcome] = Coalescer(
            self._exchange, max_batch=max_batch, max_concurrency=max_concurrency, name=url
        )

    @property
    def calls(self) -> int:
        return self._calls.flushes

    @property
    def items(self) -> int:
        return self._calls.items

    async def call(self, item: BatchItem) -> Outcome:
        """The HTTP status the batch target gave this item (raises ProxyError like a call)."""
        return await self._calls.submit(item)

    async def _exchange(self, items: list[BatchItem]) -> list[Outcome]:
        answer = await self._upstream.request(
            "POST", self._url, self._headers, batch.encode_batch(items)
        )
        if answer.status != 200:
            return [self._refused(answer.status, answer.retry_after)] * len(items)
        self._last_refusal = 0
        try:
            statuses = batch.decode_statuses(answer.body, len(items))
        except BatchFormatError as exc:
            log.warning("batch target %s answered garbage: %s", self._url, exc)
            return [(502, None)] * len(items)  # HTTP 502: translated to 5.02
        return [(code, answer.retry_after) for code in statuses]

    def _refused(self, http_status: int, retry_after: str | None) -> Outcome:
        """What each device hears when the batch call as a whole failed.

        A device only sees codes about its own request. A 400/403/413 of the batch call speaks
        about the internal hop (a wrong token, a proxy and backend that disagree on the format
        or the limits): to the device that is a bad gateway, 5.02. Only 503 says something the
        device can act on — come back later — and keeps its Retry-After (→ 5.03 with Max-Age).
        """
        if http_status == 503:
            return (503, retry_after)
        if http_status != self._last_refusal:
            # Once per change of cause, not once per batch: under load this is every call.
            log.warning(
                "batch target %s refused a whole batch with HTTP %d: answering 5.02 "
                "(check proxy_token and the backend's batch limits)",
                self._url,
                http_status,
            )
            self._last_refusal = http_status
        return (502, None)

    async def drain(self) -> None:
        await self._calls.drain()
