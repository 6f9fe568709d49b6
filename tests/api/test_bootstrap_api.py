"""GET /bootstrap as the proxy calls it (docs/CONTRACT.md §7, issue #5), on both stores, with
the clock moved instead of slept: rotation, user-set keys, recording, the per-device rate
limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from api.store.base import Device, DeviceStore
from policies.psk import ALPHABET
from tests.api.conftest import (
    AUTH,
    COAPS_URL,
    PROXY_TOKEN,
    START,
    Clock,
    asgi_client,
    build_app,
    proxied,
)

A = "8988280666000000001"
B = "89882806660000000029"  # 20 digits
IP_A, IP_B = "10.64.2.1", "10.64.2.2"
INACTIVE, IP_INACTIVE = "8988280666000000003", "10.64.2.3"
LIMIT = 5


@pytest.fixture
async def client(any_store: DeviceStore, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    await any_store.create(Device(iccid=A, ip=IP_A))
    await any_store.create(Device(iccid=B, ip=IP_B))
    await any_store.create(Device(iccid=INACTIVE, ip=IP_INACTIVE, status="inactive"))
    app = build_app(any_store, clock, bootstrap_rate_limit=LIMIT, bootstrap_rate_window=60)
    async with asgi_client(app) as http:
        yield http


async def bootstrap(client: httpx.AsyncClient, ip: str = IP_A, **kw: str) -> tuple[str, str, str]:
    response = await client.get("/bootstrap", headers=proxied(ip, **kw))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert not response.text.endswith("\n")  # the vendor sample splits on "," and uses field 3
    iccid, psk, url = response.text.split(",")
    return iccid, psk, url


async def test_first_call_generates_a_key_and_answers_one_csv_line(
    client: httpx.AsyncClient, any_store: DeviceStore, clock: Clock
) -> None:
    iccid, psk, url = await bootstrap(client)
    assert (iccid, url) == (A, COAPS_URL)
    assert len(psk) >= 16
    assert set(psk) <= set(ALPHABET)
    device = await any_store.get(A)
    assert device is not None
    assert (device.psk, device.psk_user_set, device.last_bootstrap_at) == (psk, False, clock.now)


@pytest.mark.parametrize(
    ("elapsed", "rotated"),
    [
        pytest.param(timedelta(0), False, id="same-instant"),
        pytest.param(timedelta(minutes=1), False, id="1-min"),
        pytest.param(timedelta(minutes=4, seconds=59, microseconds=999999), False, id="just-under"),
        pytest.param(timedelta(minutes=5), True, id="exactly-5-min"),
        pytest.param(timedelta(hours=30), True, id="30-h"),
    ],
)
async def test_the_five_minute_rule(
    client: httpx.AsyncClient, clock: Clock, elapsed: timedelta, rotated: bool
) -> None:
    _, first, _ = await bootstrap(client)
    clock.now += elapsed
    _, second, _ = await bootstrap(client)
    assert (second != first) is rotated


async def test_the_window_counts_from_the_previous_call_not_the_generation(
    client: httpx.AsyncClient, any_store: DeviceStore, clock: Clock
) -> None:
    # A device that calls every 4 minutes keeps its key for good: each call is "the previous".
    _, key, _ = await bootstrap(client)
    for _ in range(5):
        clock.advance(minutes=4)
        assert (await bootstrap(client))[1] == key
    device = await any_store.get(A)
    assert device is not None
    assert device.last_bootstrap_at == clock.now
    clock.advance(minutes=5)
    assert (await bootstrap(client))[1] != key


async def test_a_user_set_key_never_changes(
    client: httpx.AsyncClient, any_store: DeviceStore, clock: Clock
) -> None:
    await client.put(f"/devices/{A}/psk", json={"psk": "0A0B0C", "format": "hex"}, headers=AUTH)
    for step in (timedelta(0), timedelta(minutes=5), timedelta(days=400)):
        clock.now += step
        assert (await bootstrap(client))[1] == "0x0a0b0c"
    device = await any_store.get(A)
    assert device is not None
    assert device.psk_user_set is True
    assert device.last_bootstrap_at == clock.now  # every call is recorded, user key or not


async def test_devices_get_their_own_keys(client: httpx.AsyncClient) -> None:
    a = await bootstrap(client, IP_A)
    b = await bootstrap(client, IP_B)
    assert (a[0], b[0]) == (A, B)
    assert a[1] != b[1]


async def test_over_dtls_the_identity_names_the_device(client: httpx.AsyncClient) -> None:
    # The address is B's, but a DTLS request is attributed by its PSK identity
    # (docs/CONTRACT.md §2).
    iccid, _, _ = await bootstrap(client, IP_B, identity=A)
    assert iccid == A


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param(proxied("10.64.9.9"), 401, id="unknown-address"),
        pytest.param(proxied(IP_INACTIVE), 401, id="inactive"),
        pytest.param(proxied(IP_A, identity="8988280666000000099"), 401, id="unknown-identity"),
        pytest.param({"X-Bridge-Token": PROXY_TOKEN}, 400, id="no-forwarded"),
        pytest.param({"Forwarded": f'for="{IP_A}:1"'}, 403, id="no-proxy-token"),
        pytest.param({"Forwarded": f'for="{IP_A}:1"', "X-Bridge-Token": "x"}, 403, id="bad-token"),
    ],
)
async def test_refusals(
    client: httpx.AsyncClient, any_store: DeviceStore, headers: dict[str, str], status: int
) -> None:
    response = await client.get("/bootstrap", headers=headers)
    assert response.status_code == status
    assert "detail" in response.json()
    for device in await any_store.list():
        assert device.psk is None
        assert device.last_bootstrap_at is None


async def test_rate_limit_is_per_device_and_a_refused_call_changes_nothing(
    client: httpx.AsyncClient, any_store: DeviceStore, clock: Clock
) -> None:
    _, key, _ = await bootstrap(client)
    for _ in range(LIMIT - 1):
        clock.advance(seconds=1)
        await bootstrap(client)
    before = await any_store.get(A)
    clock.advance(seconds=10)  # 14 s into the 60 s window

    refused = await client.get("/bootstrap", headers=proxied(IP_A))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "46"
    assert "bootstrap calls" in refused.json()["detail"]
    assert await any_store.get(A) == before  # not recorded, not rotated

    await bootstrap(client, IP_B)  # another device is not affected

    clock.advance(seconds=46)  # the window is over
    assert (await bootstrap(client))[1] == key  # 56 s since the last call: same key


async def test_rate_limited_calls_cannot_churn_keys(
    client: httpx.AsyncClient, clock: Clock
) -> None:
    # Hammering gets 429s; the key stays the one of the last accepted call.
    _, key, _ = await bootstrap(client)
    codes = []
    for _ in range(20):
        codes.append((await client.get("/bootstrap", headers=proxied(IP_A))).status_code)
    assert codes.count(200) == LIMIT - 1
    assert codes.count(429) == 20 - (LIMIT - 1)
    clock.advance(seconds=60)
    assert (await bootstrap(client))[1] == key


async def test_a_clock_behind_the_window_start_opens_a_new_window(
    client: httpx.AsyncClient, clock: Clock
) -> None:
    # Replicas' clocks differ a little; a window that starts "in the future" must not lock
    # the device out until then.
    clock.now = START + timedelta(seconds=30)
    for _ in range(LIMIT):
        await bootstrap(client)
    clock.now = START
    await bootstrap(client)
