"""``COAP_BRIDGE_MQTT_METADATA=envelope`` (policies/envelope.py) on every device message path,
against a real mosquitto: an MQTT 3.1.1 subscriber, who gets no user properties, reads who
sent a message from the message itself. Status messages are never wrapped."""

from __future__ import annotations

import base64
import json
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
from policies.forwarding import IDENTITY_HEADER, format_forwarded
from tests.api.conftest import ACTIVE, ACTIVE_IP, AUTH, PROXY_HEADERS, make_settings
from tests.api.test_ingest_batch import BATCH_HEADERS, item
from tests.api.test_templates_api import PAYLOAD, TRACKER
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer

NODE = "koru-869181072798893"


@pytest.fixture
async def store() -> MemoryDeviceStore:
    devices = MemoryDeviceStore()
    await devices.create(Device(iccid=ACTIVE, ip=ACTIVE_IP))
    await devices.create(Device(id=NODE, psk="a" * 64))
    return devices


@pytest.fixture(params=["5", "3.1.1"])
async def client(
    request: pytest.FixtureRequest, mosquitto: MosquittoServer, store: MemoryDeviceStore
) -> AsyncIterator[httpx.AsyncClient]:
    """Envelope mode, publishing over MQTT 5 and over 3.1.1 (as to the embedded broker)."""
    settings = make_settings(
        mosquitto,
        mqtt_metadata="envelope",
        mqtt_protocol=request.param,
        profiles=["sim_identity", "managed_psk"],
    )
    publisher = MqttPublisher.from_settings(settings)
    await publisher.start()
    app = create_app(settings, store=store, publisher=publisher)
    await app.state.presence.start()  # the lifespan's part that publishes status messages
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api"
        ) as http:
            yield http
    finally:
        await app.state.presence.close()
        await publisher.close()


def _opened(message: Any) -> dict[str, Any]:
    document = json.loads(message.payload)
    assert isinstance(document, dict)
    return document


async def test_a_raw_message_carries_its_metadata(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    before = time.time_ns() // 1_000_000
    async with subscribed(mosquitto.url, "devices/+/messages", protocol="3.1.1") as sub:
        sent = await client.post(
            "/ingest",
            content=b"\x00\xff",
            headers={
                **PROXY_HEADERS,
                "Forwarded": format_forwarded(ACTIVE_IP, 40001),
                "Content-Type": "application/octet-stream",
            },
        )
        assert sent.status_code == 204, sent.text
        [message] = await sub.wait_for(1)
    assert message.properties is None  # 3.1.1: no properties reach this subscriber
    envelope = _opened(message)
    assert envelope == {
        "iccid": ACTIVE,
        "device": ACTIVE,
        "source": f"{ACTIVE_IP}:40001",
        "content_format": 42,
        "received_at": envelope["received_at"],
        "payload_base64": base64.b64encode(b"\x00\xff").decode(),
    }
    assert before <= envelope["received_at"] <= time.time_ns() // 1_000_000


async def test_a_batch_json_and_translated_messages(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    async with subscribed(mosquitto.url, "devices/+/messages", protocol="3.1.1") as sub:
        plain = await client.post(
            "/ingest/batch",
            content=encode_batch([item(payload=b'{"t": 1}', content_format=50)]),
            headers=BATCH_HEADERS,
        )
        assert plain.json() == {"statuses": [204]}
        [first] = await sub.wait_for(1)
        tid = (await client.post("/templates", json={"template": TRACKER}, headers=AUTH)).json()[
            "id"
        ]
        await client.patch(f"/devices/{ACTIVE}", json={"template": tid}, headers=AUTH)
        translated = await client.post(
            "/ingest/batch", content=encode_batch([item(payload=PAYLOAD)]), headers=BATCH_HEADERS
        )
        assert translated.json() == {"statuses": [204]}
        [_, second] = await sub.wait_for(2)
    assert _opened(first)["payload"] == {"t": 1}
    assert _opened(first)["content_format"] == 50
    envelope = _opened(second)
    assert envelope["template"] == tid
    assert envelope["content_format"] == 50
    assert envelope["payload"]["battery"] == {"low": True}
    assert envelope["payload"]["lat"] == 52.5


async def test_another_profiles_telemetry_is_wrapped_too(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    async with subscribed(mosquitto.url, f"devices/{NODE}/messages", protocol="3.1.1") as sub:
        sent = await client.post(
            f"/telemetry?id={NODE}",
            content=b'{"v": 3}',
            headers={
                **PROXY_HEADERS,
                "Forwarded": format_forwarded("10.9.9.9", 5684),
                IDENTITY_HEADER: NODE,
                "Content-Type": "application/json",
            },
        )
        assert sent.status_code == 201, sent.text
        [message] = await sub.wait_for(1)
    envelope = _opened(message)
    assert "iccid" not in envelope
    assert envelope["device"] == NODE
    assert envelope["payload"] == {"v": 3}


async def test_status_messages_are_not_wrapped(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    # A managed-PSK message brings its device online: the status message stays as it was.
    async with subscribed(mosquitto.url, f"devices/{NODE}/status", protocol="3.1.1") as sub:
        await client.post(
            f"/telemetry?id={NODE}",
            content=b"x",
            headers={
                **PROXY_HEADERS,
                "Forwarded": format_forwarded("10.9.9.9", 5684),
                IDENTITY_HEADER: NODE,
            },
        )
        [status] = await sub.wait_for(1)
    document = json.loads(status.payload)
    assert document["device"] == NODE
    assert document["status"] == "online"
    assert "payload" not in document
    assert "payload_base64" not in document
