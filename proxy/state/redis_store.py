"""The :class:`DedupStore` in Redis, shared by every proxy replica (SPEC §4, issue #4).

One key per exchange (``policies.keys.dedup_key``). A claim is ``SET key "c" NX PX lease GET``:
atomic, one command, and its reply says everything — nil: ours; ``c``: another replica is on
it; ``d…``: the answer, to replay. An answer is ``SET key "d"+bytes PX lifetime``. Claims and
answers are pipelined in batches (proxy/coalesce.py), so Redis round trips do not set the pace.

redis-py's exceptions stay in this module: they become :class:`DedupUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.coalesce import Coalescer
from proxy.state.base import Claim, ClaimResult, DedupUnavailable

log = logging.getLogger(__name__)

_CLAIMED = b"c"
_DONE = b"d"


def connect(url: str, *, timeout: float = 1.0) -> Any:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://`` URLs.

    No retries inside redis-py: a failed call is answered by falling back to local dedup, which
    is better for the device than waiting through a retry schedule.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.startswith("redis+sentinel://"):
        return _sentinel_client(url, options)
    if "cluster=1" in url or "cluster=true" in url:
        from redis.asyncio.cluster import RedisCluster

        base = url.replace("?cluster=1", "").replace("?cluster=true", "")
        return RedisCluster.from_url(base, socket_timeout=timeout, socket_connect_timeout=timeout)
    return aioredis.Redis.from_url(url, **options)


def _sentinel_client(url: str, options: dict[str, Any]) -> Any:
    """``redis+sentinel://host1:26379,host2:26379/service_name[/db]``."""
    from redis.asyncio.sentinel import Sentinel

    rest = url.removeprefix("redis+sentinel://")
    hosts, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("redis+sentinel:// URL needs a service name: .../mymaster")
    nodes = []
    for node in hosts.split(","):
        host, _, port = node.rpartition(":")
        nodes.append((host or node, int(port) if port.isdigit() else 26379))
    sentinel = Sentinel(nodes, **options)  # type: ignore[no-untyped-call]
    return sentinel.master_for(service, db=int(db) if db.isdigit() else 0, **options)


class RedisDedupStore:
    def __init__(self, client: Any, *, max_batch: int = 512) -> None:
        self._client = client
        self._claims: Coalescer[tuple[str, int], ClaimResult] = Coalescer(
            self._claim_batch, max_batch=max_batch, max_concurrency=2, name="dedup claims"
        )
        self._answers: Coalescer[tuple[str, bytes, int], None] = Coalescer(
            self._answer_batch, max_batch=max_batch, max_concurrency=2, name="dedup answers"
        )
        self._pending: set[asyncio.Future[None]] = set()

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 1.0) -> RedisDedupStore:
        return cls(connect(url, timeout=timeout))

    async def claim(self, key: str, lease: float) -> ClaimResult:
        return await self._claims.submit((key, max(1, int(lease * 1000))))

    def complete(self, key: str, response: bytes, lifetime: float) -> None:
        future = self._answers.submit_nowait((key, _DONE + response, int(lifetime * 1000)))
        self._pending.add(future)
        future.add_done_callback(self._answered)

    def _answered(self, future: asyncio.Future[None]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.debug("dedup answer not stored: %s", exc)

    async def flush(self) -> None:
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        await self._client.aclose()

    async def _claim_batch(self, items: list[tuple[str, int]]) -> list[ClaimResult]:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, lease_ms in items:
                    pipe.set(key, _CLAIMED, nx=True, px=lease_ms, get=True)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise DedupUnavailable(f"redis: {exc}") from exc
        results: list[ClaimResult] = []
        for reply in replies:
            if reply is None:
                results.append(Claim.OWNED)
            elif reply == _CLAIMED:
                results.append(Claim.BUSY)
            else:
                results.append(bytes(reply[1:]))
        return results

    async def _answer_batch(self, items: list[tuple[str, bytes, int]]) -> list[None]:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value, lifetime_ms in items:
                    pipe.set(key, value, px=lifetime_ms)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise DedupUnavailable(f"redis: {exc}") from exc
        return [None] * len(items)
