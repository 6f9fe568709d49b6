"""The managed-PSK credentials API at the platform's path, on both stores (memory and a real
redis-server): issue (shown once), list (never the key), revoke; each change announced to the
proxies' PSK mirrors on the store's channel."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from api.routes import managed_credentials
from api.store.base import Device, DeviceStore
from api.store.redis_store import RedisDeviceStore
from tests.api.conftest import (
    AUTH,
    COAPS_URL,
    REDIS_PREFIX,
    START,
    Clock,
    asgi_client,
    build_app,
    psk_events,
)
from tests.support.services import RedisServer

NODE = "koru-869181072798893"
PATH = f"/api/v4/manage/devices/{NODE}/credentials/"


def managed_app(store: DeviceStore, clock: Clock, **overrides: object) -> FastAPI:
    app = build_app(store, clock, profiles=["managed_psk"], **overrides)
    if not any(getattr(route, "path", "").startswith("/api/v4/") for route in app.routes):
        app.include_router(managed_credentials.router)  # until api/profiles.py lists it
    return app


@pytest.fixture
async def api(any_store: DeviceStore, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    await any_store.create(Device(id=NODE, imei="869181072798893"))
    async with asgi_client(managed_app(any_store, clock)) as http:
        yield http


async def test_issue_list_revoke(api: httpx.AsyncClient, any_store: DeviceStore) -> None:
    issued = await api.post(PATH, json={"auth_type": "psk"}, headers=AUTH)
    assert issued.status_code == 201, issued.text
    assert issued.headers["cache-control"] == "no-store"
    body = issued.json()
    assert set(body) == {"id", "auth_type", "psk_identity", "psk_key", "server", "status"}
    assert uuid.UUID(body["id"]).version == 4
    assert (body["auth_type"], body["psk_identity"], body["server"], body["status"]) == (
        "psk",
        NODE,
        COAPS_URL,
        "active",
    )
    assert re.fullmatch(r"[0-9a-f]{64}", body["psk_key"])
    # The key is the device's PSK under its id, which is the DTLS identity the proxy looks up;
    # bootstrap never rotates it.
    device = await any_store.get(NODE)
    assert device is not None
    assert (device.psk, device.psk_user_set) == (body["psk_key"], True)

    listed = await api.get(PATH, headers=AUTH)
    assert listed.status_code == 200
    assert listed.json() == [
        {
            "id": body["id"],
            "auth_type": "psk",
            "psk_identity": NODE,
            "server": COAPS_URL,
            "status": "active",
            "created_at": START.isoformat().replace("+00:00", "Z"),
        }
    ]
    assert body["psk_key"] not in listed.text
    assert body["psk_key"] not in (await api.get(f"/devices/{NODE}", headers=AUTH)).text

    revoked = await api.delete(f"{PATH}{body['id']}/", headers=AUTH)
    assert revoked.status_code == 204
    device = await any_store.get(NODE)
    assert device is not None
    assert device.psk is None
    [after] = (await api.get(PATH, headers=AUTH)).json()
    assert (after["id"], after["status"]) == (body["id"], "revoked")
    # Idempotent.
    assert (await api.delete(f"{PATH}{body['id']}/", headers=AUTH)).status_code == 204


async def test_a_new_credential_replaces_the_old(
    api: httpx.AsyncClient, any_store: DeviceStore, clock: Clock
) -> None:
    first = (await api.post(PATH, json={"auth_type": "psk"}, headers=AUTH)).json()
    clock.advance(minutes=5)
    second = (await api.post(PATH, json={"auth_type": "psk"}, headers=AUTH)).json()
    assert first["id"] != second["id"]
    assert first["psk_key"] != second["psk_key"]
    device = await any_store.get(NODE)
    assert device is not None
    assert device.psk == second["psk_key"]
    [listed] = (await api.get(PATH, headers=AUTH)).json()
    assert (listed["id"], listed["status"]) == (second["id"], "active")
    # The replaced credential is not the device's any more: revoking it is a 404, and the
    # current key stays.
    stale = await api.delete(f"{PATH}{first['id']}/", headers=AUTH)
    assert stale.status_code == 404
    assert stale.json() == {"detail": f"device {NODE} has no credential {first['id']}"}
    assert (await any_store.get(NODE)).psk == second["psk_key"]  # type: ignore[union-attr]
    # A revoked credential is revived by nothing but a new POST.
    await api.delete(f"{PATH}{second['id']}/", headers=AUTH)
    third = (await api.post(PATH, json={"auth_type": "psk"}, headers=AUTH)).json()
    [listed] = (await api.get(PATH, headers=AUTH)).json()
    assert (listed["id"], listed["status"]) == (third["id"], "active")


async def test_a_key_removed_elsewhere_lists_the_credential_as_revoked(
    api: httpx.AsyncClient,
) -> None:
    issued = (await api.post(PATH, json={"auth_type": "psk"}, headers=AUTH)).json()
    assert (await api.delete(f"/devices/{NODE}/psk", headers=AUTH)).status_code == 204
    [listed] = (await api.get(PATH, headers=AUTH)).json()
    assert (listed["id"], listed["status"]) == (issued["id"], "revoked")


async def test_no_credential_lists_empty(api: httpx.AsyncClient) -> None:
    listed = await api.get(PATH, headers=AUTH)
    assert (listed.status_code, listed.json()) == (200, [])
    missing = await api.delete(f"{PATH}{uuid.uuid4()}/", headers=AUTH)
    assert missing.status_code == 404
    assert "has no credential" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"auth_type": "x509"}, ["body", "auth_type"]),
        ({}, ["body", "auth_type"]),
        ({"auth_type": "psk", "psk_key": "mine"}, ["body", "psk_key"]),
    ],
)
async def test_anything_but_psk_is_422(
    api: httpx.AsyncClient, any_store: DeviceStore, body: dict[str, str], loc: list[str]
) -> None:
    response = await api.post(PATH, json=body, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == loc
    assert (await any_store.get(NODE)).psk is None  # type: ignore[union-attr]
    malformed = await api.post(
        PATH, content=b"{auth_type", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert malformed.status_code in (400, 422)


async def test_unknown_device_is_404_and_the_key_is_required(api: httpx.AsyncClient) -> None:
    for method in ("POST", "GET"):
        response = await api.request(
            method,
            "/api/v4/manage/devices/koru-nobody/credentials/",
            json={"auth_type": "psk"} if method == "POST" else None,
            headers=AUTH,
        )
        assert response.status_code == 404, method
        assert response.json() == {"detail": "device koru-nobody not found"}
    response = await api.post(PATH, json={"auth_type": "psk"})
    assert response.status_code == 401
    response = await api.get(PATH, headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


async def test_issue_and_revoke_are_announced_to_the_proxies(
    redis_server: RedisServer, clock: Clock
) -> None:
    """Each change PUBLISHes the device id on the PSK channel in its write's transaction: what
    makes every proxy replica's mirror re-read the key within a second (docs/CONTRACT.md §6)."""
    store = RedisDeviceStore.from_url(redis_server.url, prefix=REDIS_PREFIX)
    try:
        await store.create(Device(id=NODE))
        async with (
            asgi_client(managed_app(store, clock)) as api,
            psk_events(redis_server.url) as events,
        ):
            issued = (await api.post(PATH, json={"auth_type": "psk"}, headers=AUTH)).json()
            assert await events.next() == NODE
            await api.get(PATH, headers=AUTH)
            await events.assert_silent()
            await api.delete(f"{PATH}{issued['id']}/", headers=AUTH)
            assert await events.next() == NODE
    finally:
        await store.close()
