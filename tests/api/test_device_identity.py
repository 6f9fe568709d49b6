"""Issue 16: devices named by an id other than an ICCID (the managed-PSK profile), beside SIMs.

The store contract on both stores (memory and a real redis-server): a device without ICCID or
address, the IMEI index, records written before devices had an id; and the management API's
``POST /devices`` forms. A SIM keeps behaving exactly as before (tests/api/test_devices.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import ValidationError

from api.errors import DeviceExists, DeviceNotFound, ImeiInUse, IpInUse
from api.store.base import Device, DeviceStore
from api.store.redis_store import RedisDeviceStore
from policies.topics import render_topic
from tests.api.conftest import AUTH, asgi_client, build_app
from tests.support.services import RedisServer

SIM = "8988280666000000001"
NODE = "koru-869181072798893"
IMEI = "869181072798893"
OTHER_IMEI = "869181072798901"


async def test_a_sim_is_a_device_whose_id_is_its_iccid() -> None:
    sim = Device(iccid=SIM, ip="10.0.0.1")
    assert (sim.id, sim.iccid) == (SIM, SIM)
    assert Device(id=SIM, iccid=SIM, ip="10.0.0.1") == sim
    with pytest.raises(ValidationError, match="a SIM's id is its ICCID"):
        Device(id=NODE, iccid=SIM, ip="10.0.0.1")
    # Neither: nothing names the device.
    with pytest.raises(ValidationError, match="id"):
        Device(ip="10.0.0.1")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": "koru/1"}, "id must be 1-128 characters"),
        ({"id": "koru 1"}, "id must be 1-128 characters"),
        ({"id": "koru+1"}, "id must be 1-128 characters"),
        ({"id": "#"}, "id must be 1-128 characters"),
        ({"id": "-koru"}, "starting with a letter or digit"),
        ({"id": "x" * 129}, "id must be 1-128 characters"),
        ({"id": ""}, "id must be 1-128 characters"),
        ({"imei": "86918107279889"}, "imei must be 15 digits"),
        ({"imei": "86918107279889x"}, "imei must be 15 digits"),
    ],
)
def test_bad_ids_and_imeis_are_refused_with_the_rule(changes: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Device.model_validate({"id": NODE, **changes})


def test_an_id_may_hold_dots_colons_and_dashes() -> None:
    for device_id in ("koru-1", "a.b", "pk:dk", "A_1", "x" * 128, "7"):
        assert Device(id=device_id).id == device_id


async def test_a_device_without_iccid_or_address(any_store: DeviceStore) -> None:
    node = await any_store.create(Device(id=NODE, imei=IMEI))
    assert (node.iccid, node.ip, node.imei) == (None, None, IMEI)
    assert await any_store.get(NODE) == node
    assert await any_store.get_by_imei(IMEI) == node
    assert await any_store.get_by_imei(OTHER_IMEI) is None
    # No address: the ip index holds nothing for it, and a SIM may hold any address.
    sim = await any_store.create(Device(iccid=SIM, ip="10.0.0.1"))
    assert await any_store.get_by_ip("10.0.0.1") == sim
    assert await any_store.list() == [sim, node]  # by id
    assert await any_store.get_many([NODE, SIM, "nobody"]) == [node, sim, None]


async def test_the_imei_index_names_one_device(any_store: DeviceStore) -> None:
    await any_store.create(Device(id=NODE, imei=IMEI))
    with pytest.raises(ImeiInUse, match=f"imei {IMEI} is already used by device {NODE}"):
        await any_store.create(Device(id="koru-2", imei=IMEI))
    assert await any_store.get("koru-2") is None
    second = await any_store.create(Device(id="koru-2", imei=OTHER_IMEI))
    with pytest.raises(ImeiInUse):
        await any_store.update("koru-2", imei=IMEI)
    assert await any_store.get_by_imei(OTHER_IMEI) == second
    with pytest.raises(DeviceExists):
        await any_store.create(Device(id=NODE))


async def test_changing_and_clearing_the_imei_and_ip_moves_the_indexes(
    any_store: DeviceStore,
) -> None:
    await any_store.create(Device(id=NODE, imei=IMEI))
    moved = await any_store.update(NODE, imei=OTHER_IMEI, ip="10.0.0.5")
    assert await any_store.get_by_imei(IMEI) is None
    assert await any_store.get_by_imei(OTHER_IMEI) == moved
    assert await any_store.get_by_ip("10.0.0.5") == moved
    cleared = await any_store.update(NODE, imei=None, ip=None)
    assert await any_store.get_by_imei(OTHER_IMEI) is None
    assert await any_store.get_by_ip("10.0.0.5") is None
    assert await any_store.get(NODE) == cleared
    # What was given up is free for another device.
    await any_store.create(Device(id="koru-2", imei=OTHER_IMEI, ip="10.0.0.5"))
    with pytest.raises(IpInUse):
        await any_store.update(NODE, ip="10.0.0.5")
    with pytest.raises(ValueError, match="the id of a device cannot change"):
        await any_store.update(NODE, id="koru-3")


async def test_delete_frees_the_imei(any_store: DeviceStore) -> None:
    await any_store.create(Device(id=NODE, imei=IMEI, psk="k" * 16))
    await any_store.delete(NODE)
    assert await any_store.get(NODE) is None
    assert await any_store.get_by_imei(IMEI) is None
    with pytest.raises(DeviceNotFound):
        await any_store.delete(NODE)
    again = await any_store.create(Device(id="koru-2", imei=IMEI))
    assert await any_store.get_by_imei(IMEI) == again


async def test_concurrent_creates_claim_an_imei_once(any_store: DeviceStore) -> None:
    results = await asyncio.gather(
        *(any_store.create(Device(id=f"koru-{n}", imei=IMEI)) for n in range(12)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Device)]
    assert len(winners) == 1
    assert all(isinstance(r, ImeiInUse) for r in results if not isinstance(r, Device))
    assert await any_store.get_by_imei(IMEI) == winners[0]
    assert await any_store.list() == winners


async def test_a_record_stored_without_an_id_loads_as_a_sim(redis_server: RedisServer) -> None:
    """A hash written before devices had ids (only ``iccid``, ``ip``, ``status``) is a SIM whose
    id is its ICCID, found by id and by address; an update writes the id field."""
    store = RedisDeviceStore.from_url(redis_server.url, prefix="old")
    try:
        redis_server.execute(
            "HSET", f"old:{{dev}}:device:{SIM}", "iccid", SIM, "ip", "10.0.0.1", "status", "active"
        )
        redis_server.execute("SET", "old:{dev}:ip:10.0.0.1", SIM)
        redis_server.execute("SADD", "old:{dev}:devices", SIM)
        expected = Device(iccid=SIM, ip="10.0.0.1")
        assert await store.get(SIM) == expected
        assert await store.get_by_ip("10.0.0.1") == expected
        assert await store.list() == [expected]
        await store.update(SIM, status="inactive")
        stored = redis_server.execute("HGET", f"old:{{dev}}:device:{SIM}", "id")
        assert stored == f"${len(SIM)}\r\n{SIM}\r\n".encode()  # RESP bulk string
    finally:
        await store.close()


def test_render_topic_knows_device_and_iccid() -> None:
    assert render_topic("devices/{iccid}/messages", iccid=SIM) == f"devices/{SIM}/messages"
    # {iccid} is the device id when the device has no ICCID; {device} always is.
    assert render_topic("devices/{iccid}/messages", device=NODE) == f"devices/{NODE}/messages"
    assert render_topic("d/{device}/{iccid}", device=NODE, iccid=None) == f"d/{NODE}/{NODE}"
    assert render_topic("d/{device}/{iccid}", device=SIM, iccid=SIM) == f"d/{SIM}/{SIM}"
    assert render_topic("d/{device}", iccid=SIM) == f"d/{SIM}"


# --- the management API ----------------------------------------------------------------------


@pytest.fixture
async def api(any_store: DeviceStore) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(build_app(any_store)) as http:
        yield http


async def test_register_a_device_by_id_and_imei(api: httpx.AsyncClient) -> None:
    created = await api.post("/devices", json={"id": NODE, "imei": IMEI}, headers=AUTH)
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["id"], body["iccid"], body["imei"], body["ip"], body["status"]) == (
        NODE,
        None,
        IMEI,
        None,
        "active",
    )
    assert "psk" not in body
    got = await api.get(f"/devices/{NODE}", headers=AUTH)
    assert got.status_code == 200
    assert got.json() == body
    patched = await api.patch(f"/devices/{NODE}", json={"status": "inactive"}, headers=AUTH)
    assert patched.json()["status"] == "inactive"
    taken = await api.post("/devices", json={"id": "koru-2", "imei": IMEI}, headers=AUTH)
    assert taken.status_code == 409
    assert taken.json() == {"detail": f"imei {IMEI} is already used by device {NODE}"}
    duplicate = await api.post("/devices", json={"id": NODE}, headers=AUTH)
    assert duplicate.status_code == 409
    assert duplicate.json() == {"detail": f"device {NODE} already exists"}
    assert (await api.delete(f"/devices/{NODE}", headers=AUTH)).status_code == 204
    assert (await api.get(f"/devices/{NODE}", headers=AUTH)).status_code == 404


async def test_a_sim_is_registered_as_before_and_shows_its_id(api: httpx.AsyncClient) -> None:
    created = await api.post("/devices", json={"iccid": SIM, "ip": "10.0.0.1"}, headers=AUTH)
    assert created.status_code == 201
    assert (created.json()["id"], created.json()["iccid"]) == (SIM, SIM)
    # Registered by its ICCID alone; the id is not given again (the document says so too).
    both = await api.post(
        "/devices", json={"id": SIM, "iccid": SIM, "ip": "10.0.0.2"}, headers=AUTH
    )
    assert both.status_code == 422
    assert "not both" in both.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        ({"id": "koru/1"}, ["body", "id"], "id must be 1-128 characters"),
        ({"id": NODE, "imei": "123"}, ["body", "imei"], "imei must be 15 digits"),
        ({"iccid": SIM}, ["body", "ip"], "a SIM needs its ip"),
        ({"ip": "10.0.0.1"}, ["body", "iccid"], "give an id, or a SIM's iccid"),
        ({}, ["body", "iccid"], "give an id, or a SIM's iccid"),
        ({"id": NODE, "iccid": SIM, "ip": "10.0.0.1"}, ["body", "iccid"], "not both"),
        ({"id": NODE, "psk": "x"}, ["body", "psk"], "Extra inputs are not permitted"),
        ({"id": NODE, "ip": None}, ["body"], "ip may not be null"),
    ],
)
async def test_bad_registrations_are_422_and_say_why(
    api: httpx.AsyncClient, body: dict[str, str], loc: list[str], message: str
) -> None:
    response = await api.post("/devices", json=body, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == loc
    assert message in error["msg"]
    assert (await api.get("/devices", headers=AUTH)).json() == []


async def test_patch_sets_the_imei(api: httpx.AsyncClient) -> None:
    await api.post("/devices", json={"id": NODE}, headers=AUTH)
    patched = await api.patch(f"/devices/{NODE}", json={"imei": IMEI}, headers=AUTH)
    assert patched.status_code == 200
    assert patched.json()["imei"] == IMEI
    refused = await api.patch(f"/devices/{NODE}", json={"imei": None}, headers=AUTH)
    assert refused.status_code == 422  # null is not "unset" (as for every patch field)
    assert "may not be null" in refused.json()["detail"][0]["msg"]
