"""One contract for every Admission (api/admission.py): the stores asked side by side, in
memory and in a real redis-server, and both questions in one script on one server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from api.admission import Admission, RedisAdmission, SeparateAdmission, admission_for
from api.errors import StoreUnavailable
from api.idempotency import build_ledger, settle_keys
from api.store.base import Device, DeviceStore
from api.store.memory import MemoryDeviceStore
from api.store.redis_store import RedisDeviceStore
from stores.keys import idempotency_prefix
from stores.ledger import Claim, ClientRunner, Ledger, RedisLedger, redis_ledger
from stores.redis import connect
from tests.support.services import RedisServer

A = "8988280666000000001"
B = "8988280666000000002"
OFF = "8988280666000000003"


@dataclass
class Rig:
    admission: Admission
    store: DeviceStore
    idempotency: Ledger


@pytest.fixture(
    params=["separate, memory", "separate, redis", "one script, redis", "one script, redis-py"]
)
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    if request.param == "separate, memory":
        store: DeviceStore = MemoryDeviceStore()
        idempotency: Ledger = build_ledger(None, "adm")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisDeviceStore.from_url(server.url, prefix="adm")
        if request.param.endswith("redis-py"):  # the script through redis-py, not our link
            idempotency = RedisLedger(
                ClientRunner(connect(server.url, timeout=2.0, retries=None)),
                prefix=idempotency_prefix("adm"),
                record_delay=60,
            )
        else:
            idempotency = redis_ledger(
                server.url, prefix=idempotency_prefix("adm"), record_delay=60
            )
    one_script = request.param.startswith("one script")
    admission = admission_for(store, idempotency, same_server=one_script)
    expected = RedisAdmission if one_script else SeparateAdmission
    assert isinstance(admission, expected)
    await store.create(Device(iccid=A, ip="10.1.0.1", status="active"))
    await store.create(Device(iccid=B, ip="10.1.0.2", status="active"))
    await store.create(Device(iccid=OFF, ip="10.1.0.3", status="inactive"))
    try:
        yield Rig(admission, store, idempotency)
    finally:
        await idempotency.close()
        await store.close()


async def test_devices_come_back_in_the_order_asked(rig: Rig) -> None:
    a, b, off = await rig.store.get(A), await rig.store.get(B), await rig.store.get(OFF)
    admitted = await rig.admission.admit(
        [B, "8988280666000009999", A], ["10.1.0.3", "10.9.9.9", "not an ip", "10.1.0.1"], []
    )
    assert admitted.lookup_error is None
    assert admitted.by_identity == [b, None, a]
    # The caller decides about inactive devices; unknown and unreadable addresses name nobody.
    assert admitted.by_ip == [off, None, None, a]
    assert admitted.claims == []


async def test_a_moved_device_is_found_under_its_new_address_only(rig: Rig) -> None:
    await rig.store.update(A, ip="10.1.0.9")
    moved = await rig.store.get(A)
    admitted = await rig.admission.admit([], ["10.1.0.1", "10.1.0.9"], [])
    assert admitted.by_ip == [None, moved]


async def test_claims_are_made_with_the_lookup_and_see_settled_answers(rig: Rig) -> None:
    first = await rig.admission.admit([], ["10.1.0.1"], ["k1", "k2", "k1"])
    assert first.claims == [Claim.OWNED, Claim.OWNED, Claim.BUSY]
    settle_keys(rig.idempotency, [("k1", b"204")], ["k2"])  # queued under Redis (60 s)
    second = await rig.admission.admit([A], [], ["k1", "k2"])
    assert second.claims == [b"204", Claim.OWNED]
    assert second.by_identity == [await rig.store.get(A)]


async def test_one_script_needs_a_server_that_is_up(redis_server: RedisServer) -> None:
    store = RedisDeviceStore.from_url(redis_server.url, prefix="adm")
    idempotency = redis_ledger(redis_server.url, prefix=idempotency_prefix("adm"))
    admission = RedisAdmission(store, idempotency)
    try:
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await admission.admit([A], ["10.1.0.1"], ["k"])
    finally:
        redis_server.start()
        await idempotency.close()
        await store.close()


async def test_stores_given_from_elsewhere_are_asked_side_by_side(
    redis_server: RedisServer,
) -> None:
    # Not known to share a server (same_server=False), or not both in Redis: no shared script.
    store = RedisDeviceStore.from_url(redis_server.url, prefix="adm")
    idempotency = build_ledger(redis_server.url, "adm")
    try:
        assert isinstance(admission_for(store, idempotency, same_server=False), SeparateAdmission)
        assert isinstance(
            admission_for(MemoryDeviceStore(), idempotency, same_server=True), SeparateAdmission
        )
        assert isinstance(admission_for(store, idempotency, same_server=True), RedisAdmission)
    finally:
        await idempotency.close()
        await store.close()
