"""The signed-session registry's management routes (api/routes/registry.py): secrets shown
once, never listed, the key rules, conflicts and the API key."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.api.signed_support import AUTH, SignedApp, signed_app
from tests.support.services import MosquittoServer


@pytest.fixture(params=["memory", "redis"])
async def signed(
    request: pytest.FixtureRequest, mosquitto: MosquittoServer
) -> AsyncIterator[SignedApp]:
    redis_url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    async with signed_app(mosquitto, redis_url=redis_url) as built:
        yield built


async def test_products_and_devices_secrets_are_shown_once(signed: SignedApp) -> None:
    http = signed.http
    created = await http.post(
        "/products", json={"productKey": "Pk1", "name": "meters"}, headers=AUTH
    )
    assert created.status_code == 201
    body = created.json()
    assert body["productKey"] == "Pk1"
    assert body["name"] == "meters"
    assert len(body["productSecret"]) == 32
    generated = (await http.post("/products", json={}, headers=AUTH)).json()
    assert len(generated["productKey"]) == 8
    assert generated["productKey"].isalnum()
    listed = (await http.get("/products", headers=AUTH)).json()
    assert sorted(p["productKey"] for p in listed) == sorted(["Pk1", generated["productKey"]])
    assert all("productSecret" not in p for p in listed)

    device = await http.post("/products/Pk1/devices", json={"deviceKey": "aa:bb:cc"}, headers=AUTH)
    assert device.status_code == 201
    assert device.json()["deviceId"] == "Pk1:aa:bb:cc"
    assert len(device.json()["deviceSecret"]) == 32
    one = (await http.get("/products/Pk1/devices/aa:bb:cc", headers=AUTH)).json()
    assert "deviceSecret" not in one
    assert one["presence"] == {
        "device": "Pk1:aa:bb:cc",
        "online": False,
        "last_seen": None,
        "expires_at": None,
    }
    devices = (await http.get("/products/Pk1/devices", headers=AUTH)).json()
    assert [d["deviceKey"] for d in devices] == ["aa:bb:cc"]
    assert "deviceSecret" not in devices[0]


async def test_conflicts_and_missing_things(signed: SignedApp) -> None:
    http = signed.http
    await http.post("/products", json={"productKey": "Pk1"}, headers=AUTH)
    assert (
        await http.post("/products", json={"productKey": "Pk1"}, headers=AUTH)
    ).status_code == 409
    await http.post("/products/Pk1/devices", json={"deviceKey": "d1"}, headers=AUTH)
    again = await http.post("/products/Pk1/devices", json={"deviceKey": "d1"}, headers=AUTH)
    assert again.status_code == 409
    assert (
        await http.post("/products/No/devices", json={"deviceKey": "d1"}, headers=AUTH)
    ).status_code == 404
    assert (await http.get("/products/No/devices", headers=AUTH)).status_code == 404
    assert (await http.get("/products/Pk1/devices/d2", headers=AUTH)).status_code == 404
    busy = await http.delete("/products/Pk1", headers=AUTH)
    assert busy.status_code == 409
    assert "delete them first" in busy.json()["detail"]
    assert (await http.delete("/products/Pk1/devices/d1", headers=AUTH)).status_code == 204
    assert (await http.delete("/products/Pk1/devices/d1", headers=AUTH)).status_code == 404
    assert (await http.delete("/products/Pk1", headers=AUTH)).status_code == 204
    assert (await http.delete("/products/Pk1", headers=AUTH)).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"productKey": "has:colon"},
        {"productKey": "_leading"},
        {"productKey": "a" * 64},
        {"productKey": "sp ace"},
        {"name": "x" * 129},
        {"productSecret": "chosen"},  # a secret is never chosen by the caller
    ],
)
async def test_bad_products_are_422(signed: SignedApp, body: dict[str, object]) -> None:
    answer = await signed.http.post("/products", json=body, headers=AUTH)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"]


@pytest.mark.parametrize("device_key", ["", "a/b", "a b", "x" * 65])
async def test_bad_device_keys_are_422(signed: SignedApp, device_key: str) -> None:
    await signed.http.post("/products", json={"productKey": "Pk1"}, headers=AUTH)
    answer = await signed.http.post(
        "/products/Pk1/devices", json={"deviceKey": device_key}, headers=AUTH
    )
    assert answer.status_code == 422


async def test_the_api_key_is_required(signed: SignedApp) -> None:
    http = signed.http
    assert (await http.post("/products", json={})).status_code == 401
    assert (await http.get("/products")).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await http.get("/products/Pk1/devices", headers=wrong)).status_code == 401
