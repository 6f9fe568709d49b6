"""One contract for every DedupStore: in memory, and in a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from links.redis import connect
from policies import dedup
from proxy.state.base import Claim, DedupStore, DedupUnavailable
from proxy.state.memory import MemoryDedupStore
from proxy.state.redis_store import LinkBatches, RedisDedupStore, ScriptBatches, batches_for
from tests.support.services import RedisServer


@pytest.fixture(params=["memory", "redis", "redis-py"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[DedupStore]:
    """In memory; in Redis over the proxy's own link (one server); in Redis through redis-py
    (what Sentinel and TLS URLs use)."""
    if request.param == "memory":
        built: DedupStore = MemoryDedupStore()
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        if request.param == "redis":
            built = RedisDedupStore.from_url(redis_server.url)
        else:
            built = RedisDedupStore(ScriptBatches(connect(redis_server.url, timeout=1.0)))
    yield built
    await built.close()


async def test_first_claim_owns_and_the_next_sees_it_busy(store: DedupStore) -> None:
    assert await store.claim("k1", lease=5) is Claim.OWNED
    assert await store.claim("k1", lease=5) is Claim.BUSY
    assert await store.claim("k2", lease=5) is Claim.OWNED


async def test_an_answer_is_replayed_byte_exact(store: DedupStore) -> None:
    assert await store.claim("k", lease=5) is Claim.OWNED
    store.complete("k", b"\x60\x44\x12\x34\xde\xad", lifetime=5)
    await store.flush()
    assert await store.claim("k", lease=5) == b"\x60\x44\x12\x34\xde\xad"


async def test_an_empty_answer_is_still_an_answer(store: DedupStore) -> None:
    # A NON's record is empty: duplicates are ignored, but the exchange is not free again.
    assert await store.claim("non", lease=5) is Claim.OWNED
    store.complete("non", b"", lifetime=5)
    await store.flush()
    assert await store.claim("non", lease=5) == b""


async def test_a_lapsed_lease_lets_another_replica_take_over(store: DedupStore) -> None:
    assert await store.claim("dead", lease=0.2) is Claim.OWNED
    await asyncio.sleep(0.35)
    assert await store.claim("dead", lease=5) is Claim.OWNED


async def test_answers_expire_after_their_lifetime(store: DedupStore) -> None:
    assert await store.claim("old", lease=5) is Claim.OWNED
    store.complete("old", b"x", lifetime=0.2)
    await store.flush()
    await asyncio.sleep(0.35)
    assert await store.claim("old", lease=5) is Claim.OWNED


async def test_concurrent_claims_have_exactly_one_owner(store: DedupStore) -> None:
    results = await asyncio.gather(*(store.claim("race", lease=5) for _ in range(50)))
    assert results.count(Claim.OWNED) == 1
    assert results.count(Claim.BUSY) == 49


async def test_redis_down_is_dedup_unavailable_and_recovers(redis_server: RedisServer) -> None:
    store = RedisDedupStore.from_url(redis_server.url, timeout=0.5)
    try:
        assert await store.claim("a", lease=5) is Claim.OWNED
        redis_server.stop()
        with pytest.raises(DedupUnavailable):
            await store.claim("b", lease=5)
        redis_server.start()
        assert await store.claim("c", lease=5) is Claim.OWNED
    finally:
        await store.close()


async def test_redis_memory_per_answered_exchange(redis_server: RedisServer) -> None:
    # Issue #3, target M: at most 150 bytes of Redis memory per remembered exchange
    # (MEMORY USAGE of the key holding a piggybacked 2.04 with a 4-byte token).
    from policies.keys import dedup_key

    store = RedisDedupStore.from_url(redis_server.url)
    try:
        keys = [dedup_key("10.123.45.67", 40000 + n, n) for n in range(100)]
        for key in keys:
            assert await store.claim(key, lease=5) is Claim.OWNED
            store.complete(key, b"\x64\x44\x00\x01\x01\x02\x03\x04", lifetime=247)
        await store.flush()
        # execute() returns the raw RESP integer reply, e.g. b":72\r\n".
        usage = [int(redis_server.execute("MEMORY", "USAGE", key)[1:]) for key in keys]
    finally:
        await store.close()
    assert max(usage) <= 150, usage


async def test_answers_travel_with_the_next_claims_ahead_of_them(
    redis_server: RedisServer,
) -> None:
    one = RedisDedupStore.from_url(redis_server.url, answer_delay=60)
    other = RedisDedupStore.from_url(redis_server.url)
    try:
        assert await one.claim("m1", lease=5) is Claim.OWNED
        one.complete("m1", b"answer-1", lifetime=5)
        assert await other.claim("m1", lease=5) is Claim.BUSY  # queued, not written (60 s)
        calls = one._ops.flushes
        assert await one.claim("m2", lease=5) is Claim.OWNED
        assert one._ops.flushes == calls + 1  # the answer went in the claim's own call
        assert await other.claim("m1", lease=5) == b"answer-1"
        # A retransmission claimed in the same call as its answer gets the answer.
        one.complete("m2", b"answer-2", lifetime=5)
        assert await one.claim("m2", lease=5) == b"answer-2"
    finally:
        await one.close()
        await other.close()


async def test_answers_left_alone_are_written_within_the_delay(redis_server: RedisServer) -> None:
    store = RedisDedupStore.from_url(redis_server.url, answer_delay=0.05)
    other = RedisDedupStore.from_url(redis_server.url)
    try:
        assert await store.claim("alone", lease=5) is Claim.OWNED
        store.complete("alone", b"done", lifetime=5)
        await asyncio.sleep(0.5)  # no flush(), no claim: only the delay can write it
        assert await other.claim("alone", lease=5) == b"done"
    finally:
        await store.close()
        await other.close()


async def test_a_flushed_script_cache_is_reloaded(redis_server: RedisServer) -> None:
    store = RedisDedupStore.from_url(redis_server.url)
    try:
        assert isinstance(store._batches, LinkBatches)
        assert await store.claim("before", lease=5) is Claim.OWNED
        assert redis_server.execute("SCRIPT", "FLUSH").startswith(b"+OK")
        store.complete("before", b"answer", lifetime=5)
        await store.flush()
        assert await store.claim("before", lease=5) == b"answer"
        sha = hashlib.sha1(dedup.BATCH_SCRIPT.encode()).hexdigest()
        assert redis_server.execute("SCRIPT", "EXISTS", sha) == b"*1\r\n:1\r\n"
    finally:
        await store.close()


def test_each_kind_of_url_gets_its_runner(redis_server: RedisServer) -> None:
    assert isinstance(batches_for(redis_server.url), LinkBatches)
    assert isinstance(batches_for("unix:///run/redis.sock"), LinkBatches)
    # redis-py clients connect lazily: building them reaches no server.
    assert isinstance(batches_for("rediss://127.0.0.1:1"), ScriptBatches)
    assert isinstance(batches_for("redis+sentinel://127.0.0.1:1/mymaster"), ScriptBatches)
