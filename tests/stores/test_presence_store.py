"""Device presence (stores/presence.py): one contract for memory, a real redis-server and a real
3-node Cluster; and what replicas share: an expired device is handed to one caller only, and
two replicas noting the same device at once turn it online once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from stores.presence import (
    EXPIRE_BATCH,
    MemoryPresenceStore,
    Presence,
    PresenceStore,
    RedisPresenceStore,
    presence_for,
)
from tests.support.services import RedisServer

PREFIX = "t"
NOW = 1_700_000_000.0


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[PresenceStore]:
    if request.param == "memory":
        built = presence_for(None, PREFIX)
        assert isinstance(built, MemoryPresenceStore)
    else:
        fixture = "redis_server" if request.param == "redis" else f"redis_{request.param}"
        deployment = request.getfixturevalue(fixture)
        built = presence_for(deployment.url, PREFIX)
        assert isinstance(built, RedisPresenceStore)
        assert built.cluster == (request.param == "cluster")
    yield built
    await built.close()


async def test_a_first_message_turns_a_device_online_once(store: PresenceStore) -> None:
    assert await store.seen("pk:dev-1", 60, now=NOW) is True
    assert await store.seen("pk:dev-1", 60, now=NOW + 10) is False
    [presence] = await store.get_many(["pk:dev-1"], now=NOW + 11)
    assert presence == Presence("pk:dev-1", True, NOW + 10, NOW + 70)


async def test_a_device_never_seen_is_offline_without_times(store: PresenceStore) -> None:
    await store.seen("a", 60, now=NOW)
    assert await store.get_many(["nobody", "a"], now=NOW) == [
        Presence("nobody", False, None, None),
        Presence("a", True, NOW, NOW + 60),
    ]
    assert await store.get_many([], now=NOW) == []


async def test_expiry_turns_it_offline_once_and_keeps_last_seen(store: PresenceStore) -> None:
    await store.seen("a", 30, now=NOW)
    await store.seen("b", 90, now=NOW)
    assert await store.expire(now=NOW + 29.9) == []
    assert await store.expire(now=NOW + 30) == ["a"]
    assert await store.expire(now=NOW + 31) == []  # handed out once
    [a, b] = await store.get_many(["a", "b"], now=NOW + 31)
    assert a == Presence("a", False, NOW, None)
    assert b == Presence("b", True, NOW, NOW + 90)
    # Offline, then a message: online again, and this call says so.
    assert await store.seen("a", 30, now=NOW + 40) is True


async def test_a_passed_expiry_not_yet_swept_is_no_new_transition(store: PresenceStore) -> None:
    # "offline" was not published yet (no expire() ran): a message now is not a new "online",
    # and the device stays in line for one offline transition later.
    await store.seen("a", 30, now=NOW)
    [presence] = await store.get_many(["a"], now=NOW + 35)
    assert not presence.online  # what the API shows follows the clock, not the sweep
    assert await store.seen("a", 30, now=NOW + 35) is False
    assert (await store.get_many(["a"], now=NOW + 36))[0].online
    assert await store.expire(now=NOW + 64) == []
    assert await store.expire(now=NOW + 65) == ["a"]


async def test_without_extend_an_online_device_is_left_alone(store: PresenceStore) -> None:
    await store.seen("a", 30, now=NOW)
    assert await store.seen("a", 300, extend=False, now=NOW + 20) is False
    assert (await store.get_many(["a"], now=NOW + 21))[0] == Presence("a", True, NOW, NOW + 30)
    # Offline: extend=False turns it online like any message.
    assert await store.expire(now=NOW + 30) == ["a"]
    assert await store.seen("a", 300, extend=False, now=NOW + 40) is True
    assert (await store.get_many(["a"], now=NOW + 41))[0].expires_at == NOW + 340


async def test_a_shorter_lifetime_never_shortens_the_expiry(store: PresenceStore) -> None:
    await store.seen("a", 3600, now=NOW)
    await store.seen("a", 30, now=NOW + 1)
    [presence] = await store.get_many(["a"], now=NOW + 2)
    assert (presence.last_seen, presence.expires_at) == (NOW + 1, NOW + 3600)


async def test_forget_drops_the_device_and_no_offline_follows(store: PresenceStore) -> None:
    await store.seen("a", 30, now=NOW)
    await store.forget("a")
    assert await store.get_many(["a"], now=NOW) == [Presence("a", False, None, None)]
    assert await store.expire(now=NOW + 100) == []
    await store.forget("never-seen")  # no error


async def test_two_replicas_share_presence_and_each_expiry_goes_to_one(
    redis_server: RedisServer,
) -> None:
    a, b = presence_for(redis_server.url, PREFIX), presence_for(redis_server.url, PREFIX)
    try:
        devices = [f"d{i}" for i in range(50)]
        # Both replicas note every device at once: each turns online exactly once.
        turned = await asyncio.gather(
            *(replica.seen(d, 30, now=NOW) for d in devices for replica in (a, b))
        )
        assert sum(turned) == len(devices)
        # Both sweep at once: every device is returned once, by one of them.
        first, second = await asyncio.gather(a.expire(now=NOW + 30), b.expire(now=NOW + 30))
        assert sorted(first + second) == sorted(devices)
        assert not set(first) & set(second)
        assert [p.last_seen for p in await b.get_many(["d0"], now=NOW + 31)] == [NOW]
    finally:
        await a.close()
        await b.close()


async def test_a_backlog_larger_than_one_batch_is_expired_whole(redis_server: RedisServer) -> None:
    store = presence_for(redis_server.url, PREFIX)
    try:
        count = EXPIRE_BATCH + 5
        # One script call sets them up quickly (a thousand seen() calls would be slow here).
        args = []
        for i in range(count):
            args += [str(NOW), f"d{i}"]
        redis_server.execute("ZADD", f"{PREFIX}:{{presence}}:online", *args)
        gone = await store.expire(now=NOW + 1)
        assert len(gone) == len(set(gone)) == count
    finally:
        await store.close()
