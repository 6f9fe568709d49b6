"""Firmware over HTTP (api/routes/firmware.py): uploads, listing and deletion with the API key;
the device's download with the proxy token, whole or by byte range (RFC 9110 §14), on the
memory store and on a real redis-server."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from stores.firmware import CHUNK_SIZE, Firmware
from tests.api.conftest import (
    ACTIVE,
    ACTIVE_IP,
    AUTH,
    INACTIVE,
    INACTIVE_IP,
    PROXY_HEADERS,
    START,
    Clock,
    asgi_client,
    build_app,
    proxied,
)

IMAGE = os.urandom(2 * CHUNK_SIZE + 500)
OCTETS = {"Content-Type": "application/octet-stream"}
DEVICE = proxied(ACTIVE_IP)


class Api:
    def __init__(self, client: httpx.AsyncClient, app: Any) -> None:
        self.client = client
        self.app = app
        self.reads: list[tuple[int, int]] = []

    async def upload(self, version: str, data: bytes = IMAGE) -> httpx.Response:
        return await self.client.put(
            f"/firmware/{version}", content=data, headers={**AUTH, **OCTETS}
        )

    async def download(self, version: str, **headers: str) -> httpx.Response:
        return await self.client.get(f"/firmware/{version}", headers={**DEVICE, **headers})


@pytest.fixture(params=["memory", "redis"])
async def api(request: pytest.FixtureRequest) -> AsyncIterator[Api]:
    devices = MemoryDeviceStore()
    await devices.create(Device(iccid=ACTIVE, ip=ACTIVE_IP, status="active"))
    await devices.create(Device(iccid=INACTIVE, ip=INACTIVE_IP, status="inactive"))
    # The device's download is a managed_psk resource (api/profiles.py).
    overrides: dict[str, object] = {
        "max_firmware_size": 4 * CHUNK_SIZE,
        "profiles": ["sim_identity", "managed_psk"],
    }
    if request.param == "redis":
        overrides["redis_url"] = request.getfixturevalue("redis_server").url
    app = build_app(devices, Clock(), **overrides)
    store = app.state.firmware
    assert store.kind == request.param
    made = None

    # Every read the store is asked for, to show what a block costs.
    real_read = store.read

    async def counted_read(firmware: Firmware, first: int, last: int) -> bytes:
        assert made is not None
        made.reads.append((first, last))
        data: bytes = await real_read(firmware, first, last)
        return data

    store.read = counted_read
    async with asgi_client(app) as client:
        made = Api(client, app)
        yield made
    await store.close()


# --- management -----------------------------------------------------------------------------


async def test_upload_list_replace_delete(api: Api) -> None:
    created = await api.upload("1.0.0")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body == {
        "version": "1.0.0",
        "size": len(IMAGE),
        "sha256": hashlib.sha256(IMAGE).hexdigest(),
        "created_at": START.timestamp(),
    }
    assert created.headers["Location"] == "/firmware/1.0.0"
    await api.upload("0.9", b"old")

    listed = await api.client.get("/firmware", headers=AUTH)
    assert listed.status_code == 200
    assert [(f["version"], f["size"]) for f in listed.json()["firmware"]] == [
        ("0.9", 3),
        ("1.0.0", len(IMAGE)),
    ]
    assert "Location" not in listed.headers

    replaced = await api.upload("1.0.0", b"new image")
    assert replaced.status_code == 200
    assert replaced.json()["sha256"] == hashlib.sha256(b"new image").hexdigest()

    assert (await api.client.delete("/firmware/1.0.0", headers=AUTH)).status_code == 204
    gone = await api.client.delete("/firmware/1.0.0", headers=AUTH)
    assert gone.status_code == 404
    assert gone.json() == {"detail": "no firmware 1.0.0"}
    assert [
        f["version"] for f in (await api.client.get("/firmware", headers=AUTH)).json()["firmware"]
    ] == ["0.9"]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/firmware", {}, 401),
        ("/firmware", PROXY_HEADERS, 401),  # the proxy may not list
        ("/firmware/1.0", {}, 401),
        ("/firmware/1.0", PROXY_HEADERS, 401),  # nor upload
    ],
)
async def test_management_needs_the_api_key(
    api: Api, path: str, headers: dict[str, str], status: int
) -> None:
    method = "GET" if path == "/firmware" else "PUT"
    response = await api.client.request(method, path, content=b"x", headers=headers)
    assert response.status_code == status
    assert response.json() == {"detail": "missing or invalid bearer API key"}
    deleted = await api.client.delete("/firmware/1.0", headers=PROXY_HEADERS)
    assert deleted.status_code == 401


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(api: Api) -> None:
    response = await api.upload("big", b"x" * (4 * CHUNK_SIZE + 1))
    assert response.status_code == 413
    assert str(4 * CHUNK_SIZE) in response.json()["detail"]
    assert (await api.client.get("/firmware", headers=AUTH)).json() == {"firmware": []}


async def test_a_chunked_body_over_the_limit_is_refused(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"x" * CHUNK_SIZE

    response = await api.client.put("/firmware/big", content=chunks(), headers={**AUTH, **OCTETS})
    assert response.status_code == 413


async def test_the_limit_is_exact(api: Api) -> None:
    assert (await api.upload("edge", b"y" * 4 * CHUNK_SIZE)).status_code == 201


@pytest.mark.parametrize(
    ("version", "content", "headers", "status", "detail"),
    [
        ("1.0", b"", OCTETS, 400, "the firmware image is empty"),
        ("1.0", b"{}", {"Content-Type": "application/json"}, 415, "not application/json"),
        (".hidden", b"x", OCTETS, 422, "String should match pattern"),
        ("a" * 65, b"x", OCTETS, 422, "String should match pattern"),
        ("a%20b", b"x", OCTETS, 422, "String should match pattern"),
    ],
)
async def test_bad_uploads_say_why(
    api: Api, version: str, content: bytes, headers: dict[str, str], status: int, detail: str
) -> None:
    response = await api.client.put(
        f"/firmware/{version}", content=content, headers={**AUTH, **headers}
    )
    assert response.status_code == status, response.text
    assert detail in str(response.json()["detail"])


# --- the device's download ------------------------------------------------------------------


async def test_the_whole_image(api: Api) -> None:
    await api.upload("2.0")
    response = await api.download("2.0")
    assert response.status_code == 200
    assert response.content == IMAGE
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Accept-Ranges"] == "bytes"
    etag = response.headers["ETag"]
    assert etag.startswith('"')
    assert len(etag) == 10


@pytest.mark.parametrize(
    ("first", "last"),
    [(0, 1023), (1024, 2047), (CHUNK_SIZE - 512, CHUNK_SIZE + 511), (len(IMAGE) - 100, None)],
)
async def test_one_range_is_one_small_read(api: Api, first: int, last: int | None) -> None:
    await api.upload("2.0")
    spec = f"bytes={first}-{'' if last is None else last}"
    response = await api.download("2.0", Range=spec)
    end = len(IMAGE) - 1 if last is None else last
    assert response.status_code == 206
    assert response.content == IMAGE[first : end + 1]
    assert response.headers["Content-Range"] == f"bytes {first}-{end}/{len(IMAGE)}"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert api.reads == [(first, end)]


async def test_a_block_past_the_last_byte_is_cut_to_the_image(api: Api) -> None:
    await api.upload("2.0")
    first = len(IMAGE) - 10
    response = await api.download("2.0", Range=f"bytes={first}-{first + 1023}")
    assert response.status_code == 206
    assert response.content == IMAGE[first:]
    assert response.headers["Content-Range"] == f"bytes {first}-{len(IMAGE) - 1}/{len(IMAGE)}"


@pytest.mark.parametrize(
    "spec", ["bytes=0-9, 20-29", "bytes=9-0", "items=0-9", "bytes=abc", "bytes=-"]
)
async def test_several_or_malformed_ranges_get_the_whole_image(api: Api, spec: str) -> None:
    await api.upload("2.0")
    response = await api.download("2.0", Range=spec)
    assert response.status_code == 200
    assert response.content == IMAGE


@pytest.mark.parametrize("spec", [f"bytes={len(IMAGE)}-", f"bytes={len(IMAGE) + 5}-99999999"])
async def test_a_range_past_the_end_is_416(api: Api, spec: str) -> None:
    await api.upload("2.0")
    response = await api.download("2.0", Range=spec)
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{len(IMAGE)}"
    assert str(len(IMAGE)) in response.json()["detail"]
    assert api.reads == []


async def test_if_range_and_if_none_match(api: Api) -> None:
    await api.upload("2.0")
    etag = (await api.download("2.0")).headers["ETag"]
    held = await api.download("2.0", Range="bytes=0-9", **{"If-Range": etag})
    assert held.status_code == 206
    assert held.content == IMAGE[:10]
    stale = await api.download("2.0", Range="bytes=0-9", **{"If-Range": '"AAAAAAAA"'})
    assert stale.status_code == 200
    assert stale.content == IMAGE
    dated = await api.download(
        "2.0", Range="bytes=0-9", **{"If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"}
    )
    assert dated.status_code == 200
    same = await api.download("2.0", **{"If-None-Match": etag})
    assert same.status_code == 304
    assert same.content == b""
    assert same.headers["ETag"] == etag
    other = await api.download("2.0", **{"If-None-Match": '"AAAAAAAA"'})
    assert other.status_code == 200


async def test_a_replaced_image_has_another_etag(api: Api) -> None:
    await api.upload("2.0")
    before = (await api.download("2.0", Range="bytes=0-9")).headers["ETag"]
    await api.upload("2.0", IMAGE[::-1])
    after = await api.download("2.0", Range="bytes=0-9")
    assert after.headers["ETag"] != before
    assert after.content == IMAGE[::-1][:10]


async def test_over_dtls_the_psk_identity_names_the_device(api: Api) -> None:
    await api.upload("2.0", b"tiny")
    response = await api.client.get("/firmware/2.0", headers=proxied("192.0.2.99", identity=ACTIVE))
    assert response.status_code == 200
    assert response.content == b"tiny"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param(proxied("192.0.2.99"), 401, id="unknown-device"),
        pytest.param(proxied(INACTIVE_IP), 401, id="inactive-device"),
        pytest.param(PROXY_HEADERS, 400, id="no-forwarded"),
        pytest.param({**AUTH, "Forwarded": DEVICE["Forwarded"]}, 403, id="api-key-not-proxy"),
    ],
)
async def test_only_a_registered_device_through_the_proxy_downloads(
    api: Api, headers: dict[str, str], status: int
) -> None:
    await api.upload("2.0")
    response = await api.client.get("/firmware/2.0", headers=headers)
    assert response.status_code == status
    assert response.json()["detail"]
    assert api.reads == []


@pytest.mark.parametrize("version", ["9.9.9", ".x", "a" * 65])
async def test_an_unknown_version_is_404(api: Api, version: str) -> None:
    response = await api.download(version, Range="bytes=0-1023")
    assert response.status_code == 404
    assert response.json()["detail"].startswith("no firmware")
