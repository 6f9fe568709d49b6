"""One contract for every DeviceStore: memory and Redis (a real redis-server) behave alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from api.errors import DeviceExists, DeviceNotFound, IpInUse, StoreUnavailable
from api.store.base import Device, DeviceStore
from api.store.memory import MemoryDeviceStore
from api.store.redis_store import RedisDeviceStore
from tests.support.services import RedisServer

A = "8988280666000000001"
B = "8988280666000000002"
C = "89882806660000000039"  # 20 digits


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[DeviceStore]:
    if request.param == "memory":
        yield MemoryDeviceStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisDeviceStore.from_url(server.url, prefix="test")
    try:
        yield redis_store
    finally:
        await redis_store.close()


async def test_create_then_get_and_get_by_ip(store: DeviceStore) -> None:
    created = await store.create(Device(iccid=A, ip="10.0.0.1", status="active"))
    assert created == Device(iccid=A, ip="10.0.0.1", status="active")
    assert await store.get(A) == created
    assert await store.get_by_ip("10.0.0.1") == created
    assert await store.get(B) is None
    assert await store.get_by_ip("10.0.0.2") is None
    assert await store.get_by_ip("not an ip") is None


async def test_get_many_answers_each_in_order(store: DeviceStore) -> None:
    a = await store.create(Device(iccid=A, ip="10.0.0.1", status="active"))
    b = await store.create(Device(iccid=B, ip="::1", status="inactive"))
    assert await store.get_many([]) == []
    assert await store.get_many([B, C, A, A]) == [b, None, a, a]
    assert await store.get_many_by_ip([]) == []
    # Addresses in any spelling the single form accepts; unknown and malformed ones are None.
    assert await store.get_many_by_ip(
        ["10.0.0.1", "0:0::1", "10.0.0.2", "not an ip", "10.0.0.1"]
    ) == [a, b, None, None, a]
    await store.update(A, ip="10.0.0.7")  # moved: the old address names nobody
    moved = await store.get(A)
    assert await store.get_many_by_ip(["10.0.0.1", "10.0.0.7"]) == [None, moved]


async def test_list_is_sorted_by_iccid(store: DeviceStore) -> None:
    assert await store.list() == []
    await store.create(Device(iccid=B, ip="10.0.0.2"))
    await store.create(Device(iccid=A, ip="10.0.0.1", status="inactive"))
    assert [(d.iccid, d.ip, d.status) for d in await store.list()] == [
        (A, "10.0.0.1", "inactive"),
        (B, "10.0.0.2", "active"),
    ]


async def test_duplicate_iccid_is_refused(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    with pytest.raises(DeviceExists):
        await store.create(Device(iccid=A, ip="10.0.0.9"))
    # The failed create must not have claimed the new ip.
    assert await store.get_by_ip("10.0.0.9") is None
    assert (await store.get(A)) == Device(iccid=A, ip="10.0.0.1")


async def test_ip_of_another_device_is_refused(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    with pytest.raises(IpInUse):
        await store.create(Device(iccid=B, ip="10.0.0.1"))
    assert await store.get(B) is None
    assert [d.iccid for d in await store.list()] == [A]


async def test_update_ip_moves_the_index(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    updated = await store.update(A, ip="10.0.0.7")
    assert updated.ip == "10.0.0.7"
    assert await store.get(A) == updated
    assert await store.get_by_ip("10.0.0.7") == updated
    assert await store.get_by_ip("10.0.0.1") is None
    # The old address is free again.
    await store.create(Device(iccid=B, ip="10.0.0.1"))
    assert (await store.get_by_ip("10.0.0.1")) == Device(iccid=B, ip="10.0.0.1")


async def test_update_status_keeps_the_ip(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    updated = await store.update(A, status="inactive")
    assert updated == Device(iccid=A, ip="10.0.0.1", status="inactive")
    assert await store.get_by_ip("10.0.0.1") == updated


async def test_update_to_the_same_ip_is_no_conflict(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    assert (await store.update(A, ip="10.0.0.1")).ip == "10.0.0.1"
    assert (await store.get_by_ip("10.0.0.1")) is not None


async def test_update_to_an_ip_in_use_is_refused(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    await store.create(Device(iccid=B, ip="10.0.0.2"))
    with pytest.raises(IpInUse):
        await store.update(A, ip="10.0.0.2")
    assert (await store.get(A)) == Device(iccid=A, ip="10.0.0.1")
    assert (await store.get_by_ip("10.0.0.1")) == Device(iccid=A, ip="10.0.0.1")
    assert (await store.get_by_ip("10.0.0.2")) == Device(iccid=B, ip="10.0.0.2")


async def test_update_unknown_device(store: DeviceStore) -> None:
    with pytest.raises(DeviceNotFound):
        await store.update(A, status="inactive")


async def test_update_with_invalid_values_is_refused(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    with pytest.raises(ValidationError):
        await store.update(A, ip="300.1.1.1")
    assert (await store.get(A)) == Device(iccid=A, ip="10.0.0.1")


async def test_delete_frees_iccid_and_ip(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    await store.delete(A)
    assert await store.get(A) is None
    assert await store.get_by_ip("10.0.0.1") is None
    assert await store.list() == []
    with pytest.raises(DeviceNotFound):
        await store.delete(A)
    await store.create(Device(iccid=B, ip="10.0.0.1"))
    assert (await store.get_by_ip("10.0.0.1")) == Device(iccid=B, ip="10.0.0.1")


async def test_ipv6_is_normalised(store: DeviceStore) -> None:
    created = await store.create(Device(iccid=C, ip="2001:DB8:0:0::0001"))
    assert created.ip == "2001:db8::1"
    assert await store.get_by_ip("2001:db8::1") == created
    assert await store.get_by_ip("2001:0db8::0:1") == created
    with pytest.raises(IpInUse):
        await store.create(Device(iccid=A, ip="2001:db8::1"))


async def test_ipv4_mapped_address_finds_the_ipv4_device(store: DeviceStore) -> None:
    created = await store.create(Device(iccid=A, ip="10.0.0.1"))
    assert await store.get_by_ip("::ffff:10.0.0.1") == created


async def test_optional_fields_round_trip(store: DeviceStore) -> None:
    await store.create(Device(iccid=A, ip="10.0.0.1"))
    updated = await store.update(A, psk="00ff", psk_user_set=True, terms_accepted=False)
    assert await store.get(A) == updated
    assert (updated.psk, updated.psk_user_set, updated.terms_accepted) == ("00ff", True, False)
    cleared = await store.update(A, psk=None)
    assert (await store.get(A)) == cleared
    assert cleared.psk is None


async def test_concurrent_creates_claim_an_ip_once(store: DeviceStore) -> None:
    iccids = [f"89882806660000001{n:02d}" for n in range(20)]
    results = await asyncio.gather(
        *(store.create(Device(iccid=i, ip="10.9.9.9")) for i in iccids), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, Device)]
    assert len(winners) == 1
    assert all(isinstance(r, IpInUse) for r in results if not isinstance(r, Device))
    assert await store.get_by_ip("10.9.9.9") == winners[0]
    assert await store.list() == winners


async def test_concurrent_moves_to_one_ip_leave_a_consistent_index(store: DeviceStore) -> None:
    iccids = [f"89882806660000002{n:02d}" for n in range(10)]
    for n, iccid in enumerate(iccids):
        await store.create(Device(iccid=iccid, ip=f"10.1.0.{n}"))
    results = await asyncio.gather(
        *(store.update(i, ip="10.2.0.1") for i in iccids), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, Device)]
    assert len(winners) == 1
    assert await store.get_by_ip("10.2.0.1") == winners[0]
    # The winner's old address is released; every loser still owns its own.
    for n, iccid in enumerate(iccids):
        owner = await store.get_by_ip(f"10.1.0.{n}")
        assert owner == (None if iccid == winners[0].iccid else await store.get(iccid))


async def test_redis_down_is_store_unavailable(redis_server: RedisServer) -> None:
    store = RedisDeviceStore.from_url(redis_server.url)
    try:
        await store.create(Device(iccid=A, ip="10.0.0.1"))
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.get(A)
        with pytest.raises(StoreUnavailable):
            await store.create(Device(iccid=B, ip="10.0.0.2"))
        redis_server.start()
        # Data is gone (no persistence), but the same store object works again.
        assert await store.get(A) is None
    finally:
        await store.close()


async def test_redis_hash_fields_unknown_to_this_version_are_ignored(
    redis_server: RedisServer,
) -> None:
    store = RedisDeviceStore.from_url(redis_server.url, prefix="test")
    try:
        await store.create(Device(iccid=A, ip="10.0.0.1"))
        redis_server.execute("HSET", f"test:{{dev}}:device:{A}", "location", "52.5,13.4")
        assert await store.get(A) == Device(iccid=A, ip="10.0.0.1")
    finally:
        await store.close()
