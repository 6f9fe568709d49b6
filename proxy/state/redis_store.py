"""The :class:`DedupStore` in Redis, shared by every proxy replica (docs/CONTRACT.md §5, issue #4).

One key per exchange (``policies.keys.dedup_key``). A claim is ``SET key "c" NX PX lease GET``:
atomic, one command, and its reply says everything — nil: ours; ``c``: another replica is on
it; ``d…``: the answer, to replay. An answer is ``SET key "d"+bytes PX lifetime``.

Claims queue together (proxy/coalesce.py), answers ride with them (see RedisDedupStore),
and each batch is ONE call of ``policies.dedup.BATCH_SCRIPT``, which runs those SETs in
order: one socket write and one reply per batch, because per-command packing and each socket
write cost far more than the Redis work (docs/ARCHITECTURE.md, "Group commit"). On one server
the call goes over our own connection (links/resp.py; docs/ARCHITECTURE.md, "Own wire clients
on the hot path"). Sentinel and TLS go through redis-py; on Redis Cluster, whose scripts cannot
span slots, the batch is a pipeline of the same SETs.

redis-py's and the link's exceptions stay in this module: they become
:class:`DedupUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from links.deferred import Deferred
from links.redis import REDIS_ERRORS, RedisConnection, connect
from links.redis_url import parse_redis_url
from links.resp import Address, RespError, ScriptLink, address_of
from policies import dedup
from policies.dedup import RecordOp
from proxy.coalesce import Coalescer
from proxy.state.base import Claim, ClaimResult, DedupUnavailable

log = logging.getLogger(__name__)


class RedisDedupStore:
    """Answers travel with claims: :meth:`complete` only queues its record, and the next batch
    of claims carries it, ahead of them in the same call (so a retransmission claimed there
    replays the answer), or after ``answer_delay`` if no claim comes first. Measured in the
    latency scenario: a third of the batches held answers only, and every claim arriving
    while one of them was in flight waited for it. The price: for up to ``answer_delay`` a
    retransmission reaching another replica finds the claim, not the answer, and is left
    unanswered until the device sends it again (as while the request is being served).

    How a batch reaches Redis is the ``batches`` runner's business: :class:`LinkBatches`
    (one server), :class:`ScriptBatches` (Sentinel, TLS: redis-py) or
    :class:`PipelineBatches` (Cluster); :meth:`from_url` picks one."""

    def __init__(
        self, batches: Batches, *, max_batch: int = 512, answer_delay: float = 0.02
    ) -> None:
        self._batches = batches
        self._ops: Coalescer[RecordOp, ClaimResult | None] = Coalescer(
            self._run_batch, max_batch=max_batch, max_concurrency=1, name="dedup"
        )
        self._answers: Deferred[RecordOp] = Deferred(answer_delay, self._send_answers)
        self._pending: set[asyncio.Future[ClaimResult | None]] = set()

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 1.0, answer_delay: float = 0.02
    ) -> RedisDedupStore:
        return cls(batches_for(url, timeout=timeout), answer_delay=answer_delay)

    async def claim(self, key: str, lease: float) -> ClaimResult:
        result = await self._ops.submit((dedup.CLAIM, key, b"", max(1, int(lease * 1000))))
        assert result is not None  # a claim always answers
        return result

    def complete(self, key: str, response: bytes, lifetime: float) -> None:
        self._answers.add((dedup.ANSWER, key, dedup.DONE + response, int(lifetime * 1000)))

    def _send_answers(self, answers: list[RecordOp]) -> None:
        """No claim came to carry them: the answers go on their own."""
        for op in answers:
            future = self._ops.submit_nowait(op)
            self._pending.add(future)
            future.add_done_callback(self._answered)

    def _answered(self, future: asyncio.Future[ClaimResult | None]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.debug("dedup answer not stored: %s", exc)

    async def flush(self) -> None:
        """Write every queued answer now."""
        self._send_answers(self._answers.take())
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        await self._batches.close()

    async def _run_batch(self, claims: list[RecordOp]) -> list[ClaimResult | None]:
        answers = self._answers.take()
        ops = answers + claims
        try:
            replies = await self._batches.run(ops)
        except (*REDIS_ERRORS, RespError) as exc:
            if answers:
                log.debug("dedup answers not stored: %s", exc)
            raise DedupUnavailable(f"redis: {exc}") from exc
        return [
            _claim_result(reply) if op == dedup.CLAIM else None
            for (op, _, _, _), reply in zip(claims, replies[len(answers) :], strict=True)
        ]


class Batches(Protocol):
    """Runs a batch of record operations in Redis, in order: one reply per operation."""

    async def run(self, ops: list[RecordOp]) -> list[Any]: ...

    async def close(self) -> None: ...


def batches_for(url: str, *, timeout: float = 1.0) -> Batches:
    """Our own link for one server without TLS; redis-py for the rest."""
    target = parse_redis_url(url)
    if target.kind == "single" and (address := address_of(target.url)) is not None:
        return LinkBatches(address, timeout=timeout)
    # No retries inside redis-py: a failed call is answered by falling back to local dedup,
    # which is better for the device than waiting through a retry schedule.
    connection = connect(target, timeout=timeout, retries=0)
    if connection.cluster:
        return PipelineBatches(connection)
    return ScriptBatches(connection)


def _script_args(ops: list[RecordOp]) -> tuple[list[str], list[bytes | int]]:
    return [key for _, key, _, _ in ops], dedup.record_argv(ops)


class LinkBatches:
    """``BATCH_SCRIPT`` over our own connection (:class:`links.resp.ScriptLink`)."""

    def __init__(self, address: Address, *, timeout: float = 1.0) -> None:
        self._scripts = ScriptLink(address, wait_limit=timeout)

    async def run(self, ops: list[RecordOp]) -> list[Any]:
        keys, args = _script_args(ops)
        reply = await self._scripts.run(dedup.BATCH_SCRIPT, keys, args)
        if not isinstance(reply, list) or len(reply) != len(ops):
            raise RespError(f"batch script answered {reply!r:.80}")
        return reply

    async def close(self) -> None:
        self._scripts.close()


class ScriptBatches:
    """``BATCH_SCRIPT`` through redis-py (Sentinel, TLS)."""

    def __init__(self, connection: RedisConnection) -> None:
        self._connection = connection
        self._script = connection.client.register_script(dedup.BATCH_SCRIPT)

    async def run(self, ops: list[RecordOp]) -> list[Any]:
        keys, args = _script_args(ops)
        replies: list[Any] = await self._script(keys=keys, args=args)
        return replies

    async def close(self) -> None:
        await self._connection.aclose()


class PipelineBatches:
    """The same SETs as a pipeline: a Cluster's scripts cannot span slots."""

    def __init__(self, connection: RedisConnection) -> None:
        self._connection = connection
        self._client: Any = connection.client

    async def run(self, ops: list[RecordOp]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for op, key, value, ttl_ms in ops:
                if op == dedup.CLAIM:
                    pipe.set(key, dedup.CLAIM, nx=True, px=ttl_ms, get=True)
                else:
                    pipe.set(key, value, px=ttl_ms)
            replies: list[Any] = await pipe.execute()
        return replies

    async def close(self) -> None:
        await self._connection.aclose()


def _claim_result(reply: Any) -> ClaimResult:
    outcome = dedup.read_claim(reply)
    if outcome is dedup.OWNED:
        return Claim.OWNED
    if outcome is dedup.BUSY:
        return Claim.BUSY
    assert isinstance(outcome, bytes)
    return outcome
