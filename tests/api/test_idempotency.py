"""The API's Idempotency-Key records: one contract, in memory and in a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from api.errors import StoreUnavailable
from api.idempotency import IdempotencyStore, MemoryIdempotencyStore, RedisIdempotencyStore
from links.redis import connect
from policies import dedup
from policies.keys import idempotency_record_key
from tests.support.services import RedisServer


@pytest.fixture(params=["memory", "redis", "redis-py"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[IdempotencyStore]:
    """In memory; in Redis with the scripts over our own link (one server); in Redis through
    redis-py alone (what Sentinel and TLS URLs use)."""
    if request.param == "memory":
        built: IdempotencyStore = MemoryIdempotencyStore()
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        if request.param == "redis":
            built = RedisIdempotencyStore.from_url(redis_server.url, prefix="t")
            assert built._link is not None
        else:
            built = RedisIdempotencyStore(
                connect(redis_server.url, timeout=2.0, retries=None), prefix="t"
            )
    yield built
    await built.close()


async def test_claim_answer_release(store: IdempotencyStore) -> None:
    assert await store.claim(["a", "b", "a"]) == [dedup.OWNED, dedup.OWNED, dedup.BUSY]
    await store.settle([("a", b"204")], ["b"])
    assert await store.claim(["a", "b"]) == [b"204", dedup.OWNED]


async def test_release_never_drops_an_answer(store: IdempotencyStore) -> None:
    assert await store.claim(["k"]) == [dedup.OWNED]
    await store.settle([("k", b"204")], [])
    await store.settle([], ["k"])
    assert await store.claim(["k"]) == [b"204"]


async def test_redis_down_is_store_unavailable(redis_server: RedisServer) -> None:
    store = RedisIdempotencyStore.from_url(redis_server.url, prefix="t")
    try:
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.claim(["x"])
    finally:
        redis_server.start()
        await store.close()


async def _record(redis_server: RedisServer, key: str) -> bytes | None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        value: bytes | None = await client.get(idempotency_record_key(key, "t"))
        return value
    finally:
        await client.aclose()


async def test_records_left_alone_are_written_within_the_settle_delay(
    redis_server: RedisServer,
) -> None:
    store = RedisIdempotencyStore.from_url(redis_server.url, prefix="t")
    try:
        await store.claim(["lone"])
        await store.settle([("lone", b"204")], [])
        # Deferred: not yet written, waiting for a claim to travel with...
        assert await _record(redis_server, "lone") == dedup.CLAIM
        # ... and none comes: written on its own shortly after.
        deadline = time.monotonic() + 2.0
        while await _record(redis_server, "lone") != dedup.DONE + b"204":
            assert time.monotonic() < deadline, "deferred record never written"
            await asyncio.sleep(0.01)
    finally:
        await store.close()


async def test_another_replica_sees_records_travelling_with_the_next_claim(
    redis_server: RedisServer,
) -> None:
    one = RedisIdempotencyStore.from_url(redis_server.url, prefix="t", settle_delay=60)
    other = RedisIdempotencyStore.from_url(redis_server.url, prefix="t")
    try:
        assert await one.claim(["m1"]) == [dedup.OWNED]
        await one.settle([("m1", b"204")], [])
        assert await other.claim(["m1"]) == [dedup.BUSY]  # not written yet (delay 60 s)
        assert await one.claim(["m2"]) == [dedup.OWNED]  # carries m1's record first
        assert await other.claim(["m1"]) == [b"204"]
    finally:
        await one.close()
        await other.close()


async def test_closing_writes_what_was_deferred(redis_server: RedisServer) -> None:
    store = RedisIdempotencyStore.from_url(redis_server.url, prefix="t", settle_delay=60)
    await store.claim(["bye", "gone"])
    await store.settle([("bye", b"204")], ["gone"])
    await store.close()
    assert await _record(redis_server, "bye") == dedup.DONE + b"204"
    assert await _record(redis_server, "gone") is None  # the claim was released
