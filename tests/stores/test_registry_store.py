"""The signed-session registry and sessions (stores/registry.py): one contract for memory, a
real redis-server and a real 3-node Cluster, and the replay rules of docs/PROFILES.md."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from stores.registry import (
    AuthOutcome,
    DeviceKeyTaken,
    DeviceNotRegistered,
    MemoryRegistry,
    Product,
    ProductExists,
    ProductHasDevices,
    ProductNotFound,
    RedisRegistry,
    RegisteredDevice,
    Registry,
    RegistryUnavailable,
    device_id,
    registry_for,
    valid_device_key,
    valid_product_key,
)
from tests.support.services import RedisServer

PREFIX = "t"
NOW = 1_700_000_000.0
PRODUCT = Product("Pk0001", "product-secret", "meters", NOW)
DEVICE = RegisteredDevice("Pk0001", "869181072798893", "device-secret", NOW)
DEV = device_id("Pk0001", "869181072798893")
SIGN, OTHER_SIGN = "A" * 64, "B" * 64


@pytest.fixture(params=["memory", "redis", "cluster"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    if request.param == "memory":
        built = registry_for(None, PREFIX)
        assert isinstance(built, MemoryRegistry)
    else:
        fixture = "redis_server" if request.param == "redis" else f"redis_{request.param}"
        built = registry_for(request.getfixturevalue(fixture).url, PREFIX)
        assert isinstance(built, RedisRegistry)
        assert built.cluster == (request.param == "cluster")
    yield built
    await built.close()


@pytest.mark.parametrize(
    ("key", "product_ok", "device_ok"),
    [
        ("Pk0001", True, True),
        ("a.b_c-d", True, True),
        ("869181072798893", True, True),
        ("aa:bb:cc", False, True),  # ':' only in a deviceKey: the id splits at the first
        ("_x", False, True),
        ("", False, False),
        ("a/b", False, False),
        ("a b", False, False),
        ("a" * 63, True, True),
        ("a" * 64, False, True),
        ("a" * 65, False, False),
    ],
)
def test_key_rules(key: str, product_ok: bool, device_ok: bool) -> None:
    assert valid_product_key(key) is product_ok
    assert valid_device_key(key) is device_ok


async def test_products_and_devices_round_trip(registry: Registry) -> None:
    await registry.create_product(PRODUCT)
    with pytest.raises(ProductExists):
        await registry.create_product(PRODUCT)
    assert await registry.get_product("Pk0001") == PRODUCT
    assert await registry.get_product("nope") is None
    await registry.create_product(Product("Aa", "s", None, NOW))
    assert [p.product_key for p in await registry.list_products()] == ["Aa", "Pk0001"]
    await registry.create_device(DEVICE)
    with pytest.raises(DeviceKeyTaken):
        await registry.create_device(DEVICE)
    with pytest.raises(ProductNotFound):
        await registry.create_device(RegisteredDevice("nope", "d", "s", NOW))
    assert await registry.get_device("Pk0001", DEVICE.device_key) == DEVICE
    assert await registry.get_device("Aa", DEVICE.device_key) is None
    assert await registry.list_devices("Pk0001") == [DEVICE]
    assert await registry.list_devices("Aa") == []
    with pytest.raises(ProductNotFound):
        await registry.list_devices("nope")


async def test_a_product_with_devices_is_not_deleted(registry: Registry) -> None:
    await registry.create_product(PRODUCT)
    await registry.create_device(DEVICE)
    with pytest.raises(ProductHasDevices):
        await registry.delete_product("Pk0001")
    await registry.delete_device("Pk0001", DEVICE.device_key)
    with pytest.raises(DeviceNotRegistered):
        await registry.delete_device("Pk0001", DEVICE.device_key)
    await registry.delete_product("Pk0001")
    with pytest.raises(ProductNotFound):
        await registry.delete_product("Pk0001")
    assert await registry.list_products() == []


async def test_a_session_opens_and_is_kept_alive_from_its_address(registry: Registry) -> None:
    assert await registry.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW) is AuthOutcome.OPENED
    assert await registry.use_session(DEV, "10.0.0.2", now=NOW + 1) is None  # other address
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 20) == 30
    # Sliding: alive 30 s after the last message, not after the auth.
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 45) == 30
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 75) is None  # silent 30 s
    assert await registry.use_session("other:dev", "10.0.0.1", now=NOW) is None


async def test_the_same_auth_again_changes_nothing(registry: Registry) -> None:
    await registry.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW)
    assert await registry.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW + 20) is AuthOutcome.SAME
    # Not extended by it: the session ends 30 s after the first auth.
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 30) is None
    await registry.open_session(DEV, OTHER_SIGN, "10.0.0.1", 40, now=NOW + 31)
    # The same auth from another address (the device's address changed) moves the session
    # there, and gives it no more time: it still ends 40 s after NOW + 31.
    assert (
        await registry.open_session(DEV, OTHER_SIGN, "10.9.9.9", 40, now=NOW + 32)
        is AuthOutcome.MOVED
    )
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 33) is None
    assert (
        await registry.open_session(DEV, OTHER_SIGN, "10.0.0.1", 40, now=NOW + 70)
        is AuthOutcome.MOVED
    )
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 71) is None  # ended at +71


async def test_a_replayed_auth_opens_at_most_one_unused_session(registry: Registry) -> None:
    # The device authenticates and speaks: its sign may open a session again later.
    await registry.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW)
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 1) == 30
    # An attacker replays the captured auth after the session ended: one session, unused …
    assert (
        await registry.open_session(DEV, SIGN, "10.6.6.6", 30, now=NOW + 40) is AuthOutcome.OPENED
    )
    # … and after it, the same capture opens nothing, from anywhere.
    assert (
        await registry.open_session(DEV, SIGN, "10.6.6.6", 30, now=NOW + 80) is AuthOutcome.UNUSED
    )
    assert (
        await registry.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW + 90) is AuthOutcome.UNUSED
    )
    # The device authenticates with another lifetime (another sign) and speaks: the old sign
    # is usable again (the device spoke since it was last used).
    assert (
        await registry.open_session(DEV, OTHER_SIGN, "10.0.0.1", 60, now=NOW + 100)
        is AuthOutcome.OPENED
    )
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 101) == 60
    assert (
        await registry.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW + 200) is AuthOutcome.OPENED
    )


async def test_deleting_a_device_ends_its_session(registry: Registry) -> None:
    await registry.create_product(PRODUCT)
    await registry.create_device(DEVICE)
    await registry.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW)
    await registry.delete_device("Pk0001", DEVICE.device_key)
    assert await registry.use_session(DEV, "10.0.0.1", now=NOW + 1) is None
    # Created again: a clean slate (its old unused sign does not lock it out).
    await registry.create_device(DEVICE)
    assert await registry.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW + 2) is AuthOutcome.OPENED


async def test_two_replicas_opening_one_session_at_once_open_it_once(
    redis_server: RedisServer,
) -> None:
    a, b = registry_for(redis_server.url, PREFIX), registry_for(redis_server.url, PREFIX)
    try:
        outcomes = await asyncio.gather(
            *(r.open_session(DEV, SIGN, "10.0.0.1", 30, now=NOW) for r in (a, b) * 5)
        )
        assert outcomes.count(AuthOutcome.OPENED) == 1
        assert set(outcomes) == {AuthOutcome.OPENED, AuthOutcome.SAME}
        assert await b.use_session(DEV, "10.0.0.1", now=NOW + 1) == 30
    finally:
        await a.close()
        await b.close()


async def test_the_session_key_expires_with_the_session(redis_server: RedisServer) -> None:
    registry = registry_for(redis_server.url, PREFIX)
    try:
        await registry.open_session(DEV, SIGN, "10.0.0.1", 30)
        ttl = int(redis_server.execute("PTTL", f"{PREFIX}:{{ss:{DEV}}}:session")[1:-2])
        assert 0 < ttl <= 30_000
    finally:
        await registry.close()


async def test_redis_down_is_registry_unavailable(redis_server: RedisServer) -> None:
    registry = registry_for(redis_server.url, PREFIX)
    try:
        redis_server.stop()
        with pytest.raises(RegistryUnavailable):
            await registry.get_product("Pk0001")
        with pytest.raises(RegistryUnavailable):
            await registry.open_session(DEV, SIGN, "10.0.0.1", 30)
    finally:
        await registry.close()
