"""GET /onboarding/coap (docs/CONTRACT.md §8, issue #6): Accept, Range, who is calling, the
error bodies, and the key rules shared with /bootstrap. In process over ASGI (the client
address is chosen per test) and once against a real uvicorn server on a real socket."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from api.store.base import Device, DeviceStore
from api.store.memory import MemoryDeviceStore
from api.store.redis_store import RedisDeviceStore
from stores.keys import device_key
from tests.api.conftest import (
    AUTH,
    REDIS_PREFIX,
    Clock,
    asgi_client,
    build_app,
    proxied,
    real_server,
)
from tests.support.services import RedisServer

A = "8988280666000000001"
IP = "10.64.3.1"
NO_TERMS, IP_NO_TERMS = "8988280666000000002", "10.64.3.2"
INACTIVE, IP_INACTIVE = "8988280666000000003", "10.64.3.3"
PSK = "aB3dEf7hIjKlMnOp"  # user-set, so every body below is known in advance
JSON_BODY = json.dumps({"clientIdentity": A, "preSharedKey": PSK}, separators=(",", ":")).encode()
CSV_BODY = f"{A},{PSK}".encode()
PROXIES = "192.0.2.0/24,2001:db8::/32"


async def _devices(store: DeviceStore, psk: str | None = PSK) -> None:
    await store.create(
        Device(iccid=A, ip=IP, terms_accepted=True, psk=psk, psk_user_set=psk is not None)
    )
    await store.create(Device(iccid=NO_TERMS, ip=IP_NO_TERMS))
    await store.create(
        Device(iccid=INACTIVE, ip=IP_INACTIVE, status="inactive", terms_accepted=True)
    )


@pytest.fixture
async def store() -> MemoryDeviceStore:
    store = MemoryDeviceStore()
    await _devices(store)
    return store


@pytest.fixture
async def device(store: MemoryDeviceStore, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling from the registered device's address."""
    async with asgi_client(build_app(store, clock, trusted_proxy_networks=PROXIES), IP) as http:
        yield http


def assert_error(response: httpx.Response, status: int, text: str, code: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["statusText"] == text
    [error] = body["errors"]
    assert set(error) == {"code", "message"}
    assert error["code"] == code
    assert error["message"]


# --- Accept ----------------------------------------------------------------------------------

JSON_TYPE, CSV_TYPE = "application/json", "text/csv; charset=utf-8"


@pytest.mark.parametrize(
    ("accept", "content_type", "body"),
    [
        pytest.param(None, JSON_TYPE, JSON_BODY, id="no-header"),
        pytest.param("", JSON_TYPE, JSON_BODY, id="empty"),
        pytest.param("application/json", JSON_TYPE, JSON_BODY, id="json"),
        pytest.param("*/*", JSON_TYPE, JSON_BODY, id="any"),
        pytest.param("application/*", JSON_TYPE, JSON_BODY, id="application-any"),
        pytest.param("text/csv", CSV_TYPE, CSV_BODY, id="csv"),
        pytest.param("TEXT/CSV", CSV_TYPE, CSV_BODY, id="csv-upper-case"),
        pytest.param("text/*", CSV_TYPE, CSV_BODY, id="text-any"),
        pytest.param("text/html, text/csv;q=0.5", CSV_TYPE, CSV_BODY, id="csv-in-a-list"),
        pytest.param("text/csv, */*;q=0.1", CSV_TYPE, CSV_BODY, id="csv-preferred"),
        pytest.param("application/json;q=0.4, text/csv;q=0.9", CSV_TYPE, CSV_BODY, id="csv-q"),
        pytest.param("text/csv;q=0.5, application/json;q=0.5", JSON_TYPE, JSON_BODY, id="tie"),
        pytest.param("*/*;q=0.8, application/json;q=0", CSV_TYPE, CSV_BODY, id="json-refused"),
        pytest.param("text/csv;q=bogus, */*", JSON_TYPE, JSON_BODY, id="bad-q-is-zero"),
    ],
)
async def test_accept_picks_the_format(
    device: httpx.AsyncClient, accept: str | None, content_type: str, body: bytes
) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    response = await device.get("/onboarding/coap", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    assert response.content == body
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["cache-control"] == "no-store"
    assert "Accept" in response.headers["vary"]
    if content_type == JSON_TYPE:
        assert response.json() == {"clientIdentity": A, "preSharedKey": PSK}


@pytest.mark.parametrize(
    "accept",
    [
        "text/html",
        "application/xml",
        "text/plain",
        "application/json;q=0",
        "text/csv;q=0, application/json;q=0",
        "image/*",
        "nonsense",
    ],
)
async def test_other_accept_is_406_and_hands_out_nothing(
    device: httpx.AsyncClient, store: MemoryDeviceStore, accept: str
) -> None:
    response = await device.get("/onboarding/coap", headers={"Accept": accept})
    assert_error(response, 406, "Not Acceptable", "NOT_ACCEPTABLE")
    stored = await store.get(A)
    assert stored is not None
    assert stored.last_bootstrap_at is None  # content negotiation comes before any key work


# --- Range -----------------------------------------------------------------------------------

N = len(JSON_BODY)


@pytest.mark.parametrize(
    ("range_header", "first", "last"),
    [
        pytest.param("bytes=0-7", 0, 7, id="first-8"),
        pytest.param("bytes=8-15", 8, 15, id="second-8"),
        pytest.param("bytes=5-5", 5, 5, id="one-byte"),
        pytest.param(f"bytes=0-{N + 100}", 0, N - 1, id="last-past-the-end-clamped"),
        pytest.param("bytes=10-", 10, N - 1, id="open-ended"),
        pytest.param(f"bytes={N - 1}-", N - 1, N - 1, id="open-ended-last-byte"),
        pytest.param("bytes=-8", N - 8, N - 1, id="suffix"),
        pytest.param(f"bytes=-{N + 5}", 0, N - 1, id="suffix-longer-than-body"),
        pytest.param("BYTES=0-3", 0, 3, id="unit-case-insensitive"),
        pytest.param(" bytes=2-3 ", 2, 3, id="surrounding-space"),
        pytest.param("bytes= 1-2", 1, 2, id="space-before-the-range-spec"),
    ],
)
async def test_one_range_is_206_with_the_exact_slice(
    device: httpx.AsyncClient, range_header: str, first: int, last: int
) -> None:
    response = await device.get("/onboarding/coap", headers={"Range": range_header})
    assert response.status_code == 206, response.text
    assert response.headers["content-range"] == f"bytes {first}-{last}/{N}"
    assert response.content == JSON_BODY[first : last + 1]
    assert response.headers["content-length"] == str(last - first + 1)
    assert response.headers["content-type"] == JSON_TYPE


async def test_csv_ranges_slice_the_csv_body(device: httpx.AsyncClient) -> None:
    response = await device.get(
        "/onboarding/coap", headers={"Accept": "text/csv", "Range": "bytes=-16"}
    )
    assert response.status_code == 206
    assert response.content == PSK.encode()
    assert (
        response.headers["content-range"]
        == f"bytes {len(CSV_BODY) - 16}-{len(CSV_BODY) - 1}/{len(CSV_BODY)}"
    )


@pytest.mark.parametrize(
    "range_header",
    [
        pytest.param(f"bytes={N}-", id="starts-at-the-end"),
        pytest.param(f"bytes={N + 10}-{N + 20}", id="past-the-end"),
        pytest.param("bytes=-0", id="zero-suffix"),
    ],
)
async def test_unsatisfiable_range_is_416(device: httpx.AsyncClient, range_header: str) -> None:
    response = await device.get("/onboarding/coap", headers={"Range": range_header})
    assert_error(response, 416, "Range Not Satisfiable", "RANGE_NOT_SATISFIABLE")
    assert response.headers["content-range"] == f"bytes */{N}"


@pytest.mark.parametrize(
    "range_header",
    [
        pytest.param("bytes=7-3", id="last-before-first"),
        pytest.param("bytes=abc", id="not-numbers"),
        pytest.param("bytes=-", id="dash-only"),
        pytest.param("bytes=1-2-3", id="two-dashes"),
        pytest.param("bytes=+1-2", id="signed"),
        pytest.param("bytes 0-7", id="no-equals"),
        pytest.param("items=0-7", id="other-unit"),
        pytest.param("=0-7", id="no-unit"),
        pytest.param("", id="empty"),
        pytest.param("bytes=0-1,4-5", id="two-ranges"),
        pytest.param("bytes=0-1, -3", id="two-ranges-mixed"),
        pytest.param(f"bytes={N}-,{N + 1}-", id="two-unsatisfiable-ranges"),
        pytest.param("bytes=0-7,", id="trailing-comma"),
    ],
)
async def test_malformed_or_multiple_ranges_are_ignored_with_200(
    device: httpx.AsyncClient, range_header: str
) -> None:
    response = await device.get("/onboarding/coap", headers={"Range": range_header})
    assert response.status_code == 200, response.text
    assert response.content == JSON_BODY
    assert "content-range" not in response.headers


async def test_if_range_gets_the_whole_body(device: httpx.AsyncClient) -> None:
    # We have no validators, so an If-Range can never match (RFC 9110 §13.1.5).
    response = await device.get(
        "/onboarding/coap", headers={"Range": "bytes=0-7", "If-Range": '"abc"'}
    )
    assert response.status_code == 200
    assert response.content == JSON_BODY


@pytest.mark.parametrize("accept", ["application/json", "text/csv"])
async def test_a_client_fetching_8_byte_pieces_reassembles_the_body(
    store: MemoryDeviceStore, clock: Clock, accept: str
) -> None:
    # A generated key this time: the body is not known in advance, only its reassembly.
    await store.update(A, psk=None, psk_user_set=None)
    app = build_app(store, clock, bootstrap_rate_limit=20)
    async with asgi_client(app, IP) as http:
        pieces: list[bytes] = []
        total: int | None = None
        while total is None or sum(map(len, pieces)) < total:
            start = sum(map(len, pieces))
            response = await http.get(
                "/onboarding/coap",
                headers={"Accept": accept, "Range": f"bytes={start}-{start + 7}"},
            )
            assert response.status_code == 206, response.text
            unit, _, spec = response.headers["content-range"].partition(" ")
            span, _, length = spec.partition("/")
            assert unit == "bytes"
            assert span == f"{start}-{start + len(response.content) - 1}"
            total = int(length)
            assert len(response.content) == min(8, total - start)
            pieces.append(response.content)
        whole = await http.get("/onboarding/coap", headers={"Accept": accept})
    assert b"".join(pieces) == whole.content
    assert len(pieces) == -(-total // 8)
    stored = await store.get(A)
    assert stored is not None
    assert stored.psk is not None
    assert stored.psk.encode() in whole.content


# --- who is calling --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        pytest.param(IP, None, 200, id="direct"),
        pytest.param("10.64.9.9", None, 401, id="direct-unknown"),
        pytest.param(f"::ffff:{IP}", None, 200, id="direct-ipv4-mapped"),
        pytest.param("192.0.2.10", IP, 200, id="trusted-proxy"),
        pytest.param("192.0.2.10", f"{IP}:51234", 200, id="trusted-proxy-with-port"),
        pytest.param("192.0.2.10", f"203.0.113.7, {IP}", 200, id="rightmost-untrusted-hop"),
        pytest.param("192.0.2.10", f"{IP}, 192.0.2.11", 200, id="two-trusted-proxies"),
        pytest.param("192.0.2.10", f"{IP}, 10.64.9.9", 401, id="spoofed-left-entry-ignored"),
        pytest.param("2001:db8::5", IP, 200, id="trusted-ipv6-proxy"),
        pytest.param("192.0.2.10", "garbage", 401, id="trusted-proxy-garbage"),
        pytest.param("192.0.2.10", None, 401, id="trusted-proxy-no-header-is-the-proxy"),
        pytest.param("10.64.9.9", IP, 401, id="untrusted-peer-cannot-claim"),
        pytest.param(IP, "10.64.9.9", 200, id="device-behind-no-proxy-ignores-header"),
    ],
)
async def test_source_address_and_x_forwarded_for(
    store: MemoryDeviceStore, clock: Clock, peer: str, forwarded_for: str | None, expected: int
) -> None:
    app = build_app(store, clock, trusted_proxy_networks=PROXIES)
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for is not None else {}
    async with asgi_client(app, peer) as http:
        response = await http.get("/onboarding/coap", headers=headers)
    assert response.status_code == expected, response.text
    if expected == 200:
        assert response.json()["clientIdentity"] == A
    else:
        assert_error(response, 401, "Unauthorized", "UNKNOWN_DEVICE")


@pytest.mark.parametrize(
    ("ip", "code"),
    [
        pytest.param("10.64.9.9", "UNKNOWN_DEVICE", id="unknown-device"),
        pytest.param(IP_INACTIVE, "UNKNOWN_DEVICE", id="inactive-device"),
        pytest.param(IP_NO_TERMS, "TERMS_NOT_ACCEPTED", id="terms-not-accepted"),
    ],
)
async def test_401_unauthorized_response(
    store: MemoryDeviceStore, clock: Clock, ip: str, code: str
) -> None:
    async with asgi_client(build_app(store, clock), ip) as http:
        response = await http.get("/onboarding/coap")
    assert_error(response, 401, "Unauthorized", code)
    for stored in await store.list():
        assert stored.psk in (None, PSK)
        assert stored.last_bootstrap_at is None


async def test_terms_accepted_through_the_management_api(
    store: MemoryDeviceStore, clock: Clock
) -> None:
    async with asgi_client(build_app(store, clock), IP_NO_TERMS) as http:
        assert (await http.get("/onboarding/coap")).status_code == 401
        patched = await http.patch(
            f"/devices/{NO_TERMS}", json={"terms_accepted": True}, headers=AUTH
        )
        assert patched.json()["terms_accepted"] is True
        response = await http.get("/onboarding/coap")
        assert response.status_code == 200
        assert response.json()["clientIdentity"] == NO_TERMS
        await http.patch(f"/devices/{NO_TERMS}", json={"terms_accepted": False}, headers=AUTH)
        assert (await http.get("/onboarding/coap")).status_code == 401


# --- the key rules, shared with /bootstrap ----------------------------------------------------


async def test_onboarding_and_bootstrap_share_the_key_and_the_window(
    any_store: DeviceStore, clock: Clock
) -> None:
    await _devices(any_store, psk=None)
    async with asgi_client(build_app(any_store, clock), IP) as http:
        onboarded = (await http.get("/onboarding/coap")).json()["preSharedKey"]
        clock.advance(minutes=4)
        boot = await http.get("/bootstrap", headers=proxied(IP))
        assert boot.text.split(",")[1] == onboarded  # inside the window: the same key
        clock.advance(minutes=4)  # 4 min after the bootstrap call, 8 after onboarding
        again = (await http.get("/onboarding/coap", headers={"Accept": "text/csv"})).text
        assert again == f"{A},{onboarded}"
        clock.advance(minutes=5)
        rotated = (await http.get("/onboarding/coap")).json()["preSharedKey"]
        assert rotated != onboarded
        boot = await http.get("/bootstrap", headers=proxied(IP))
        assert boot.text.split(",")[1] == rotated


async def test_rate_limit_is_shared_with_bootstrap_and_renders_429(
    store: MemoryDeviceStore, clock: Clock
) -> None:
    async with asgi_client(build_app(store, clock, bootstrap_rate_limit=3), IP) as http:
        assert (await http.get("/bootstrap", headers=proxied(IP))).status_code == 200
        assert (await http.get("/onboarding/coap")).status_code == 200
        assert (await http.get("/onboarding/coap")).status_code == 200
        response = await http.get("/onboarding/coap")
        assert_error(response, 429, "Too Many Requests", "TOO_MANY_REQUESTS")
        assert response.headers["retry-after"] == "60"
        assert (await http.get("/bootstrap", headers=proxied(IP))).status_code == 429


# --- server-side errors ----------------------------------------------------------------------


async def test_store_down_is_503_server_side_error(redis_server: RedisServer, clock: Clock) -> None:
    store = RedisDeviceStore.from_url(redis_server.url, prefix=REDIS_PREFIX)
    try:
        await _devices(store)
        async with asgi_client(build_app(store, clock), IP) as http:
            redis_server.stop()
            response = await http.get("/onboarding/coap")
        assert_error(response, 503, "Service Unavailable", "SERVICE_UNAVAILABLE")
        assert response.headers["retry-after"] == "1"
    finally:
        await store.close()


async def test_unexpected_failure_is_500_server_side_error(
    redis_server: RedisServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    # A device record a bug (or a hand edit) left unreadable: the app must still answer in
    # the documented shape, without the details.
    store = RedisDeviceStore.from_url(redis_server.url, prefix=REDIS_PREFIX)
    try:
        await _devices(store)
        redis_server.execute("HSET", device_key(A, REDIS_PREFIX), "psk_user_set", "perhaps")
        async with asgi_client(build_app(store, clock), IP) as http:
            response = await http.get("/onboarding/coap")
        assert_error(response, 500, "Internal Server Error", "INTERNAL_ERROR")
        assert "perhaps" not in response.text
        assert "onboarding failed" in caplog.text
    finally:
        await store.close()


# --- a real server ---------------------------------------------------------------------------


async def test_against_a_running_server(clock: Clock) -> None:
    store = MemoryDeviceStore()
    await store.create(Device(iccid=A, ip="127.0.0.1", terms_accepted=True))
    app = build_app(store, clock, trusted_proxy_networks="192.0.2.0/24")
    async with real_server(app) as url, httpx.AsyncClient(base_url=url) as http:
        full = await http.get("/onboarding/coap")
        assert full.status_code == 200
        key = full.json()["preSharedKey"]
        csv = await http.get("/onboarding/coap", headers={"Accept": "text/csv"})
        assert csv.text == f"{A},{key}"
        piece = await http.get("/onboarding/coap", headers={"Range": "bytes=-8"})
        assert piece.status_code == 206
        assert piece.content == full.content[-8:]
        assert (
            await http.get("/onboarding/coap", headers={"Range": "bytes=999-"})
        ).status_code == 416
        assert (
            await http.get("/onboarding/coap", headers={"Accept": "text/html"})
        ).status_code == 406
        # 127.0.0.1 is not a trusted proxy here, so it cannot speak for another address.
        spoofed = await http.get("/onboarding/coap", headers={"X-Forwarded-For": "10.9.9.9"})
        assert spoofed.status_code == 200
        assert spoofed.json()["clientIdentity"] == A
