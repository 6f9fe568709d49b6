"""The exactly-once ledger (stores/ledger.py): one contract for every backend — in memory, in a
real redis-server over our own link, and through redis-py (what Sentinel and TLS URLs use; a
Cluster and a Sentinel run the same contract in tests/stores/test_ledger_topologies.py) — and
what is particular to Redis: records riding with claims, the script cache, memory per record."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from stores.keys import dedup_key, dedup_prefix
from stores.ledger import (
    ANSWERED,
    CLAIMED,
    Claim,
    ClientRunner,
    Ledger,
    LedgerUnavailable,
    LinkRunner,
    MemoryLedger,
    RedisLedger,
    ScriptReads,
    batch_script,
    ledger_for,
    redis_ledger,
)
from stores.redis import connect
from tests.support.services import RedisServer

PREFIX = "t:led:"


@pytest.fixture(params=["memory", "redis", "redis-py"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    if request.param == "memory":
        built: Ledger = MemoryLedger(PREFIX)
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        # Generous timeouts for both clients: on busy 2-core clean-clone runs a connect to the
        # local redis-server took over 1 s twice, each time in the concurrency test (redis-py:
        # "Timeout connecting"; the RESP link: "no connection within 1 s", the connection
        # completing just after). The cause (a long pause of this process or a dropped SYN
        # retried after 1 s) is not proven; these tests are about ownership, not speed.
        if request.param == "redis":
            built = redis_ledger(redis_server.url, prefix=PREFIX, timeout=5.0)
            assert isinstance(built._runner, LinkRunner)
        else:
            client = connect(redis_server.url, timeout=5.0)
            built = RedisLedger(ClientRunner(client), prefix=PREFIX)
    yield built
    await built.close()


async def test_the_first_claim_owns_and_the_next_sees_it_busy(ledger: Ledger) -> None:
    assert await ledger.claim(["k1"], 5) == [Claim.OWNED]
    assert await ledger.claim(["k1", "k2", "k2"], 5) == [Claim.BUSY, Claim.OWNED, Claim.BUSY]


async def test_an_answer_is_replayed_byte_exact(ledger: Ledger) -> None:
    await ledger.claim(["k"], 5)
    ledger.record("k", b"\x60\x44\x12\x34\xde\xad", 5)
    await ledger.flush()
    assert await ledger.claim(["k"], 5) == [b"\x60\x44\x12\x34\xde\xad"]


async def test_an_empty_answer_is_still_an_answer(ledger: Ledger) -> None:
    # A NON's record is empty: duplicates are ignored, but the exchange is not free again.
    await ledger.claim(["non"], 5)
    ledger.record("non", b"", 5)
    await ledger.flush()
    assert await ledger.claim(["non"], 5) == [b""]


async def test_a_release_frees_a_claim_but_never_drops_an_answer(ledger: Ledger) -> None:
    assert await ledger.claim(["failed", "done"], 5) == [Claim.OWNED, Claim.OWNED]
    ledger.release("failed")
    ledger.record("done", b"204", 5)
    ledger.release("done")
    await ledger.flush()
    assert await ledger.claim(["failed", "done"], 5) == [Claim.OWNED, b"204"]


async def test_a_lapsed_lease_lets_another_claimer_take_over(ledger: Ledger) -> None:
    assert await ledger.claim(["dead"], 0.2) == [Claim.OWNED]
    await asyncio.sleep(0.35)
    assert await ledger.claim(["dead"], 5) == [Claim.OWNED]


async def test_answers_expire_after_their_lifetime(ledger: Ledger) -> None:
    await ledger.claim(["old"], 5)
    ledger.record("old", b"x", 0.2)
    await ledger.flush()
    await asyncio.sleep(0.35)
    assert await ledger.claim(["old"], 5) == [Claim.OWNED]


async def test_concurrent_claims_have_exactly_one_owner(ledger: Ledger) -> None:
    results = await asyncio.gather(*(ledger.claim(["race"], 5) for _ in range(50)))
    flat = [outcome for [outcome] in results]
    assert flat.count(Claim.OWNED) == 1
    assert flat.count(Claim.BUSY) == 49


async def test_prefixes_keep_two_ledgers_apart(redis_server: RedisServer) -> None:
    # The proxy and the API share one Redis: the same key under two prefixes is two records.
    proxy = redis_ledger(redis_server.url, prefix="cb:dd:")
    api = redis_ledger(redis_server.url, prefix="cb:idem:")
    try:
        assert await proxy.claim(["same"], 5) == [Claim.OWNED]
        assert await api.claim(["same"], 5) == [Claim.OWNED]
        assert redis_server.execute("GET", "cb:dd:same") == b"$1\r\nc\r\n"
    finally:
        await proxy.close()
        await api.close()


async def test_redis_down_is_ledger_unavailable_and_recovers(redis_server: RedisServer) -> None:
    ledger = redis_ledger(redis_server.url, prefix=PREFIX, timeout=0.5)
    try:
        assert await ledger.claim(["a"], 5) == [Claim.OWNED]
        redis_server.stop()
        with pytest.raises(LedgerUnavailable):
            await ledger.claim(["b"], 5)
        redis_server.start()
        assert await ledger.claim(["c"], 5) == [Claim.OWNED]
    finally:
        await ledger.close()


async def _value(redis_server: RedisServer, key: str) -> bytes | None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        value: bytes | None = await client.get(PREFIX + key)
        return value
    finally:
        await client.aclose()


async def test_records_travel_with_the_next_claim_ahead_of_it(redis_server: RedisServer) -> None:
    one = redis_ledger(redis_server.url, prefix=PREFIX, record_delay=60)
    other = redis_ledger(redis_server.url, prefix=PREFIX)
    try:
        assert await one.claim(["m1"], 5) == [Claim.OWNED]
        one.record("m1", b"answer-1", 5)
        assert await other.claim(["m1"], 5) == [Claim.BUSY]  # queued, not written (60 s)
        assert await one.claim(["m2"], 5) == [Claim.OWNED]  # carries m1's record first
        assert await other.claim(["m1"], 5) == [b"answer-1"]
        # A retry claimed in the same call as its answer gets the answer.
        one.record("m2", b"answer-2", 5)
        assert await one.claim(["m2"], 5) == [b"answer-2"]
    finally:
        await one.close()
        await other.close()


async def test_records_left_alone_are_written_within_the_delay(redis_server: RedisServer) -> None:
    ledger = redis_ledger(redis_server.url, prefix=PREFIX, record_delay=0.05)
    try:
        await ledger.claim(["alone"], 5)
        ledger.record("alone", b"done", 5)
        assert await _value(redis_server, "alone") == CLAIMED  # queued
        await asyncio.sleep(0.5)  # no flush(), no claim: only the delay can write it
        assert await _value(redis_server, "alone") == ANSWERED + b"done"
    finally:
        await ledger.close()


async def test_closing_writes_what_was_queued(redis_server: RedisServer) -> None:
    ledger = redis_ledger(redis_server.url, prefix=PREFIX, record_delay=60)
    await ledger.claim(["bye", "gone"], 5)
    ledger.record("bye", b"204", 5)
    ledger.release("gone")
    await ledger.close()
    assert await _value(redis_server, "bye") == ANSWERED + b"204"
    assert await _value(redis_server, "gone") is None


_COUNT_READ = ScriptReads(
    "local function read(keys, args)\n"
    "  local out = {}\n"
    "  for i = 1, #keys do out[i] = redis.call('INCRBY', keys[i], args[i]) end\n"
    "  return out\n"
    "end\n",
    ["t:read:a", "t:read:b"],
    [2, 5],
)


@pytest.mark.parametrize("runner", ["link", "redis-py"])
async def test_reads_run_before_the_claims_in_one_call(
    redis_server: RedisServer, runner: str
) -> None:
    ledger = (
        redis_ledger(redis_server.url, prefix=PREFIX, record_delay=60)
        if runner == "link"
        else RedisLedger(ClientRunner(connect(redis_server.url, timeout=1.0)), prefix=PREFIX)
    )
    try:
        await ledger.claim(["q"], 5)
        ledger.record("q", b"queued", 5)  # rides along, ahead of the claims
        reads, outcomes = await ledger.claim_after(_COUNT_READ, ["q", "new"], 5)
        assert reads == [2, 5]
        assert outcomes == [b"queued", Claim.OWNED]
        reads, outcomes = await ledger.claim_after(_COUNT_READ, [], 5)
        assert (reads, outcomes) == ([4, 10], [])
    finally:
        await ledger.close()


async def test_redis_memory_per_answered_exchange(redis_server: RedisServer) -> None:
    # Benchmark M's budget: at most 150 bytes of Redis memory per remembered exchange
    # (MEMORY USAGE of the key holding a piggybacked 2.04 with a 4-byte token).
    ledger = redis_ledger(redis_server.url, prefix=dedup_prefix())
    try:
        keys = [dedup_key("10.123.45.67", 40000 + n, n) for n in range(100)]
        assert await ledger.claim(keys, 5) == [Claim.OWNED] * 100
        for key in keys:
            ledger.record(key, b"\x64\x44\x00\x01\x01\x02\x03\x04", 247)
        await ledger.flush()
        usage = [
            int(redis_server.execute("MEMORY", "USAGE", dedup_prefix() + key)[1:]) for key in keys
        ]
    finally:
        await ledger.close()
    assert max(usage) <= 150, usage


async def test_a_flushed_script_cache_is_reloaded(redis_server: RedisServer) -> None:
    ledger = redis_ledger(redis_server.url, prefix=PREFIX)
    try:
        assert await ledger.claim(["before"], 5) == [Claim.OWNED]
        assert redis_server.execute("SCRIPT", "FLUSH").startswith(b"+OK")
        ledger.record("before", b"answer", 5)
        await ledger.flush()
        assert await ledger.claim(["before"], 5) == [b"answer"]
        sha = hashlib.sha1(batch_script().encode()).hexdigest()
        assert redis_server.execute("SCRIPT", "EXISTS", sha) == b"*1\r\n:1\r\n"
    finally:
        await ledger.close()


def _runner(ledger: Ledger) -> object:
    assert isinstance(ledger, RedisLedger)
    return ledger._runner


def test_each_kind_of_url_gets_its_backend(redis_server: RedisServer) -> None:
    assert isinstance(ledger_for(None, prefix=PREFIX), MemoryLedger)
    assert isinstance(_runner(ledger_for(redis_server.url, prefix=PREFIX)), LinkRunner)
    assert isinstance(_runner(ledger_for("unix:///run/redis.sock", prefix=PREFIX)), LinkRunner)
    # redis-py clients connect lazily: building them reaches no server.
    assert isinstance(_runner(ledger_for("rediss://127.0.0.1:1", prefix=PREFIX)), ClientRunner)
    sentinel = ledger_for("redis+sentinel://127.0.0.1:1/mymaster", prefix=PREFIX)
    assert isinstance(_runner(sentinel), ClientRunner)
