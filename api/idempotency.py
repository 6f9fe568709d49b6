"""The backend's half of exactly-once (docs/CONTRACT.md §11): an Idempotency-Key is processed once.

The proxy derives the key from the CoAP exchange, so every retransmission of one message carries
the same key, whichever proxy replica forwards it. This matters when a proxy dies after
forwarding but before remembering its answer: the retransmission reaches another replica,
which forwards it again, and this store answers 204 without publishing a second time.

Records follow ``policies.dedup``: claimed while the message is being published (a lease, so
a crashed API replica cannot block a key for long), then the HTTP status it was answered with,
kept as long as a CoAP exchange lives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from api.errors import StoreUnavailable
from links.deferred import Deferred
from links.redis import REDIS_ERRORS, RedisConnection, connect
from links.redis_url import parse_redis_url
from links.resp import RespError, ScriptLink, address_of
from policies import dedup
from policies.keys import idempotency_record_key

log = logging.getLogger(__name__)

# What a failed call raises: redis-py's errors and the link's (LinkDown is an OSError).
STORE_ERRORS = (*REDIS_ERRORS, RespError)

LEASE_MS = 10_000  # longer than a publish can take (mqtt_publish_timeout 5 s)
LIFETIME_MS = 247_000  # EXCHANGE_LIFETIME (RFC 7252 §4.8.2)

Claimed = dedup.Owned | dedup.Busy | bytes


class IdempotencyStore(Protocol):
    async def claim(self, keys: list[str]) -> list[Claimed]:
        """Claim each key: OWNED, BUSY, or the status answered before (e.g. b"204")."""
        ...

    async def settle(self, answered: list[tuple[str, bytes]], released: list[str]) -> None:
        """Record answers; drop the claims of messages that failed, so a retry can proceed.

        May return before the records are written (Redis: they go with the next claim); a
        claim made afterwards always sees them."""
        ...

    async def close(self) -> None: ...


class MemoryIdempotencyStore:
    """One process's memory (``coap-bridge up`` without Redis)."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[float, bytes]] = {}  # key → (expires at, record)

    async def claim(self, keys: list[str]) -> list[Claimed]:
        now = time.monotonic()
        if len(self._records) > 4096 and len(self._records) % 1024 == 0:
            self._records = {k: v for k, v in self._records.items() if v[0] > now}
        results: list[Claimed] = []
        for key in keys:
            found = self._records.get(key)
            if found is None or found[0] <= now:
                self._records[key] = (now + LEASE_MS / 1000, dedup.CLAIM)
                results.append(dedup.OWNED)
            else:
                results.append(dedup.read_claim(found[1]))
        return results

    async def settle(self, answered: list[tuple[str, bytes]], released: list[str]) -> None:
        expires = time.monotonic() + LIFETIME_MS / 1000
        for key, status in answered:
            self._records[key] = (expires, dedup.DONE + status)
        for key in released:
            if self._records.get(key, (0.0, b""))[1] == dedup.CLAIM:
                del self._records[key]

    async def close(self) -> None:
        self._records.clear()


class RedisIdempotencyStore:
    """Shared by every API replica; one script call per batch (``policies.dedup``).

    Settling is deferred: the records of answered batches are written with the next batch's
    claims, in the same script call and before them (so a retransmission claimed there finds
    its answer), or after ``settle_delay`` if no claim comes first. Under load that saves a
    whole Redis call per batch (~150 µs of redis-py in this single-threaded process); the cost
    is that a claim lapses ``settle_delay`` later than it could if this process dies meanwhile,
    the same window as dying between publishing and settling.

    On a Redis Cluster (``…?cluster=1``) the records of one batch live on different slots,
    which one script cannot span: the batch is then a pipeline of the same SETs (the release
    of a claim, a compare-and-delete, is a one-key script). redis-py sends each node its share
    in one write.
    """

    def __init__(
        self,
        connection: RedisConnection,
        *,
        prefix: str,
        settle_delay: float = 0.02,
        scripts: ScriptLink | None = None,
    ) -> None:
        """``scripts``: our own connection to the same server for the script calls of the
        hot path (one per batch); redis-py's ``connection`` serves the rest."""
        self._connection = connection
        self._deferred: Deferred[dedup.RecordOp] = Deferred(settle_delay, self._write_deferred)
        self._writing: set[asyncio.Task[None]] = set()
        self._client: Any = connection.client
        self._prefix = prefix
        self._cluster = connection.cluster
        self._registered: dict[str, Any] = {}
        self._link = scripts

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str, settle_delay: float = 0.02
    ) -> RedisIdempotencyStore:
        """``url``: one server, ``redis+sentinel://…`` or a Cluster (``…?cluster=1``). Script
        calls to one server without TLS go over :class:`links.resp.ScriptLink`: through
        redis-py each cost ~90 µs more CPU (links/resp.py), once per batch. The link does not
        retry a failed call (redis-py here retries on its default schedule): the batch is
        answered 503, the device sends again, and the next call opens a new connection."""
        target = parse_redis_url(url)
        connection = connect(target, timeout=2.0, retries=None)
        address = address_of(target.url) if target.kind == "single" else None
        scripts = None if address is None else ScriptLink(address, wait_limit=2.0)
        return cls(connection, prefix=prefix, settle_delay=settle_delay, scripts=scripts)

    async def _run(self, ops: list[dedup.RecordOp]) -> list[Any]:
        if not ops:
            return []
        keyed = [
            (op, idempotency_record_key(key, self._prefix), value, ttl)
            for op, key, value, ttl in ops
        ]
        try:
            replies: list[Any] = await (
                self._pipelined(keyed) if self._cluster else self._scripted(keyed)
            )
        except STORE_ERRORS as exc:
            raise StoreUnavailable(f"idempotency store unavailable: {exc}") from exc
        return replies

    async def _scripted(self, ops: list[dedup.RecordOp]) -> list[Any]:
        keys = [key for _, key, _, _ in ops]
        return await self._run_script(dedup.BATCH_SCRIPT, keys, dedup.record_argv(ops))

    async def _run_script(
        self, script: str, keys: list[str], args: Sequence[bytes | int | str]
    ) -> list[Any]:
        """``script`` on our link if there is one, else through redis-py; its reply, a list.
        Raises what :data:`STORE_ERRORS` lists."""
        if self._link is not None:
            reply = await self._link.run(script, keys, args)
            if not isinstance(reply, list):
                raise RespError(f"script answered {reply!r:.80}")
            return reply
        runner = self._registered.get(script)
        if runner is None:
            runner = self._registered[script] = self._client.register_script(script)
        replies: list[Any] = await runner(keys=keys, args=list(args))
        return replies

    async def _pipelined(self, ops: list[dedup.RecordOp]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for op, key, value, ttl in ops:
                if op == dedup.CLAIM:
                    pipe.set(key, dedup.CLAIM, nx=True, px=ttl, get=True)
                elif op == dedup.ANSWER:
                    pipe.set(key, value, px=ttl)
                else:
                    pipe.eval(dedup.RELEASE_SCRIPT, 1, key)
            replies: list[Any] = await pipe.execute()
        return replies

    @property
    def cluster(self) -> bool:
        return self._cluster

    async def claim_alongside(
        self,
        keys: Sequence[str],
        script: str,
        lookup_keys: list[str],
        lookup_args: list[bytes | int | str],
    ) -> tuple[list[Any], list[Claimed]]:
        """:meth:`claim` inside ``script``, one call with the reads it makes first: ``script``
        takes ``lookup_keys`` then the record keys as KEYS, ``lookup_args`` then (op, value,
        ttl) per record as ARGV, and replies the lookups' replies then the records', like
        ``policies.dedup.BATCH_SCRIPT`` (api/admission.py). Not on a Cluster."""
        if self._cluster:
            raise StoreUnavailable("one script cannot span a Cluster's slots")
        deferred = self._deferred.take()
        ops = deferred + [(dedup.CLAIM, key, b"", LEASE_MS) for key in keys]
        args = [*lookup_args, *dedup.record_argv(ops)]
        record_keys = [idempotency_record_key(key, self._prefix) for _, key, _, _ in ops]
        try:
            replies = await self._run_script(script, lookup_keys + record_keys, args)
        except STORE_ERRORS as exc:
            if deferred:
                log.warning("idempotency records not written (claims lapse): %s", exc)
            raise StoreUnavailable(f"store unavailable: {exc}") from exc
        claimed = replies[len(lookup_keys) + len(deferred) :]
        return replies[: len(lookup_keys)], [dedup.read_claim(reply) for reply in claimed]

    async def claim(self, keys: list[str]) -> list[Claimed]:
        deferred = self._deferred.take()
        ops = deferred + [(dedup.CLAIM, key, b"", LEASE_MS) for key in keys]
        try:
            replies = await self._run(ops)
        except StoreUnavailable as exc:
            if deferred:
                log.warning("idempotency records not written (claims lapse): %s", exc)
            raise
        return [dedup.read_claim(reply) for reply in replies[len(deferred) :]]

    async def settle(self, answered: list[tuple[str, bytes]], released: list[str]) -> None:
        ops = [(dedup.ANSWER, key, dedup.DONE + status, LIFETIME_MS) for key, status in answered]
        ops += [(dedup.RELEASE, key, b"", 0) for key in released]
        self._deferred.add_all(ops)

    def _write_deferred(self, ops: list[dedup.RecordOp]) -> None:
        """No claim came to carry them: the records go on their own."""
        task = asyncio.get_running_loop().create_task(self._write(ops))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, ops: list[dedup.RecordOp]) -> None:
        try:
            await self._run(ops)
        except StoreUnavailable as exc:
            log.warning("idempotency records not written (claims lapse after their lease): %s", exc)

    async def close(self) -> None:
        ops = self._deferred.take()
        if ops:
            await self._write(ops)
        if self._writing:
            await asyncio.gather(*list(self._writing))
        if self._link is not None:
            self._link.close()
        await self._connection.aclose()
