"""The API serves the resources of its enabled profiles (api/profiles.py, docs/PROFILES.md):
a resource of a profile not enabled is a 404 that names the profile; the always-on management
resources are served whatever the profiles."""

from __future__ import annotations

import httpx
import pytest

from api.profiles import ALWAYS_ON, PROFILE_ROUTERS, enabled_routers
from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from tests.api.conftest import ACTIVE, ACTIVE_IP, AUTH, asgi_client, build_app, proxied

DEVICE = proxied(ACTIVE_IP)
IMAGE = b"\x7fELF" + bytes(range(256)) * 4


async def _client(profiles: list[str]) -> httpx.AsyncClient:
    store = MemoryDeviceStore()
    await store.create(Device(iccid=ACTIVE, ip=ACTIVE_IP, status="active"))
    return asgi_client(build_app(store, profiles=profiles))


async def _upload(client: httpx.AsyncClient, version: str) -> None:
    answer = await client.put(
        f"/firmware/{version}",
        content=IMAGE,
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )
    assert answer.status_code == 201, answer.text  # firmware management is always on


async def test_managed_psk_only_serves_firmware_but_not_ingest() -> None:
    async with await _client(["managed_psk"]) as client:
        await _upload(client, "1.0.0")
        firmware = await client.get("/firmware/1.0.0", headers=DEVICE)
        ingest = await client.post(
            "/ingest", content=b"x", headers={**DEVICE, "Content-Type": "text/plain"}
        )
        batch = await client.post("/ingest/batch", content=b"", headers=DEVICE)
        bootstrap = await client.get("/bootstrap", headers=DEVICE)
        devices = await client.get("/devices", headers=AUTH)
    assert (firmware.status_code, firmware.content) == (200, IMAGE)
    for refused in (ingest, batch, bootstrap):
        assert refused.status_code == 404
        assert "sim_identity profile" in refused.json()["detail"]
    assert devices.status_code == 200


async def test_default_profile_does_not_serve_the_firmware_download() -> None:
    async with await _client(["sim_identity"]) as client:
        await _upload(client, "1.0.0")
        # The management router serves PUT and DELETE on this path: the device's GET is still
        # a 404 naming its profile, not a 405.
        firmware = await client.get("/firmware/1.0.0", headers=DEVICE)
        listed = await client.get("/firmware", headers=AUTH)
        location = await client.get("/location", headers=DEVICE)
    assert firmware.status_code == 404
    assert "managed_psk profile" in firmware.json()["detail"]
    assert listed.status_code == 200
    # Served: the route itself answers that it knows no position for this device.
    assert (location.status_code, location.json()) == (
        404,
        {"detail": "no location data for this device"},
    )


async def test_both_profiles_serve_both() -> None:
    async with await _client(["sim_identity", "managed_psk"]) as client:
        await _upload(client, "2.0.0")
        firmware = await client.get("/firmware/2.0.0", headers=DEVICE)
        bootstrap = await client.get("/bootstrap", headers=DEVICE)
    assert firmware.status_code == 200
    assert bootstrap.status_code == 200
    assert bootstrap.text.startswith(f"{ACTIVE},")


def test_disabled_resources_stay_out_of_the_openapi_document() -> None:
    app = build_app(MemoryDeviceStore(), profiles=["managed_psk"])
    paths = app.openapi()["paths"]
    assert "/firmware/{version}" in paths
    assert "/ingest" not in paths
    assert "/bootstrap" not in paths
    assert "/devices" in paths


@pytest.mark.parametrize("profile", list(PROFILE_ROUTERS))
def test_each_router_is_included_once(profile: str) -> None:
    routers = [*ALWAYS_ON, *enabled_routers(list(PROFILE_ROUTERS))]
    assert len({id(router) for router in routers}) == len(routers)
    assert all(any(router is seen for seen in routers) for router in PROFILE_ROUTERS[profile])
