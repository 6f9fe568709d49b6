"""``/templates`` (api/routes/templates.py): upload, list, get, delete, the tester, assignment to
a device, and every refusal with its precise message."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from tests.api.conftest import ACTIVE, ACTIVE_IP, AUTH, asgi_client, build_app
from tests.support.services import RedisServer

# The worked example of docs/API.md: 12 bytes → temperature, humidity, battery, position.


def field(asset: str, byte: int, length: int, kind: str, **extra: object) -> dict[str, Any]:
    """One row of a template's ``sense`` list; ``custom_type`` goes beside ``value``."""
    custom = extra.pop("custom_type", None)
    row: dict[str, Any] = {
        "asset": asset,
        "value": {"byte": byte, "bytelength": length, "type": kind, **extra},
    }
    if custom is not None:
        row["custom_type"] = custom
    return row


TRACKER: dict[str, Any] = {
    "sense": [
        field("temperature", 0, 2, "int", scale=0.01),
        field("humidity", 2, 1, "uint"),
        field("battery.low", 3, 1, "boolean"),
        field("lat", 4, 4, "float", custom_type="location_lat"),
        field("lng", 8, 4, "float", custom_type="location_long"),
    ]
}
PAYLOAD = struct.pack(">hBBff", 2150, 40, 1, 52.5, 13.25)


@pytest.fixture(params=["memory", "redis"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    store = MemoryDeviceStore()
    await store.create(Device(iccid=ACTIVE, ip=ACTIVE_IP))
    redis_url: str | None = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_url = server.url
    app = build_app(store, redis_url=redis_url)
    try:
        async with asgi_client(app) as http:
            http.headers.update(AUTH)
            yield http
    finally:
        await app.state.templates.close()


async def _upload(http: httpx.AsyncClient, template: object = TRACKER, **extra: object) -> Any:
    created = await http.post("/templates", json={"template": template, **extra})
    assert created.status_code == 201, created.text
    return created.json()


async def test_upload_list_get_delete(client: httpx.AsyncClient) -> None:
    created = await _upload(client, name="tracker v2")
    assert set(created) == {"id", "name", "template", "min_length", "created_at"}
    assert created["name"] == "tracker v2"
    assert created["template"] == TRACKER
    assert created["min_length"] == 12
    assert len(created["id"]) == 12
    assert created["id"].replace("-", "").replace("_", "").isalnum()
    other = await _upload(client)
    assert other["id"] != created["id"]
    assert other["name"] is None
    assert (await client.get(f"/templates/{created['id']}")).json() == created
    listed = (await client.get("/templates")).json()
    assert sorted(t["id"] for t in listed["templates"]) == sorted([created["id"], other["id"]])
    deleted = await client.delete(f"/templates/{created['id']}")
    assert deleted.status_code == 204
    gone = await client.get(f"/templates/{created['id']}")
    assert gone.status_code == 404
    assert gone.json() == {"detail": f"no template {created['id']}"}
    assert (await client.delete(f"/templates/{created['id']}")).status_code == 404
    assert [t["id"] for t in (await client.get("/templates")).json()["templates"]] == [other["id"]]


@pytest.mark.parametrize(
    ("template", "where", "words"),
    [
        ({}, "sense", "missing"),
        ({"sense": []}, "sense", ""),
        (
            {"sense": [{"asset": "a", "value": {"byte": 0, "bytelenght": 2, "type": "int"}}]},
            "sense[0].value.bytelenght",
            "unknown",
        ),
        (
            {"sense": [field("a", 0, 2, "int"), field("b", 2, 1, "integer")]},
            "sense[1].value.type",
            "",
        ),
        ({"sense": [field("a", 0, 3, "float")]}, "sense[0].value.bytelength", ""),
        ({"sense": [field("a", 0, 1, "uint", signed=True)]}, "sense[0].value.signed", ""),
        (
            {"sense": [field("car", 0, 1, "uint"), field("car.fuel", 1, 1, "uint")]},
            "sense[1].asset",
            "",
        ),
        ({"sense": [field("a", 2000, 1, "uint")]}, "sense[0].value.byte", ""),
    ],
)
async def test_a_template_that_does_not_compile_is_refused_with_its_place(
    client: httpx.AsyncClient, template: object, where: str, words: str
) -> None:
    refused = await client.post("/templates", json={"template": template})
    assert refused.status_code == 422, refused.text
    body = refused.json()
    assert body["where"] == where
    assert isinstance(body["detail"], str)
    assert words in body["detail"]
    assert (await client.get("/templates")).json() == {"templates": []}  # nothing stored


@pytest.mark.parametrize(
    "body",
    [
        {},  # no template
        {"template": []},  # not an object
        {"template": TRACKER, "name": ""},
        {"template": TRACKER, "name": "a\nb"},
        {"template": TRACKER, "colour": "blue"},
    ],
)
async def test_a_malformed_upload_is_a_validation_error(
    client: httpx.AsyncClient, body: dict[str, object]
) -> None:
    refused = await client.post("/templates", json=body)
    assert refused.status_code == 422, refused.text
    assert isinstance(refused.json()["detail"], list)


async def test_the_tester_translates_hex_and_base64(client: httpx.AsyncClient) -> None:
    tid = (await _upload(client))["id"]
    expected = {
        "json": {
            "temperature": 21.5,
            "humidity": 40,
            "battery": {"low": True},
            "lat": 52.5,
            "lng": 13.25,
        },
        "latitude": 52.5,
        "longitude": 13.25,
    }
    spaced = " ".join(f"{b:02x}" for b in PAYLOAD)
    by_hex = await client.post(f"/templates/{tid}/test", json={"payload_hex": spaced})
    assert by_hex.status_code == 200, by_hex.text
    assert by_hex.json() == expected
    by_b64 = await client.post(
        f"/templates/{tid}/test", json={"payload_base64": base64.b64encode(PAYLOAD).decode()}
    )
    assert by_b64.json() == expected


async def test_the_tester_refusals(client: httpx.AsyncClient) -> None:
    tid = (await _upload(client))["id"]
    short = await client.post(f"/templates/{tid}/test", json={"payload_hex": PAYLOAD[:11].hex()})
    assert short.status_code == 422
    assert short.json()["detail"] == "payload is 11 bytes, the template needs 12"
    for body, words in [
        ({}, "exactly one"),
        ({"payload_hex": "00", "payload_base64": "AA=="}, "exactly one"),
        ({"payload_hex": "0g"}, "not hex"),
        ({"payload_base64": "A"}, "not base64"),
    ]:
        refused = await client.post(f"/templates/{tid}/test", json=body)
        assert refused.status_code == 422, body
        assert words in str(refused.json()["detail"]), refused.text
    unknown = await client.post("/templates/nope/test", json={"payload_hex": "00"})
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "no template nope"}


async def test_assignment_and_the_delete_it_blocks(client: httpx.AsyncClient) -> None:
    tid = (await _upload(client))["id"]
    assigned = await client.patch(f"/devices/{ACTIVE}", json={"template": tid})
    assert assigned.status_code == 200, assigned.text
    assert assigned.json()["template"] == tid
    assert (await client.get(f"/devices/{ACTIVE}")).json()["template"] == tid
    blocked = await client.delete(f"/templates/{tid}")
    assert blocked.status_code == 409
    assert blocked.json() == {
        "detail": f"template {tid} is assigned to 1 device(s): {ACTIVE}",
        "devices": [ACTIVE],
    }
    assert (await client.get(f"/templates/{tid}")).status_code == 200  # still there
    unassigned = await client.patch(f"/devices/{ACTIVE}", json={"template": None})
    assert unassigned.status_code == 200
    assert unassigned.json()["template"] is None
    assert (await client.delete(f"/templates/{tid}")).status_code == 204


async def test_assigning_an_unknown_template_is_refused(client: httpx.AsyncClient) -> None:
    for unknown in ("nope", "a/b", "x" * 300):
        refused = await client.patch(f"/devices/{ACTIVE}", json={"template": unknown})
        assert refused.status_code == 422, refused.text
        [error] = refused.json()["detail"]
        assert error["loc"] == ["body", "template"]
        assert error["msg"].startswith("no template ")
    assert (await client.get(f"/devices/{ACTIVE}")).json()["template"] is None


async def test_templates_need_the_management_key(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/templates"),
        ("POST", "/templates"),
        ("GET", "/templates/x"),
        ("DELETE", "/templates/x"),
        ("POST", "/templates/x/test"),
    ]:
        refused = await client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401, (method, path)


async def test_a_template_body_over_its_cap_is_refused_unread(client: httpx.AsyncClient) -> None:
    refused = await client.post(
        "/templates", content=b"x" * (64 * 1024 + 1), headers={"Content-Type": "application/json"}
    )
    assert refused.status_code == 413


async def test_a_store_that_is_down_is_a_503(redis_server: RedisServer) -> None:
    app = build_app(MemoryDeviceStore(), redis_url=redis_server.url)
    try:
        async with asgi_client(app) as http:
            http.headers.update(AUTH)
            redis_server.stop()
            for method, path, body in [
                ("GET", "/templates", None),
                ("POST", "/templates", {"template": TRACKER}),
                ("GET", "/templates/abc", None),
            ]:
                answer = await http.request(method, path, json=body)
                assert answer.status_code == 503, answer.text
                assert answer.json() == {"detail": "template store unavailable"}
                assert answer.headers["retry-after"] == "1"
    finally:
        redis_server.start()
        await app.state.templates.close()
