"""The PskStore seam: one contract for the in-memory store and the Redis mirror, then what only
the mirror must do (load at start, follow pub/sub, reload after an outage).

The Redis writer here does what the API's store does: write the device hash field ``psk`` and
PUBLISH the ICCID on ``stores.keys.psk_channel`` (tests/api covers the API side itself)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import pytest
import redis.asyncio as aioredis

from proxy.state.psk import MemoryPskStore, PskStore, RedisPskMirror
from stores.keys import device_key, device_set_key, psk_channel

PREFIX = "t"
A = "8988280666000000101"
B = "8988280666000000102"


class Writer(Protocol):
    async def set(self, identity: str, psk: str) -> None: ...
    async def revoke(self, identity: str) -> None: ...


class MemoryWriter:
    def __init__(self, store: MemoryPskStore) -> None:
        self.store = store

    async def set(self, identity: str, psk: str) -> None:
        self.store.set(identity, psk)

    async def revoke(self, identity: str) -> None:
        self.store.delete(identity)


class RedisWriter:
    """Writes like the API's Redis store: the hash field, then the announcement."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def set(self, identity: str, psk: str, *, announce: bool = True) -> None:
        await self.client.sadd(device_set_key(PREFIX), identity)
        await self.client.hset(device_key(identity, PREFIX), "psk", psk)
        if announce:
            await self.client.publish(psk_channel(PREFIX), identity)

    async def revoke(self, identity: str) -> None:
        await self.client.hdel(device_key(identity, PREFIX), "psk")
        await self.client.publish(psk_channel(PREFIX), identity)


async def eventually(check, timeout: float = 1.0) -> float:
    """Seconds until ``check()`` held; fails after ``timeout`` (docs/CONTRACT.md §6: within
    one second)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.005)
    return loop.time() - start


@pytest.fixture(params=["memory", "redis"])
async def store_and_writer(request, tmp_path) -> AsyncIterator[tuple[PskStore, Writer]]:
    if request.param == "memory":
        memory = MemoryPskStore()
        yield memory, MemoryWriter(memory)
        return
    redis_server = request.getfixturevalue("redis_server")
    client = aioredis.Redis.from_url(redis_server.url)
    mirror = RedisPskMirror(redis_server.url, prefix=PREFIX)
    await mirror.start()
    try:
        yield mirror, RedisWriter(client)
    finally:
        await mirror.close()
        await client.aclose()


async def test_set_change_revoke_reach_lookup_and_listeners(store_and_writer) -> None:
    store, writer = store_and_writer
    changed: list[str] = []
    store.subscribe(changed.append)
    assert store.lookup(A) is None

    await writer.set(A, "secretPSK1234567")
    await eventually(lambda: store.lookup(A) == b"secretPSK1234567")
    assert changed == []  # a new key closes nothing

    await writer.set(A, "0x00ff10")  # hex form (policies.psk)
    await eventually(lambda: store.lookup(A) == b"\x00\xff\x10")
    assert changed == [A]

    await writer.revoke(A)
    await eventually(lambda: store.lookup(A) is None)
    assert changed == [A, A]
    assert store.lookup(B) is None


async def test_unsubscribed_listener_is_not_called(store_and_writer) -> None:
    store, writer = store_and_writer
    changed: list[str] = []
    unsubscribe = store.subscribe(changed.append)
    await writer.set(B, "one")
    await eventually(lambda: store.lookup(B) == b"one")
    unsubscribe()
    await writer.set(B, "two")
    await eventually(lambda: store.lookup(B) == b"two")
    assert changed == []


async def test_mirror_loads_every_key_at_start(redis_server) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    writer = RedisWriter(client)
    identities = [f"89882806660000{n:05d}" for n in range(2500)]  # more than one pipeline chunk
    for identity in identities:
        await writer.set(identity, f"key{identity[-5:]}", announce=False)
    await client.sadd(device_set_key(PREFIX), "8988280666000099999")  # a device without a key
    mirror = RedisPskMirror(redis_server.url, prefix=PREFIX)
    await mirror.start()
    try:
        assert len(mirror) == len(identities)
        assert mirror.lookup(identities[1234]) == b"key01234"
        assert mirror.lookup("8988280666000099999") is None
    finally:
        await mirror.close()
        await client.aclose()


async def test_mirror_reloads_after_a_redis_outage(redis_server) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    writer = RedisWriter(client)
    await writer.set(A, "before-outage")
    await writer.set(B, "stays")
    mirror = RedisPskMirror(redis_server.url, prefix=PREFIX, reconnect_delay=0.1)
    changed: list[str] = []
    mirror.subscribe(changed.append)
    await mirror.start()
    try:
        assert mirror.lookup(A) == b"before-outage"
        redis_server.stop()
        await eventually(lambda: not mirror.connected, timeout=5)
        # Keys stay usable while Redis is away (the API cannot change them meanwhile).
        assert mirror.lookup(A) == b"before-outage"
        redis_server.start()  # no persistence: comes back empty
        # Written while the mirror may not be subscribed yet: no announcement to rely on.
        await client.aclose()
        client = aioredis.Redis.from_url(redis_server.url)
        writer = RedisWriter(client)
        await writer.set(A, "after-outage", announce=False)
        await eventually(lambda: mirror.connected and mirror.reloads >= 2, timeout=5)
        if mirror.lookup(A) != b"after-outage":
            # The reload ran before the write landed; the next announcement fixes it.
            await writer.set(A, "after-outage")
        await eventually(lambda: mirror.lookup(A) == b"after-outage")
        assert mirror.lookup(B) is None  # gone from Redis: gone here, and announced
        assert set(changed) == {A, B}
    finally:
        await mirror.close()
        await client.aclose()


async def test_mirror_start_does_not_hang_when_redis_is_down(redis_server) -> None:
    redis_server.stop()
    mirror = RedisPskMirror(redis_server.url, prefix=PREFIX, timeout=0.3, reconnect_delay=0.1)
    client = None
    try:
        await mirror.start()
        assert not mirror.connected
        redis_server.start()
        client = aioredis.Redis.from_url(redis_server.url)
        await RedisWriter(client).set(A, "late")
        await eventually(lambda: mirror.lookup(A) == b"late", timeout=5)
    finally:
        await mirror.close()
        if client is not None:
            await client.aclose()
