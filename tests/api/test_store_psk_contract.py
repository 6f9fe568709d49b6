"""Store contract, part 2 (memory and a real Redis alike): atomic ``modify``, the PSK change
announcements the proxies' mirrors depend on (issue #5), and the location fields (issue #6)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from typing import Any, Protocol

import pytest
from redis.asyncio import Redis

from api.errors import DeviceNotFound, LocationForbidden
from api.store.base import Device, DeviceStore, Location
from api.store.memory import MemoryDeviceStore
from api.store.redis_store import RedisDeviceStore
from stores.keys import device_key
from tests.api.conftest import REDIS_PREFIX, START, psk_events
from tests.support.services import RedisServer

A = "8988280666000000001"
B = "8988280666000000002"


class Announcements(Protocol):
    async def next(self, timeout: float = 2.0) -> str: ...

    async def assert_silent(self, timeout: float = 0.3) -> None: ...


class _Listened:
    """The memory store's in-process hook, seen through the same interface as Redis pub/sub."""

    def __init__(self, store: MemoryDeviceStore) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.remove = store.add_psk_listener(self.queue.put_nowait)

    async def next(self, timeout: float = 2.0) -> str:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def assert_silent(self, timeout: float = 0.3) -> None:
        await asyncio.sleep(0)
        assert self.queue.empty(), f"unexpected PSK announcement: {self.queue.get_nowait()}"


@contextlib.asynccontextmanager
async def announcements(
    store: DeviceStore, request: pytest.FixtureRequest
) -> AsyncIterator[Announcements]:
    if isinstance(store, MemoryDeviceStore):
        listened = _Listened(store)
        try:
            yield listened
        finally:
            listened.remove()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    async with psk_events(server.url) as events:
        yield events


async def test_psk_changes_are_announced(
    any_store: DeviceStore, request: pytest.FixtureRequest
) -> None:
    await any_store.create(Device(iccid=B, ip="10.0.0.2"))
    async with announcements(any_store, request) as events:
        await any_store.create(Device(iccid=A, ip="10.0.0.1"))
        await events.assert_silent()  # created without a key: nothing to announce

        await any_store.update(A, psk="first-key-0001", psk_user_set=True)
        assert await events.next() == A
        await any_store.update(A, psk="second-key-0002")
        assert await events.next() == A

        # Changes that leave the key alone are not announced.
        await any_store.update(A, status="inactive", terms_accepted=True, ip="10.0.0.9")
        await any_store.update(A, psk="second-key-0002")
        await events.assert_silent()

        await any_store.update(A, psk=None)  # revoked
        assert await events.next() == A
        await any_store.delete(A)
        assert await events.next() == A
        await any_store.delete(B)  # a device without a key: a mirror may hold a negative entry
        assert await events.next() == B

        await any_store.create(Device(iccid=A, ip="10.0.0.1", psk="created-with-key"))
        assert await events.next() == A
        await events.assert_silent()


async def test_failed_writes_announce_nothing(
    any_store: DeviceStore, request: pytest.FixtureRequest
) -> None:
    await any_store.create(Device(iccid=A, ip="10.0.0.1"))
    await any_store.create(Device(iccid=B, ip="10.0.0.2"))
    async with announcements(any_store, request) as events:
        with pytest.raises(DeviceNotFound):
            await any_store.update("8988280666000000009", psk="x" * 16)
        with pytest.raises(Exception, match="already used"):
            await any_store.update(A, psk="y" * 16, ip="10.0.0.2")
        await events.assert_silent()
    assert (await any_store.get(A)) == Device(iccid=A, ip="10.0.0.1")


async def test_modify_sees_the_current_device_and_an_exception_aborts(
    any_store: DeviceStore,
) -> None:
    await any_store.create(Device(iccid=A, ip="10.0.0.1"))
    seen: list[Device] = []

    def change(current: Device) -> Mapping[str, Any]:
        seen.append(current)
        return {"psk_user_set": True}

    updated = await any_store.modify(A, change)
    assert seen[-1] == Device(iccid=A, ip="10.0.0.1")
    assert updated.psk_user_set is True

    def refuse(current: Device) -> Mapping[str, Any]:
        raise LocationForbidden()

    with pytest.raises(LocationForbidden):
        await any_store.modify(A, refuse)
    assert await any_store.get(A) == updated
    with pytest.raises(DeviceNotFound):
        await any_store.modify(B, change)


async def test_concurrent_modifies_do_not_lose_updates(any_store: DeviceStore) -> None:
    # Read-modify-write under contention: a counter incremented 10 times concurrently ends at
    # 10 only if every modify saw the value the previous one committed.
    await any_store.create(Device(iccid=A, ip="10.0.0.1"))

    def bump(current: Device) -> Mapping[str, Any]:
        return {"bootstrap_window_calls": (current.bootstrap_window_calls or 0) + 1}

    await asyncio.gather(*(any_store.modify(A, bump) for _ in range(10)))
    device = await any_store.get(A)
    assert device is not None
    assert device.bootstrap_window_calls == 10


async def test_location_and_bootstrap_fields_round_trip(any_store: DeviceStore) -> None:
    await any_store.create(Device(iccid=A, ip="10.0.0.1"))
    updated = await any_store.update(
        A,
        location_longitude="13.4049540",
        location_latitude="-0.0000001",
        location_source="CellTower",
        location_sample_time=1_700_000_000,
        location_barred=True,
        last_bootstrap_at=START,
        bootstrap_window_start=START + timedelta(seconds=1),
        bootstrap_window_calls=3,
    )
    assert await any_store.get(A) == updated
    assert updated.location == Location(
        longitude="13.4049540", latitude="-0.0000001", source="CellTower", sample_time=1_700_000_000
    )
    assert updated.last_bootstrap_at == START


def test_psk_is_not_in_a_device_repr() -> None:
    device = Device(iccid=A, ip="10.0.0.1", psk="secret-psk-value")
    assert "secret-psk-value" not in repr(device)
    assert "secret-psk-value" not in str(device)


async def test_redis_keeps_the_psk_in_the_hash_field_the_proxy_reads(
    redis_server: RedisServer,
) -> None:
    store = RedisDeviceStore.from_url(redis_server.url, prefix=REDIS_PREFIX)
    raw = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await store.create(Device(iccid=A, ip="10.0.0.1"))
        await store.update(A, psk="0x00ff10", psk_user_set=True)
        assert await raw.hget(device_key(A, REDIS_PREFIX), "psk") == "0x00ff10"
        await store.update(A, psk=None)
        assert await raw.hget(device_key(A, REDIS_PREFIX), "psk") is None
    finally:
        await raw.aclose()
        await store.close()
