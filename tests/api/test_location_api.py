"""Device location (issue #6) on both stores: the management side (PUT / GET
/devices/{iccid}/location: validation, exact decimals, newest sample wins) and the proxy side
(GET /location: CSV byte-exact, and every refusal of docs/CONTRACT.md §3)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.store.base import Device, DeviceStore
from tests.api.conftest import AUTH, PROXY_TOKEN, START, Clock, asgi_client, build_app, proxied

A = "8988280666000000001"
IP = "10.64.4.1"
OTHER, IP_OTHER = "8988280666000000002", "10.64.4.2"
INACTIVE, IP_INACTIVE = "8988280666000000003", "10.64.4.3"
UNKNOWN = "8988280666000000009"
NOW = int(START.timestamp())
BERLIN = {"longitude": 13.404954, "latitude": 52.520008, "source": "GPS", "sample_time": 1700000000}
BERLIN_CSV = b"Longitude,Latitude,Source,SampleTime\n13.404954,52.520008,GPS,1700000000\n"


@pytest.fixture
async def client(any_store: DeviceStore, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    await any_store.create(Device(iccid=A, ip=IP))
    await any_store.create(Device(iccid=OTHER, ip=IP_OTHER))
    await any_store.create(Device(iccid=INACTIVE, ip=IP_INACTIVE, status="inactive"))
    async with asgi_client(build_app(any_store, clock)) as http:
        yield http


async def put(client: httpx.AsyncClient, body: Any, iccid: str = A) -> httpx.Response:
    return await client.put(f"/devices/{iccid}/location", json=body, headers=AUTH)


async def test_put_then_csv_over_the_proxy_byte_exact(client: httpx.AsyncClient) -> None:
    stored = await put(client, BERLIN)
    assert stored.status_code == 200, stored.text
    assert stored.json() == {
        "stored": True,
        "detail": "stored",
        "location": {
            "longitude": "13.404954",
            "latitude": "52.520008",
            "source": "GPS",
            "sample_time": 1700000000,
        },
    }
    response = await client.get("/location", headers=proxied(IP))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.content == BERLIN_CSV
    got = await client.get(f"/devices/{A}/location", headers=AUTH)
    assert got.json() == stored.json()["location"]
    assert (await client.get(f"/devices/{A}", headers=AUTH)).json()["location"] == got.json()


@pytest.mark.parametrize(
    ("raw_longitude", "raw_latitude", "longitude", "latitude"),
    [
        pytest.param("13.4049540", "52.520008", "13.4049540", "52.520008", id="trailing-zero"),
        pytest.param("-180", "90", "-180", "90", id="integers-at-the-bounds"),
        pytest.param("180.000", "-90.0", "180.000", "-90.0", id="bounds-with-decimals"),
        pytest.param(
            "10.000000000000001", "0.1", "10.000000000000001", "0.1", id="float-would-round"
        ),
        pytest.param("1e-7", "5E1", "0.0000001", "50", id="exponents-written-out"),
        pytest.param('"13.404954"', '"52.520008"', "13.404954", "52.520008", id="as-strings"),
        pytest.param("-0.000001", "-33.8688", "-0.000001", "-33.8688", id="negative"),
    ],
)
async def test_degrees_are_served_exactly_as_written(
    client: httpx.AsyncClient, raw_longitude: str, raw_latitude: str, longitude: str, latitude: str
) -> None:
    # Raw JSON text: a JSON number must not pass through a binary float on its way.
    body = (
        f'{{"longitude": {raw_longitude}, "latitude": {raw_latitude}, '
        f'"source": "CellTower", "sample_time": 1700000000}}'
    )
    response = await client.put(
        f"/devices/{A}/location",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    csv = (await client.get("/location", headers=proxied(IP))).text
    assert (
        csv
        == f"Longitude,Latitude,Source,SampleTime\n{longitude},{latitude},CellTower,1700000000\n"
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        pytest.param({"longitude": 180.0000001}, "longitude", id="longitude-over"),
        pytest.param({"longitude": -180.5}, "longitude", id="longitude-under"),
        pytest.param({"latitude": 90.01}, "latitude", id="latitude-over"),
        pytest.param({"latitude": -91}, "latitude", id="latitude-under"),
        pytest.param({"latitude": "north"}, "latitude", id="latitude-text"),
        pytest.param({"longitude": "NaN"}, "longitude", id="longitude-nan"),
        pytest.param({"longitude": "1." + "1" * 16}, "longitude", id="too-many-decimals"),
        pytest.param({"longitude": None}, "longitude", id="longitude-null"),
        pytest.param({"source": ""}, "source", id="source-empty"),
        pytest.param({"source": "GPS,1"}, "source", id="source-comma-breaks-csv"),
        pytest.param({"source": "GPS\n"}, "source", id="source-newline"),
        pytest.param({"source": "x" * 33}, "source", id="source-too-long"),
        pytest.param({"sample_time": -1}, "sample_time", id="time-negative"),
        pytest.param({"sample_time": 1700000000.5}, "sample_time", id="time-fraction"),
        pytest.param({"sample_time": "1700000000"}, "sample_time", id="time-string"),
        pytest.param({"sample_time": True}, "sample_time", id="time-bool"),
        pytest.param({"sample_time": NOW + 2 * 86400}, "sample_time", id="time-in-the-future"),
        pytest.param({"altitude": 34}, "altitude", id="unknown-field"),
    ],
)
async def test_invalid_location_is_422_and_changes_nothing(
    client: httpx.AsyncClient, changes: dict[str, Any], field: str
) -> None:
    response = await put(client, {**BERLIN, **changes})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"][:2] == ["body", field]
    assert (await client.get(f"/devices/{A}/location", headers=AUTH)).status_code == 404


@pytest.mark.parametrize("missing", ["longitude", "latitude", "source", "sample_time"])
async def test_every_field_is_required(client: httpx.AsyncClient, missing: str) -> None:
    body = {k: v for k, v in BERLIN.items() if k != missing}
    response = await put(client, body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", missing]


async def test_the_newest_sample_wins(client: httpx.AsyncClient) -> None:
    await put(client, BERLIN)
    older = await put(client, {**BERLIN, "longitude": 2.35, "sample_time": 1699999999})
    assert older.status_code == 200
    assert older.json()["stored"] is False
    assert "older" in older.json()["detail"]
    assert older.json()["location"]["longitude"] == "13.404954"  # what is kept, stated

    same_time = await put(client, {**BERLIN, "source": "CellTower"})
    assert same_time.json()["stored"] is True  # an equal time replaces (a correction)

    newer = await put(client, {**BERLIN, "longitude": 2.35, "sample_time": 1700000001})
    assert newer.json()["stored"] is True
    csv = (await client.get("/location", headers=proxied(IP))).content
    assert csv == b"Longitude,Latitude,Source,SampleTime\n2.35,52.520008,GPS,1700000001\n"
    # Locations belong to their device.
    assert (await client.get("/location", headers=proxied(IP_OTHER))).status_code == 404


async def test_a_sample_up_to_a_day_ahead_is_accepted(client: httpx.AsyncClient) -> None:
    response = await put(client, {**BERLIN, "sample_time": NOW + 86400})
    assert response.json()["stored"] is True


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", f"/devices/{UNKNOWN}/location", BERLIN),
        ("GET", f"/devices/{UNKNOWN}/location", None),
    ],
)
async def test_unknown_device_is_404(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    response = await client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"detail": f"device {UNKNOWN} not found"}


async def test_no_location_yet_is_404_on_both_sides(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/devices/{A}/location", headers=AUTH)
    assert response.json() == {"detail": "no location data for this device"}
    assert (await client.get("/location", headers=proxied(IP))).status_code == 404


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", f"/devices/{A}/location"), ("GET", f"/devices/{A}/location")]
)
async def test_management_side_needs_the_api_key(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, json=BERLIN, headers=proxied(IP))
    assert response.status_code == 401


# docs/CONTRACT.md §3's table for CoAP GET /location, as the API answers it (the proxy maps 1:1).
@pytest.mark.parametrize(
    ("path", "headers", "content", "barred", "status"),
    [
        pytest.param("/location", proxied(IP), b"", False, 200, id="2.05"),
        pytest.param("/location?x=1", proxied(IP), b"", False, 400, id="4.00-query"),
        pytest.param("/location?", proxied(IP), b"", False, 200, id="empty-query-is-none"),
        pytest.param("/location?t=a", proxied(IP), b"", False, 400, id="4.00-topic-query"),
        pytest.param("/location", proxied(IP), b"x", False, 400, id="4.00-payload"),
        pytest.param("/location", proxied("10.64.9.9"), b"", False, 401, id="4.01-unknown"),
        pytest.param("/location", proxied(IP_INACTIVE), b"", False, 401, id="4.01-inactive"),
        pytest.param("/location?x=1", proxied("10.64.9.9"), b"", False, 401, id="4.01-first"),
        pytest.param("/location", proxied(IP), b"", True, 403, id="4.03-barred"),
        pytest.param("/location", proxied(IP_OTHER), b"", False, 404, id="4.04-no-data"),
        pytest.param("/location", {"Forwarded": f'for="{IP}:1"'}, b"", False, 403, id="no-token"),
        pytest.param("/location", {"X-Bridge-Token": PROXY_TOKEN}, b"", False, 400, id="no-fwd"),
    ],
)
async def test_coap_side_codes(
    client: httpx.AsyncClient,
    path: str,
    headers: dict[str, str],
    content: bytes,
    barred: bool,
    status: int,
) -> None:
    await put(client, BERLIN)
    if barred:
        patched = await client.patch(f"/devices/{A}", json={"location_barred": True}, headers=AUTH)
        assert patched.json()["location_barred"] is True
    response = await client.request("GET", path, headers=headers, content=content)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.content == BERLIN_CSV


async def test_barring_is_reversible(client: httpx.AsyncClient) -> None:
    await put(client, BERLIN)
    await client.patch(f"/devices/{A}", json={"location_barred": True}, headers=AUTH)
    assert (await client.get("/location", headers=proxied(IP))).status_code == 403
    await client.patch(f"/devices/{A}", json={"location_barred": False}, headers=AUTH)
    assert (await client.get("/location", headers=proxied(IP))).status_code == 200
