"""Device messages translated by their template on every ingest path (api/routes/ingest.py),
against a real mosquitto: JSON on MQTT, a short payload refused with nothing published, the
position on the device's location, and the messages of devices without one untouched."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.publisher import MqttPublisher
from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from policies.batch import encode_batch
from policies.forwarding import format_forwarded
from tests.api.conftest import ACTIVE, ACTIVE_IP, AUTH, PROXY_HEADERS, make_settings
from tests.api.test_ingest_batch import BATCH_HEADERS, item
from tests.api.test_templates_api import PAYLOAD, TRACKER, field
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer

RAW = "8988280666000000003"
RAW_IP = "10.64.0.3"
TOPICS = "devices/+/messages"
EXPECTED = {
    "temperature": 21.5,
    "humidity": 40,
    "battery": {"low": True},
    "lat": 52.5,
    "lng": 13.25,
}


@pytest.fixture
async def store() -> MemoryDeviceStore:
    devices = MemoryDeviceStore()
    await devices.create(Device(iccid=ACTIVE, ip=ACTIVE_IP))
    await devices.create(Device(iccid=RAW, ip=RAW_IP))
    return devices


@pytest.fixture(params=["fast path", "route"])
async def api(
    request: pytest.FixtureRequest,
    mosquitto: MosquittoServer,
    store: MemoryDeviceStore,
    publisher: MqttPublisher,
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """The app (the batch call by the fast path and by the route), the template uploaded and
    assigned to ACTIVE through the API; yields the client and the template's id."""
    app = create_app(
        make_settings(mosquitto),
        store=store,
        publisher=publisher,
        fast_path=request.param == "fast path",
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        created = await http.post("/templates", json={"template": TRACKER}, headers=AUTH)
        assert created.status_code == 201, created.text
        tid = created.json()["id"]
        assigned = await http.patch(f"/devices/{ACTIVE}", json={"template": tid}, headers=AUTH)
        assert assigned.status_code == 200, assigned.text
        yield http, tid


def _headers(ip: str = ACTIVE_IP, **extra: str) -> dict[str, str]:
    return {**PROXY_HEADERS, "Forwarded": format_forwarded(ip, 40001), **extra}


def _users(message: Any) -> dict[str, str]:
    return dict(message.properties.UserProperty)


async def test_a_12_byte_payload_arrives_as_json(
    api: tuple[httpx.AsyncClient, str], mosquitto: MosquittoServer, store: MemoryDeviceStore
) -> None:
    http, tid = api
    assert len(PAYLOAD) == 12
    before = int(time.time())
    async with subscribed(mosquitto.url, TOPICS) as sub:
        sent = await http.post(
            "/ingest",
            content=PAYLOAD,
            headers=_headers(**{"Content-Type": "application/octet-stream"}),
        )
        assert sent.status_code == 204, sent.text
        [message] = await sub.wait_for(1)
    assert json.loads(message.payload) == EXPECTED
    assert b" " not in message.payload  # compact
    users = _users(message)
    assert users["content-format"] == "50"  # not the device's 42: what is published is JSON
    assert users["template"] == tid
    assert users["iccid"] == ACTIVE
    # The position went to the device's location, stamped with the time of receipt.
    device = await store.get(ACTIVE)
    assert device is not None
    assert device.location is not None
    assert (device.location.latitude, device.location.longitude) == ("52.5", "13.25")
    assert device.location.source == "template"
    assert before <= device.location.sample_time <= int(time.time())
    # ... and the CoAP GET /location resource serves it.
    served = await http.get("/location", headers=_headers())
    assert served.status_code == 200
    assert served.text.splitlines()[1].startswith("13.25,52.5,template,")


async def test_a_short_payload_is_400_and_nothing_is_published(
    api: tuple[httpx.AsyncClient, str], mosquitto: MosquittoServer, store: MemoryDeviceStore
) -> None:
    http, tid = api
    async with subscribed(mosquitto.url, "#") as sub:
        short = await http.post("/ingest", content=PAYLOAD[:11], headers=_headers())
        assert short.status_code == 400
        assert short.json() == {
            "detail": f"payload does not fit template {tid}: payload is 11 bytes, "
            "the template needs 12"
        }
        batch = await http.post(
            "/ingest/batch",
            content=encode_batch([item(payload=PAYLOAD[:11]), item(payload=b"")]),
            headers=BATCH_HEADERS,
        )
        assert batch.status_code == 200, batch.text
        assert batch.json() == {"statuses": [400, 400]}
        await sub.assert_silent(0.3)
    device = await store.get(ACTIVE)
    assert device is not None
    assert device.location is None


async def test_a_batch_translates_the_devices_with_a_template_only(
    api: tuple[httpx.AsyncClient, str], mosquitto: MosquittoServer, store: MemoryDeviceStore
) -> None:
    http, tid = api
    raw = b"\x00\xff raw"
    async with subscribed(mosquitto.url, TOPICS) as sub:
        batch = await http.post(
            "/ingest/batch",
            content=encode_batch(
                [
                    item(payload=PAYLOAD, content_format=42),
                    item(ip=RAW_IP, payload=raw, content_format=42),
                    item(payload=PAYLOAD[:3]),
                    item(identity=ACTIVE, ip="10.99.0.1", payload=PAYLOAD + b"extra"),
                ]
            ),
            headers=BATCH_HEADERS,
        )
        assert batch.json() == {"statuses": [204, 204, 400, 204]}
        messages = await sub.wait_for(3)
        await sub.assert_silent(0.2)
    by_device: dict[str, list[Any]] = {}
    for message in messages:
        by_device.setdefault(_users(message)["device"], []).append(message)
    [untouched] = by_device[RAW]
    assert untouched.payload == raw  # byte-exact, as always
    assert _users(untouched)["content-format"] == "42"
    assert "template" not in _users(untouched)
    translated = by_device[ACTIVE]
    assert [json.loads(m.payload) for m in translated] == [EXPECTED, EXPECTED]
    assert {_users(m)["template"] for m in translated} == {tid}
    device = await store.get(ACTIVE)
    assert device is not None
    assert device.location is not None
    assert device.location.source == "template"
    other = await store.get(RAW)
    assert other is not None
    assert other.location is None


async def test_the_newest_sample_wins(
    api: tuple[httpx.AsyncClient, str], store: MemoryDeviceStore
) -> None:
    http, _ = api
    later = int(time.time()) + 3600  # a fix stamped later than any message now
    put = await http.put(
        f"/devices/{ACTIVE}/location",
        json={"longitude": 1.5, "latitude": 2.5, "source": "GPS", "sample_time": later},
        headers=AUTH,
    )
    assert put.status_code == 200, put.text
    sent = await http.post("/ingest", content=PAYLOAD, headers=_headers())
    assert sent.status_code == 204
    device = await store.get(ACTIVE)
    assert device is not None
    assert device.location is not None
    assert (device.location.longitude, device.location.source) == ("1.5", "GPS")


async def test_a_template_without_a_usable_position_leaves_the_location(
    mosquitto: MosquittoServer, store: MemoryDeviceStore, publisher: MqttPublisher
) -> None:
    app = create_app(make_settings(mosquitto), store=store, publisher=publisher)
    positioned = {
        "sense": [
            field("lat", 0, 4, "float", custom_type="location_lat"),
            field("lng", 4, 4, "float", custom_type="location_long"),
        ]
    }
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://a"
    ) as http:
        tid = (await http.post("/templates", json={"template": positioned}, headers=AUTH)).json()[
            "id"
        ]
        await http.patch(f"/devices/{ACTIVE}", json={"template": tid}, headers=AUTH)
        for lat, lng in [(91.0, 0.0), (0.0, float("nan")), (10.0, -181.0)]:
            sent = await http.post(
                "/ingest", content=struct.pack(">ff", lat, lng), headers=_headers()
            )
            assert sent.status_code == 204
    device = await store.get(ACTIVE)
    assert device is not None
    assert device.location is None


async def test_a_template_that_is_gone_publishes_raw(
    mosquitto: MosquittoServer, store: MemoryDeviceStore, publisher: MqttPublisher
) -> None:
    # Cannot happen through the API (a template in use is not deleted); a record written by
    # hand, or a race of a delete with an assignment, must not lose messages.
    await store.update(ACTIVE, template="gone")
    app = create_app(make_settings(mosquitto), store=store, publisher=publisher)
    async with (
        subscribed(mosquitto.url, TOPICS) as sub,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as http,
    ):
        single = await http.post("/ingest", content=b"\x01", headers=_headers())
        assert single.status_code == 204
        batch = await http.post(
            "/ingest/batch", content=encode_batch([item(payload=b"\x02")]), headers=BATCH_HEADERS
        )
        assert batch.json() == {"statuses": [204]}
        messages = await sub.wait_for(2)
    assert sorted(m.payload for m in messages) == [b"\x01", b"\x02"]
    assert all("template" not in _users(m) for m in messages)
