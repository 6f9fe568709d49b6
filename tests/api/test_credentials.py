"""The PSK management API (issue #5): PUT / DELETE /devices/{iccid}/psk and the N-Hub-style
POST /devices/{iccid}/credentials, on both stores; announcements seen by a real Redis
subscriber; keys never shown twice, never listed, never logged."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.store.base import Device, DeviceStore
from api.store.redis_store import RedisDeviceStore
from policies.psk import psk_bytes
from tests.api.conftest import (
    AUTH,
    COAPS_URL,
    REDIS_PREFIX,
    Clock,
    asgi_client,
    build_app,
    proxied,
    psk_events,
)
from tests.support.services import RedisServer

A = "8988280666000000001"
UNKNOWN = "8988280666000000009"
IP = "10.64.1.1"


@pytest.fixture
async def client(any_store: DeviceStore, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    await any_store.create(Device(iccid=A, ip=IP))
    async with asgi_client(build_app(any_store, clock)) as http:
        yield http


async def bootstrap_key(client: httpx.AsyncClient) -> str:
    response = await client.get("/bootstrap", headers=proxied(IP))
    assert response.status_code == 200, response.text
    return response.text.split(",")[1]


@pytest.mark.parametrize(
    ("body", "stored"),
    [
        pytest.param({"psk": "aB3dEf7hIjKlMnOp"}, "aB3dEf7hIjKlMnOp", id="plain-default"),
        pytest.param({"psk": "pässwörd-ü", "format": "plain"}, "pässwörd-ü", id="plain-utf8"),
        pytest.param({"psk": "00FF10ab", "format": "hex"}, "0x00ff10ab", id="hex-bare"),
        pytest.param({"psk": "0X00ff10AB", "format": "hex"}, "0x00ff10ab", id="hex-0x"),
        pytest.param({"psk": "k" * 16}, "k" * 16, id="plain-16-bytes"),
        pytest.param({"psk": "0x" + "ab" * 16, "format": "hex"}, "0x" + "ab" * 16, id="hex-16"),
        # Our tinydtls build takes 64 key bytes: a managed-PSK key (64 hex characters as text).
        pytest.param({"psk": "0f" * 32}, "0f" * 32, id="plain-64-bytes"),
        pytest.param({"psk": "ü" * 32}, "ü" * 32, id="plain-64-bytes-utf8"),
        pytest.param({"psk": "ab" * 64, "format": "hex"}, "0x" + "ab" * 64, id="hex-64"),
    ],
)
async def test_put_psk_sets_a_user_key_that_bootstrap_hands_out(
    client: httpx.AsyncClient, any_store: DeviceStore, body: dict[str, str], stored: str
) -> None:
    response = await client.put(f"/devices/{A}/psk", json=body, headers=AUTH)
    assert response.status_code == 204, response.text
    assert response.content == b""
    device = await any_store.get(A)
    assert device is not None
    assert (device.psk, device.psk_user_set) == (stored, True)
    assert await bootstrap_key(client) == stored


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param({"psk": "0xabc", "format": "hex"}, "pairs of hex digits", id="odd-hex"),
        pytest.param({"psk": "zz", "format": "hex"}, "pairs of hex digits", id="not-hex"),
        pytest.param({"psk": "0x", "format": "hex"}, "PSK is empty", id="empty-hex"),
        # Our tinydtls build keeps at most 64 key bytes (DTLS_PSK_MAX_KEY_LEN).
        pytest.param({"psk": "0f" * 32 + "a"}, "PSK is 65 bytes, at most 64", id="too-long"),
        pytest.param({"psk": "ü" * 33}, "PSK is 66 bytes, at most 64", id="too-long-in-bytes"),
        pytest.param(
            {"psk": "0x" + "ab" * 65, "format": "hex"},
            "PSK is 65 bytes, at most 64",
            id="hex-too-long",
        ),
        pytest.param({"psk": "a,b"}, "no comma", id="comma-breaks-csv"),
        pytest.param({"psk": "a\nb"}, "line break", id="newline"),
        pytest.param({"psk": "a\x00b"}, "printable", id="control-char"),
    ],
)
async def test_put_unusable_psk_is_422_with_a_message(
    client: httpx.AsyncClient, any_store: DeviceStore, body: dict[str, str], message: str
) -> None:
    response = await client.put(f"/devices/{A}/psk", json=body, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "psk"]
    assert message in error["msg"]
    device = await any_store.get(A)
    assert device is not None
    assert device.psk is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"psk": ""}, "psk", id="empty"),
        pytest.param({"psk": "abc", "format": "base64"}, "format", id="unknown-format"),
        pytest.param({}, "psk", id="missing"),
        pytest.param({"psk": "abcdefgh", "extra": 1}, "extra", id="extra-field"),
    ],
)
async def test_put_psk_schema_errors_are_422(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    response = await client.put(f"/devices/{A}/psk", json=body, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


async def test_delete_psk_revokes_and_the_next_bootstrap_generates(
    client: httpx.AsyncClient, any_store: DeviceStore
) -> None:
    await client.put(f"/devices/{A}/psk", json={"psk": "user-set-key-123"}, headers=AUTH)
    response = await client.delete(f"/devices/{A}/psk", headers=AUTH)
    assert response.status_code == 204
    device = await any_store.get(A)
    assert device is not None
    assert (device.psk, device.psk_user_set) == (None, None)
    assert (await client.delete(f"/devices/{A}/psk", headers=AUTH)).status_code == 204
    fresh = await bootstrap_key(client)
    assert fresh != "user-set-key-123"
    assert len(fresh) >= 16


async def test_credentials_are_shown_once_and_replace_the_key(
    client: httpx.AsyncClient, any_store: DeviceStore, clock: Clock
) -> None:
    first = await client.post(f"/devices/{A}/credentials", json={"auth_type": "psk"}, headers=AUTH)
    assert first.status_code == 201, first.text
    body = first.json()
    assert set(body) == {"psk_identity", "psk_key", "server", "status"}
    assert (body["psk_identity"], body["server"], body["status"]) == (A, COAPS_URL, "active")
    key = body["psk_key"]
    assert len(key) >= 16
    assert key.isalnum()
    assert first.headers["cache-control"] == "no-store"

    # Nowhere to be read again...
    for path in ("/devices", f"/devices/{A}"):
        listed = await client.get(path, headers=AUTH)
        assert key not in listed.text
        assert "psk_key" not in listed.text
    # ...but it is the device's key: bootstrap hands it out and, being set through the
    # management API, never rotates it.
    assert await bootstrap_key(client) == key
    clock.advance(hours=1)
    assert await bootstrap_key(client) == key

    second = await client.post(f"/devices/{A}/credentials", json={"auth_type": "psk"}, headers=AUTH)
    assert second.json()["psk_key"] != key
    device = await any_store.get(A)
    assert device is not None
    assert device.psk == second.json()["psk_key"]


async def test_hex64_credentials_are_64_hex_characters_used_as_text(
    client: httpx.AsyncClient, any_store: DeviceStore
) -> None:
    """The managed-PSK platform's form: 32 random bytes as 64 lowercase hex characters, and the
    key is that text (what ``coap-client -k <key>`` presents), not the 32 bytes."""
    keys = []
    for _ in range(2):
        response = await client.post(
            f"/devices/{A}/credentials",
            json={"auth_type": "psk", "key_format": "hex64"},
            headers=AUTH,
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert set(body) == {"psk_identity", "psk_key", "server", "status"}
        assert response.headers["cache-control"] == "no-store"
        key = body["psk_key"]
        assert len(key) == 64
        assert set(key) <= set("0123456789abcdef")
        device = await any_store.get(A)
        assert device is not None
        # Stored as a plain key: the handshake uses the 64 characters' bytes.
        assert (device.psk, device.psk_user_set) == (key, True)
        assert psk_bytes(device.psk) == key.encode()
        assert await bootstrap_key(client) == key
        keys.append(key)
    assert keys[0] != keys[1]


async def test_default_key_format_is_the_existing_one(client: httpx.AsyncClient) -> None:
    explicit = await client.post(
        f"/devices/{A}/credentials",
        json={"auth_type": "psk", "key_format": "alnum16"},
        headers=AUTH,
    )
    assert explicit.status_code == 201, explicit.text
    key = explicit.json()["psk_key"]
    assert len(key) == 16
    assert key.isalnum()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"auth_type": "x509"}, "auth_type", id="other-auth-type"),
        pytest.param({}, "auth_type", id="missing"),
        pytest.param({"auth_type": "psk", "key_format": "hex32"}, "key_format", id="bad-format"),
        pytest.param({"auth_type": "psk", "key_format": 64}, "key_format", id="format-not-text"),
    ],
)
async def test_credentials_other_auth_type_is_422(
    client: httpx.AsyncClient, any_store: DeviceStore, body: dict[str, str], field: str
) -> None:
    response = await client.post(f"/devices/{A}/credentials", json=body, headers=AUTH)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert error["msg"]
    device = await any_store.get(A)
    assert device is not None
    assert device.psk is None


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", f"/devices/{UNKNOWN}/psk", {"psk": "abcdefgh"}),
        ("DELETE", f"/devices/{UNKNOWN}/psk", None),
        ("POST", f"/devices/{UNKNOWN}/credentials", {"auth_type": "psk"}),
    ],
)
async def test_unknown_device_is_404(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, str] | None
) -> None:
    response = await client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"detail": f"device {UNKNOWN} not found"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", f"/devices/{A}/psk", {"psk": "abcdefgh"}),
        ("DELETE", f"/devices/{A}/psk", None),
        ("POST", f"/devices/{A}/credentials", {"auth_type": "psk"}),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-key"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-key"),
        pytest.param(proxied(IP), id="proxy-token-is-not-enough"),
    ],
)
async def test_psk_endpoints_need_the_api_key(
    client: httpx.AsyncClient,
    any_store: DeviceStore,
    method: str,
    path: str,
    body: dict[str, str] | None,
    headers: dict[str, str],
) -> None:
    response = await client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    device = await any_store.get(A)
    assert device is not None
    assert device.psk is None


async def test_every_psk_change_is_published_on_redis(
    redis_server: RedisServer, clock: Clock
) -> None:
    """What the proxies' mirrors listen to (issue #5): one PUBLISH of the ICCID per change."""
    store = RedisDeviceStore.from_url(redis_server.url, prefix=REDIS_PREFIX)
    try:
        await store.create(Device(iccid=A, ip=IP))
        async with (
            asgi_client(build_app(store, clock, redis_prefix=REDIS_PREFIX)) as http,
            psk_events(redis_server.url) as events,
        ):
            await bootstrap_key(http)  # first call generates
            assert await events.next() == A
            await bootstrap_key(http)  # same key within the window: nothing to announce
            await events.assert_silent()
            clock.advance(minutes=5)
            await bootstrap_key(http)  # rotated
            assert await events.next() == A

            await http.put(f"/devices/{A}/psk", json={"psk": "abcdefgh"}, headers=AUTH)
            assert await events.next() == A
            await http.post(f"/devices/{A}/credentials", json={"auth_type": "psk"}, headers=AUTH)
            assert await events.next() == A
            await http.delete(f"/devices/{A}/psk", headers=AUTH)
            assert await events.next() == A
            await http.patch(f"/devices/{A}", json={"status": "inactive"}, headers=AUTH)
            await events.assert_silent()
            await http.delete(f"/devices/{A}", headers=AUTH)
            assert await events.next() == A
    finally:
        await store.close()


async def test_keys_are_never_logged(
    client: httpx.AsyncClient, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = ["logged-user-key-1"]
    await client.put(f"/devices/{A}/psk", json={"psk": keys[0]}, headers=AUTH)
    await client.delete(f"/devices/{A}/psk", headers=AUTH)
    keys.append(await bootstrap_key(client))
    clock.advance(minutes=6)
    keys.append(await bootstrap_key(client))
    response = await client.post(
        f"/devices/{A}/credentials", json={"auth_type": "psk"}, headers=AUTH
    )
    keys.append(response.json()["psk_key"])
    assert any(A in record.getMessage() for record in caplog.records)  # events are logged
    for key in keys:
        assert key not in caplog.text
