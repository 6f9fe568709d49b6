"""The management API (/devices) on both stores, with its auth and validation failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.settings import ApiSettings
from api.store.base import DeviceStore
from api.store.memory import MemoryDeviceStore
from api.store.redis_store import RedisDeviceStore
from tests.api.conftest import API_KEY
from tests.support.services import RedisServer

A = "8988280666000000001"
B = "8988280666000000002"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class _NoPublisher:
    """The management API never publishes; a broker is not needed for these tests."""

    connected = False

    async def publish(self, topic: str, payload: bytes, properties: Any) -> None:
        raise AssertionError("the management API must not publish")

    async def close(self) -> None:
        return None


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[DeviceStore]:
    if request.param == "memory":
        yield MemoryDeviceStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisDeviceStore.from_url(server.url)
    try:
        yield redis_store
    finally:
        await redis_store.close()


def _client(store: DeviceStore, **settings: Any) -> httpx.AsyncClient:
    app = create_app(
        ApiSettings(**{"api_key": API_KEY, **settings}), store=store, publisher=_NoPublisher()
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


@pytest.fixture
async def client(store: DeviceStore) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(store) as http:
        yield http


async def test_crud_round_trip(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/devices", json={"iccid": A, "ip": "10.0.0.1", "status": "active"}, headers=AUTH
    )
    assert created.status_code == 201
    assert created.json() == {
        "id": A,
        "iccid": A,
        "imei": None,
        "ip": "10.0.0.1",
        "status": "active",
        "psk_user_set": None,
        "last_bootstrap_at": None,
        "terms_accepted": None,
        "location_barred": None,
        "location": None,
        "template": None,
    }
    await client.post("/devices", json={"iccid": B, "ip": "10.0.0.2"}, headers=AUTH)

    listed = await client.get("/devices", headers=AUTH)
    assert listed.status_code == 200
    assert [(d["iccid"], d["status"]) for d in listed.json()] == [(A, "active"), (B, "active")]

    got = await client.get(f"/devices/{A}", headers=AUTH)
    assert got.status_code == 200
    assert got.json()["ip"] == "10.0.0.1"

    patched = await client.patch(
        f"/devices/{A}", json={"ip": "10.0.0.9", "status": "inactive"}, headers=AUTH
    )
    assert patched.status_code == 200
    assert (patched.json()["ip"], patched.json()["status"]) == ("10.0.0.9", "inactive")
    assert (await client.get(f"/devices/{A}", headers=AUTH)).json()["ip"] == "10.0.0.9"

    # A partial patch leaves the other field alone.
    patched = await client.patch(f"/devices/{A}", json={"status": "active"}, headers=AUTH)
    assert (patched.json()["ip"], patched.json()["status"]) == ("10.0.0.9", "active")

    # The device attributes of onboarding (terms) and location access (issue #6).
    patched = await client.patch(
        f"/devices/{A}", json={"terms_accepted": True, "location_barred": True}, headers=AUTH
    )
    assert patched.status_code == 200
    assert (patched.json()["terms_accepted"], patched.json()["location_barred"]) == (True, True)
    got = (await client.get(f"/devices/{A}", headers=AUTH)).json()
    assert (got["terms_accepted"], got["location_barred"], got["ip"]) == (True, True, "10.0.0.9")

    deleted = await client.delete(f"/devices/{A}", headers=AUTH)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await client.get(f"/devices/{A}", headers=AUTH)).status_code == 404
    assert [d["iccid"] for d in (await client.get("/devices", headers=AUTH)).json()] == [B]


async def test_ipv6_is_stored_normalised(client: httpx.AsyncClient) -> None:
    created = await client.post("/devices", json={"iccid": A, "ip": "2001:DB8:0::1"}, headers=AUTH)
    assert created.status_code == 201
    assert created.json()["ip"] == "2001:db8::1"


async def test_conflicts_are_409(client: httpx.AsyncClient) -> None:
    await client.post("/devices", json={"iccid": A, "ip": "10.0.0.1"}, headers=AUTH)
    await client.post("/devices", json={"iccid": B, "ip": "10.0.0.2"}, headers=AUTH)

    duplicate = await client.post("/devices", json={"iccid": A, "ip": "10.0.0.3"}, headers=AUTH)
    assert duplicate.status_code == 409
    assert duplicate.json() == {"detail": f"device {A} already exists"}

    taken = await client.post(
        "/devices", json={"iccid": "8988280666000000003", "ip": "10.0.0.2"}, headers=AUTH
    )
    assert taken.status_code == 409
    assert taken.json() == {"detail": f"ip 10.0.0.2 is already used by device {B}"}

    moved = await client.patch(f"/devices/{A}", json={"ip": "10.0.0.2"}, headers=AUTH)
    assert moved.status_code == 409
    assert "10.0.0.2" in moved.json()["detail"]


async def test_unknown_device_is_404(client: httpx.AsyncClient) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        response = await client.request(
            method,
            f"/devices/{A}",
            json={"status": "active"} if method == "PATCH" else None,
            headers=AUTH,
        )
        assert response.status_code == 404, method
        assert response.json() == {"detail": f"device {A} not found"}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"iccid": "123", "ip": "10.0.0.1"}, "iccid", "iccid must be 19 or 20 digits"),
        ({"iccid": "8988280666000000001x", "ip": "10.0.0.1"}, "iccid", "19 or 20 digits"),
        ({"iccid": "898828066600000000123", "ip": "10.0.0.1"}, "iccid", "19 or 20 digits"),
        ({"iccid": A, "ip": "10.0.0.300"}, "ip", "does not appear to be an IPv4 or IPv6"),
        ({"iccid": A, "ip": "example.com"}, "ip", "does not appear to be an IPv4 or IPv6"),
        ({"iccid": A, "ip": "10.0.0.1", "status": "paused"}, "status", "'active' or 'inactive'"),
        ({"ip": "10.0.0.1"}, "iccid", "give an id, or a SIM's iccid"),
        ({"iccid": A, "ip": "10.0.0.1", "psk": "00"}, "psk", "Extra inputs are not permitted"),
    ],
)
async def test_invalid_create_is_422_with_a_clear_message(
    client: httpx.AsyncClient, body: dict[str, str], field: str, message: str
) -> None:
    response = await client.post("/devices", json=body, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert message in error["msg"]
    assert (await client.get("/devices", headers=AUTH)).json() == []


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"ip": "nope"}, "ip", "does not appear to be an IPv4 or IPv6"),
        ({"status": "deleted"}, "status", "'active' or 'inactive'"),
        ({"ip": None}, "ip", "may not be null"),
        ({"terms_accepted": None}, "terms_accepted", "may not be null"),
        ({"location_barred": "sometimes"}, "location_barred", "valid boolean"),
        ({"psk": "abcdefgh"}, "psk", "Extra inputs are not permitted"),
        ({"last_bootstrap_at": "2026-01-01T00:00:00Z"}, "last_bootstrap_at", "Extra inputs"),
        ({"iccid": B}, "iccid", "Extra inputs are not permitted"),
    ],
)
async def test_invalid_patch_is_422(
    client: httpx.AsyncClient, body: dict[str, Any], field: str, message: str
) -> None:
    await client.post("/devices", json={"iccid": A, "ip": "10.0.0.1"}, headers=AUTH)
    response = await client.patch(f"/devices/{A}", json=body, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert message in error["msg"]
    assert (await client.get(f"/devices/{A}", headers=AUTH)).json()["ip"] == "10.0.0.1"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong"),
        pytest.param({"Authorization": f"Basic {API_KEY}"}, id="not-bearer"),
        pytest.param({"Authorization": API_KEY}, id="no-scheme"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/devices"), ("POST", "/devices"), ("GET", f"/devices/{A}"),
     ("PATCH", f"/devices/{A}"), ("DELETE", f"/devices/{A}")],
)  # fmt: skip
async def test_without_the_api_key_is_401(
    client: httpx.AsyncClient, headers: dict[str, str], method: str, path: str
) -> None:
    response = await client.request(method, path, headers=headers, json={})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json() == {"detail": "missing or invalid bearer API key"}


async def test_no_api_key_configured_is_503(store: DeviceStore) -> None:
    async with _client(store, api_key=None) as http:
        response = await http.get("/devices", headers=AUTH)
    assert response.status_code == 503
    assert response.json() == {"detail": "management API disabled: no API key is configured"}


async def test_psk_is_never_returned(client: httpx.AsyncClient, store: DeviceStore) -> None:
    await client.post("/devices", json={"iccid": A, "ip": "10.0.0.1"}, headers=AUTH)
    await store.update(A, psk="c0ffee00c0ffee00", psk_user_set=True)
    answers = [
        await client.get("/devices", headers=AUTH),
        await client.get(f"/devices/{A}", headers=AUTH),
        await client.patch(f"/devices/{A}", json={"status": "active"}, headers=AUTH),
    ]
    for answer in answers:
        assert answer.status_code == 200
        assert "psk" not in (answer.json()[0] if isinstance(answer.json(), list) else answer.json())
        assert "c0ffee" not in answer.text
    assert answers[1].json()["psk_user_set"] is True


async def test_redis_down_is_503(redis_server: RedisServer) -> None:
    store = RedisDeviceStore.from_url(redis_server.url)
    try:
        async with _client(store) as http:
            redis_server.stop()
            response = await http.get("/devices", headers=AUTH)
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["detail"].startswith("device store unavailable")
    finally:
        await store.close()


async def test_healthz_and_docs(store: DeviceStore) -> None:
    async with _client(store) as http:
        health = await http.get("/healthz")
        assert health.json() == {"status": "ok", "mqtt": "disconnected", "store": store.kind}
        docs = await http.get("/docs")
        assert docs.status_code == 200
        schema = (await http.get("/openapi.json")).json()
    assert schema["info"]["title"] == "coap-bridge API"
    assert {tag["name"] for tag in schema["tags"]} == {
        "ingest",
        "bootstrap",
        "location",
        "onboarding",
        "devices",
        "credentials",
        "firmware",
        "templates",
        "health",
    }
    assert {
        "/ingest",
        "/devices",
        "/devices/{device_id}",
        "/healthz",
        "/bootstrap",
        "/location",
        "/onboarding/coap",
        "/devices/{iccid}/psk",
        "/devices/{iccid}/credentials",
        "/devices/{iccid}/location",
    } <= set(schema["paths"])
    assert "psk" not in schema["components"]["schemas"]["DeviceOut"]["properties"]
