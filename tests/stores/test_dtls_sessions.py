"""Stored DTLS sessions (stores/dtls_sessions.py): one contract for memory, a real redis-server
and a real 3-node Cluster. What matters across replicas: two replicas claiming one session get
write sequence ranges that never overlap (a repeated CCM nonce would be fatal), a holder notices
when its session was taken over, the written-back sequence number never goes down, and a changed
key's sessions are gone."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from stores.dtls_sessions import (
    SPAN,
    DtlsSessionStore,
    MemoryDtlsSessionStore,
    RedisDtlsSessionStore,
    StoredSession,
    dtls_sessions_for,
    key_check,
)
from stores.redis import connect
from tests.support.services import RedisServer

PREFIX = "t"
TTL = 60.0


# "redis": one server, batches over the project's RESP link; "redis-py": one server through
# redis-py, as a Sentinel master and rediss:// are written; "cluster": pipelines per node.
KINDS = ["memory", "redis", "redis-py", "cluster"]


def _build(kind: str, request: pytest.FixtureRequest) -> DtlsSessionStore:
    if kind == "memory":
        built = dtls_sessions_for(None, PREFIX)
        assert isinstance(built, MemoryDtlsSessionStore)
        return built
    fixture = "redis_cluster" if kind == "cluster" else "redis_server"
    url = request.getfixturevalue(fixture).url
    if kind == "redis-py":
        return RedisDtlsSessionStore(connect(url, timeout=1.0, retries=1), prefix=PREFIX)
    built = dtls_sessions_for(url, PREFIX)
    assert isinstance(built, RedisDtlsSessionStore)
    return built


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[DtlsSessionStore]:
    built = _build(request.param, request)
    yield built
    await built.close()


def _session(
    cid: bytes, identity: str = "8988228066602151234", state: bytes = b"\x01state"
) -> StoredSession:
    return StoredSession(cid, identity, key_check(b"secret-psk"), state, 0)


async def test_a_saved_session_is_claimed_with_the_next_range(store: DtlsSessionStore) -> None:
    session = _session(b"\x00\x01\x02\x03\x04\x05\x06\x07", state=bytes(range(256)) * 2)
    first = await store.save(session, TTL)
    assert (first.floor, first.ceiling) == (0, SPAN)
    taken = await store.claim(session.cid, TTL)
    assert taken is not None
    assert taken.session == session  # binary state and identity round-trip unchanged
    assert (taken.floor, taken.ceiling) == (SPAN, 2 * SPAN)
    assert await store.claim(b"\xff" * 8, TTL) is None


async def test_concurrent_claims_get_disjoint_ranges(store: DtlsSessionStore) -> None:
    session = _session(b"cid-0001")
    await store.save(session, TTL)
    claims = await asyncio.gather(*(store.claim(session.cid, TTL) for _ in range(20)))
    ranges = sorted((c.floor, c.ceiling) for c in claims if c is not None)
    assert len(ranges) == 20
    assert ranges[0][0] >= SPAN  # never the creator's range
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert start >= end


async def test_a_holder_sees_that_another_replica_took_over(store: DtlsSessionStore) -> None:
    session = _session(b"cid-0002")
    mine = await store.save(session, TTL)
    assert await store.extend(session.cid, TTL) == mine.ceiling + SPAN  # nobody else: contiguous
    await store.claim(session.cid, TTL)  # another replica
    again = await store.extend(session.cid, TTL)
    assert again is not None
    assert again != mine.ceiling + 2 * SPAN
    await store.forget(session.cid)
    assert await store.extend(session.cid, TTL) is None


async def test_the_written_back_sequence_number_never_goes_down(store: DtlsSessionStore) -> None:
    session = _session(b"cid-0003")
    await store.save(session, TTL)
    await store.touch(session.cid, 40, TTL)
    await store.touch(session.cid, 12, TTL)
    claim = await store.claim(session.cid, TTL)
    assert claim is not None
    assert claim.session.received == 40


async def test_forgetting_an_identity_deletes_only_its_sessions(store: DtlsSessionStore) -> None:
    mine = [_session(bytes([i]) * 8, "dev-a") for i in range(3)]
    other = _session(b"\x09" * 8, "dev-b")
    for s in [*mine, other]:
        await store.save(s, TTL)
    assert await store.forget_identity("dev-a") == 3
    for s in mine:
        assert await store.claim(s.cid, TTL) is None
    assert await store.claim(other.cid, TTL) is not None
    assert await store.forget_identity("dev-a") == 0


async def test_a_session_expires_with_its_ttl(redis_server: RedisServer) -> None:
    store = dtls_sessions_for(redis_server.url, PREFIX)
    session = _session(b"cid-0004")
    await store.save(session, 0.2)
    await asyncio.sleep(0.5)
    assert await store.claim(session.cid, TTL) is None
    await store.close()


def test_the_key_check_tells_keys_apart_and_is_not_the_key() -> None:
    assert key_check(b"k1") == key_check(b"k1")
    assert key_check(b"k1") != key_check(b"k2")
    assert b"k1" not in key_check(b"k1")


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_the_span_is_the_stores_own(kind: str, request: pytest.FixtureRequest) -> None:
    url = None if kind == "memory" else request.getfixturevalue("redis_server").url
    store = dtls_sessions_for(url, PREFIX, span=8)
    try:
        assert store.span == 8
        session = _session(b"cid-0005")
        assert (await store.save(session, TTL)).ceiling == 8
        taken = await store.claim(session.cid, TTL)
        assert taken is not None
        assert (taken.floor, taken.ceiling) == (8, 16)
        assert await store.extend(session.cid, TTL) == 24
    finally:
        await store.close()
    with pytest.raises(ValueError, match="span 1 is not within"):
        dtls_sessions_for(None, PREFIX, span=1)


async def test_batches_write_many_sessions_and_indexes_in_one_call(store: DtlsSessionStore) -> None:
    # Two identities, one of them with two sessions: each in its identity's index.
    batch = [
        StoredSession(bytes([0xB0, i]) * 4, f"dev-batch-{i % 2}", key_check(b"k"), b"s%d" % i, i)
        for i in range(3)
    ]
    await store.save_many(batch, TTL)
    await store.save_many([], TTL)
    for session in batch:
        claim = await store.claim(session.cid, TTL)
        assert claim is not None
        assert claim.session == session  # the received number too
        assert (claim.floor, claim.ceiling) == (SPAN, 2 * SPAN)
    await store.touch_many([(batch[0].cid, 90), (batch[1].cid, 0), (b"\xee" * 8, 5)], TTL)
    await store.touch_many([], TTL)
    received = []
    for session in batch:
        claim = await store.claim(session.cid, TTL)
        assert claim is not None
        received.append(claim.session.received)
    assert received == [90, 1, 2]  # raised, never lowered; an unknown CID is skipped
    assert await store.claim(b"\xee" * 8, TTL) is None  # and not created
    assert await store.forget_identity("dev-batch-0") == 2
    assert await store.forget_identity("dev-batch-1") == 1


@pytest.mark.parametrize("kind", ["redis", "redis-py", "cluster"])
async def test_batches_load_their_scripts_where_redis_lost_them(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_cluster" if kind == "cluster" else "redis_server").url
    admin = connect(url, timeout=1.0)
    store = _build(kind, request)
    try:
        await store.save_many([_session(b"cid-0006")], TTL)
        await admin.client.script_flush()  # a restarted server, or a new Cluster node
        await store.save_many([_session(b"cid-0007")], TTL)
        await store.touch_many([(b"cid-0007", 3)], TTL)
        claim = await store.claim(b"cid-0007", TTL)
        assert claim is not None
        assert claim.session.received == 3
    finally:
        await store.close()
        await admin.aclose()
