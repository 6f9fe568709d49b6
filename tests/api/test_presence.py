"""Presence (api/presence.py, GET /devices/{id}/presence): retained online/offline messages on a
real broker, found by a late subscriber; offline after the lifetime (the watcher's clock is
moved, not slept through); the management route."""

from __future__ import annotations

import json

import pytest

from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from tests.api.conftest import proxied
from tests.api.signed_support import AUTH, NOW, register, sign_of, signed_app
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer

PK, DK = "PkStatus", "dev-7"
DEVICE = f"{PK}:{DK}"
IP = "10.64.2.1"


def _auth(secret: str, lifetime: int = 30, dk: str = DK) -> bytes:
    sign = sign_of(PK, dk, lifetime, secret)
    return json.dumps({"secureMode": 2, "lifetime": lifetime, "sign": sign}).encode()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_status_is_retained_online_then_offline_after_the_lifetime(
    mosquitto: MosquittoServer, request: pytest.FixtureRequest, backend: str
) -> None:
    redis_url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    topic = f"devices/{DEVICE}/status"
    async with signed_app(mosquitto, redis_url=redis_url) as signed:
        secret = await register(signed.http, PK, DK)
        answer = await signed.http.post(
            f"/auth/{PK}/{DK}", content=_auth(secret), headers=proxied(IP)
        )
        assert answer.status_code == 200
        await signed.watcher.close(drain=2.0)  # published (the queue drained) …
        await signed.watcher.start()
        # … and retained: a subscriber that comes afterwards gets it.
        async with subscribed(mosquitto.url, topic, retained=True) as late:
            [online] = await late.wait_for(1)
            assert online.retain
            assert json.loads(online.payload) == {  # type: ignore[arg-type]
                "device": DEVICE,
                "status": "online",
                "at": int(NOW * 1000),
            }
            presence = await signed.http.get(f"/devices/{DEVICE}/presence", headers=AUTH)
            assert presence.json() == {
                "device": DEVICE,
                "online": True,
                "last_seen": "2027-01-15T08:00:00Z",
                "expires_at": "2027-01-15T08:00:30Z",
            }
            signed.clock.now += 29
            await late.assert_silent(0.3)  # still within its lifetime: no offline
            signed.clock.now += 1
            [_, offline] = await late.wait_for(2)
            assert json.loads(offline.payload)["status"] == "offline"  # type: ignore[arg-type]
            assert json.loads(offline.payload)["at"] == int((NOW + 30) * 1000)  # type: ignore[arg-type]
        presence = await signed.http.get(f"/devices/{DEVICE}/presence", headers=AUTH)
        assert presence.json()["online"] is False
        assert presence.json()["last_seen"] == "2027-01-15T08:00:00Z"
        assert presence.json()["expires_at"] is None
        async with subscribed(mosquitto.url, topic, retained=True) as later:
            [retained] = await later.wait_for(1)
            assert json.loads(retained.payload)["status"] == "offline"  # type: ignore[arg-type]


async def test_one_online_message_for_many_messages(mosquitto: MosquittoServer) -> None:
    async with signed_app(mosquitto) as signed:
        secret = await register(signed.http, PK, "dev-8")
        async with subscribed(mosquitto.url, f"devices/{PK}:dev-8/status") as statuses:
            await signed.http.post(
                f"/auth/{PK}/dev-8", content=_auth(secret, dk="dev-8"), headers=proxied(IP)
            )
            for _ in range(3):
                path = f"/topic/sys/{PK}/dev-8/thing/model/up_raw"
                assert (
                    await signed.http.post(path, content=b"x", headers=proxied(IP))
                ).status_code == 204
            [online] = await statuses.wait_for(1)
            assert json.loads(online.payload)["status"] == "online"  # type: ignore[arg-type]
            await statuses.assert_silent(0.3)


async def test_the_presence_route(mosquitto: MosquittoServer) -> None:
    store = MemoryDeviceStore()
    await store.create(Device(iccid="8988280666000000001", ip="10.0.0.1"))
    async with signed_app(mosquitto, store=store) as signed:
        http = signed.http
        # A SIM device that never spoke through a presence-keeping route: known, offline.
        answer = await http.get("/devices/8988280666000000001/presence", headers=AUTH)
        assert answer.json() == {
            "device": "8988280666000000001",
            "online": False,
            "last_seen": None,
            "expires_at": None,
        }
        assert (await http.get("/devices/nobody/presence", headers=AUTH)).status_code == 404
        assert (await http.get(f"/devices/{PK}:nobody/presence", headers=AUTH)).status_code == 404
        assert (await http.get("/devices/8988280666000000001/presence")).status_code == 401
        # A noted device that the API knows.
        await signed.watcher.note("8988280666000000001", 3600)
        answer = await http.get("/devices/8988280666000000001/presence", headers=AUTH)
        assert answer.json()["online"] is True
        assert answer.json()["expires_at"] == "2027-01-15T09:00:00Z"


async def test_a_deleted_device_gets_no_offline_message(mosquitto: MosquittoServer) -> None:
    async with signed_app(mosquitto) as signed:
        secret = await register(signed.http, PK, "dev-9")
        async with subscribed(mosquitto.url, f"devices/{PK}:dev-9/status") as statuses:
            await signed.http.post(
                f"/auth/{PK}/dev-9", content=_auth(secret, dk="dev-9"), headers=proxied(IP)
            )
            await statuses.wait_for(1)
            answer = await signed.http.delete(f"/products/{PK}/devices/dev-9", headers=AUTH)
            assert answer.status_code == 204
            # The retained status is cleared (an empty retained message) …
            [_, cleared] = await statuses.wait_for(2)
            assert cleared.payload == b""
            signed.clock.now += 60
            # … and no offline message follows.
            await statuses.assert_silent(0.3)
        assert (
            await signed.http.get(f"/devices/{PK}:dev-9/presence", headers=AUTH)
        ).status_code == 404
        # A subscriber that comes later learns nothing of the device.
        async with subscribed(mosquitto.url, f"devices/{PK}:dev-9/status", retained=True) as later:
            await later.assert_silent(0.3)


async def test_deleting_a_managed_device_clears_its_status(mosquitto: MosquittoServer) -> None:
    async with signed_app(mosquitto) as signed:
        http = signed.http
        created = await http.post("/devices", json={"id": "gone-1"}, headers=AUTH)
        assert created.status_code == 201, created.text
        await signed.watcher.note("gone-1", 3600)
        await signed.watcher.close(drain=2.0)  # the online status is on the broker
        await signed.watcher.start()
        async with subscribed(mosquitto.url, "devices/gone-1/status", retained=True) as before:
            [online] = await before.wait_for(1)
        assert json.loads(online.payload)["status"] == "online"  # type: ignore[arg-type]
        assert (await http.delete("/devices/gone-1", headers=AUTH)).status_code == 204
        await signed.watcher.close(drain=2.0)
        await signed.watcher.start()
        async with subscribed(mosquitto.url, "devices/gone-1/status", retained=True) as after:
            await after.assert_silent(0.3)
