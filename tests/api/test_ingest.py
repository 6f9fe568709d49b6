"""POST /ingest against a real mosquitto: PUBACK before 204, byte-exact payloads, refusals."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from api.app import create_app
from api.publisher import MqttPublisher
from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from policies.forwarding import IDENTITY_HEADER, TOKEN_HEADER, format_forwarded
from tests.api.conftest import (
    ACTIVE,
    ACTIVE_IP,
    INACTIVE,
    INACTIVE_IP,
    PROXY_HEADERS,
    make_settings,
)
from tests.support.http import serve_app
from tests.support.mqtt import collect, subscribed
from tests.support.services import MosquittoServer

PAYLOAD = bytes(range(256)) + b"\x00\xff not utf-8: \xc3\x28"


def headers(ip: str = ACTIVE_IP, port: int = 40001, **extra: str) -> dict[str, str]:
    return {**PROXY_HEADERS, "Forwarded": format_forwarded(ip, port), **extra}


async def test_default_topic_byte_exact_with_user_properties(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    before = time.time_ns() // 1_000_000
    async with subscribed(mosquitto.url, f"devices/{ACTIVE}/messages") as sub:
        response = await client.post(
            "/ingest",
            content=PAYLOAD,
            headers=headers(**{"Content-Type": "application/json"}),
        )
        assert response.status_code == 204, response.text
        assert response.content == b""
        [message] = await sub.wait_for(1)
    assert message.payload == PAYLOAD
    assert message.qos == 1
    assert message.properties is not None
    props = dict(message.properties.UserProperty)
    assert props["iccid"] == ACTIVE
    assert props["source"] == f"{ACTIVE_IP}:40001"
    assert props["content-format"] == "50"
    assert before <= int(props["received-at"]) <= time.time_ns() // 1_000_000
    assert set(props) == {"iccid", "device", "source", "content-format", "received-at"}
    assert props["device"] == ACTIVE  # a SIM's id is its ICCID


async def test_unmapped_content_type_is_passed_as_string(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    async with subscribed(mosquitto.url, f"devices/{ACTIVE}/messages") as sub:
        response = await client.post(
            "/ingest", content=b"x", headers=headers(**{"Content-Type": "application/x-custom"})
        )
        assert response.status_code == 204
        [message] = await sub.wait_for(1)
    assert message.properties is not None
    assert dict(message.properties.UserProperty)["content-format"] == "application/x-custom"


async def test_empty_payload_and_no_content_type(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    async with subscribed(mosquitto.url, f"devices/{ACTIVE}/messages") as sub:
        response = await client.post("/ingest", content=b"", headers=headers())
        assert response.status_code == 204
        [message] = await sub.wait_for(1)
    assert message.payload == b""
    assert message.properties is not None
    assert "content-format" not in dict(message.properties.UserProperty)


async def test_topic_from_query(client: httpx.AsyncClient, mosquitto: MosquittoServer) -> None:
    async with subscribed(mosquitto.url, "#") as sub:
        response = await client.post(
            "/ingest", params={"t": "fleet/Truck_7/gps"}, content=PAYLOAD, headers=headers()
        )
        assert response.status_code == 204
        [message] = await sub.wait_for(1)
        await sub.assert_silent(0.1)  # and nowhere else
    assert str(message.topic) == "fleet/Truck_7/gps"
    assert message.payload == PAYLOAD


async def test_ipv6_source(
    client: httpx.AsyncClient, device_store: MemoryDeviceStore, mosquitto: MosquittoServer
) -> None:
    iccid = "89882806660000000099"
    await device_store.create(Device(iccid=iccid, ip="2001:db8::7"))
    async with subscribed(mosquitto.url, f"devices/{iccid}/messages") as sub:
        response = await client.post(
            "/ingest", content=b"v6", headers=headers(ip="2001:db8:0::7", port=5683)
        )
        assert response.status_code == 204, response.text
        [message] = await sub.wait_for(1)
    assert message.properties is not None
    assert dict(message.properties.UserProperty)["source"] == "[2001:db8::7]:5683"


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("a//b", "two slashes"),
        ("a" * 254, "at most 253"),
        ("a-b", "only A-Z"),
        ("ä", "only A-Z"),
        ("", "empty"),
        ("a/+/b", "only A-Z"),
        ("#", "only A-Z"),
    ],
)
async def test_bad_topic_is_400_and_nothing_published(
    client: httpx.AsyncClient, mosquitto: MosquittoServer, topic: str, message: str
) -> None:
    async with subscribed(mosquitto.url, "#") as sub:
        response = await client.post(
            "/ingest", params={"t": topic}, content=b"x", headers=headers()
        )
        assert response.status_code == 400
        assert message in response.json()["detail"]
        await sub.assert_silent()


async def test_topic_given_twice_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/ingest?t=a&t=b", content=b"x", headers=headers())
    assert response.status_code == 400
    assert "more than once" in response.json()["detail"]


async def test_topic_of_exactly_253_characters_is_accepted(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    topic = "a" * 253
    async with subscribed(mosquitto.url, topic) as sub:
        response = await client.post(
            "/ingest", params={"t": topic}, content=b"x", headers=headers()
        )
        assert response.status_code == 204
        await sub.wait_for(1)


@pytest.mark.parametrize(
    ("request_headers", "status", "detail"),
    [
        pytest.param(headers(ip="10.99.0.1"), 401, "unknown or inactive", id="unknown-ip"),
        pytest.param(headers(ip=INACTIVE_IP), 401, "unknown or inactive", id="inactive"),
        pytest.param(
            headers(ip="10.99.0.1", **{IDENTITY_HEADER: "8988280666000000777"}),
            401,
            "unknown or inactive",
            id="unknown-identity",
        ),
        pytest.param(
            headers(**{IDENTITY_HEADER: INACTIVE}), 401, "unknown or inactive", id="inactive-id"
        ),
        pytest.param(
            {"Forwarded": format_forwarded(ACTIVE_IP, 1)}, 403, "proxy token", id="no-token"
        ),
        pytest.param(headers(**{TOKEN_HEADER: "wrong"}), 403, "proxy token", id="wrong-token"),
        pytest.param(PROXY_HEADERS, 400, "Forwarded", id="no-forwarded"),
        pytest.param(
            {**PROXY_HEADERS, "Forwarded": 'for="unknown"'}, 400, "Forwarded", id="bad-forwarded"
        ),
    ],
)
async def test_refused_requests_publish_nothing(
    client: httpx.AsyncClient,
    mosquitto: MosquittoServer,
    request_headers: dict[str, str],
    status: int,
    detail: str,
) -> None:
    async with subscribed(mosquitto.url, "#") as sub:
        response = await client.post("/ingest", content=b"secret", headers=request_headers)
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert detail in response.json()["detail"]
        await sub.assert_silent()


async def test_dtls_identity_resolves_by_iccid_not_ip(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    # Over DTLS the PSK identity names the device even from an address nobody registered.
    async with subscribed(mosquitto.url, f"devices/{ACTIVE}/messages") as sub:
        response = await client.post(
            "/ingest",
            content=b"dtls",
            headers=headers(ip="10.99.0.1", **{IDENTITY_HEADER: ACTIVE}),
        )
        assert response.status_code == 204, response.text
        [message] = await sub.wait_for(1)
    assert message.payload == b"dtls"


async def test_payload_too_large_is_413(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    async with subscribed(mosquitto.url, "#") as sub:
        response = await client.post("/ingest", content=b"x" * 65537, headers=headers())
        assert response.status_code == 413
        assert "65536" in response.json()["detail"]

        async def chunked() -> object:
            for _ in range(17):
                yield b"y" * 4096

        response = await client.post("/ingest", content=chunked(), headers=headers())
        assert response.status_code == 413
        await sub.assert_silent()
    ok = await client.post("/ingest", content=b"x" * 65536, headers=headers())
    assert ok.status_code == 204


async def test_no_proxy_token_configured_is_503(
    mosquitto: MosquittoServer, device_store: MemoryDeviceStore, publisher: MqttPublisher
) -> None:
    app = create_app(
        make_settings(mosquitto, proxy_token=None), store=device_store, publisher=publisher
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as http:
        response = await http.post("/ingest", content=b"x", headers=headers())
    assert response.status_code == 503
    assert response.json() == {"detail": "ingest disabled: no proxy token configured"}


async def test_broker_down_is_503_then_next_publish_after_restart_succeeds(
    client: httpx.AsyncClient, mosquitto: MosquittoServer, publisher: MqttPublisher
) -> None:
    mosquitto.stop()
    for _ in range(100):  # the client notices the closed socket within milliseconds
        if not publisher.connected:
            break
        await asyncio.sleep(0.01)
    response = await client.post("/ingest", content=b"lost", headers=headers())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "broker" in response.json()["detail"].lower()

    mosquitto.start()
    async with subscribed(mosquitto.url, "#") as sub:
        # The very next request reconnects at once instead of waiting out the backoff.
        response = await client.post("/ingest", content=b"after restart", headers=headers())
        assert response.status_code == 204, response.text
        [message] = await sub.wait_for(1)
        await sub.assert_silent(0.2)  # the refused payload never shows up
    assert message.payload == b"after restart"


async def test_many_concurrent_publishes_wait_for_their_own_puback(
    client: httpx.AsyncClient, mosquitto: MosquittoServer, caplog: pytest.LogCaptureFixture
) -> None:
    count = 300
    async with subscribed(mosquitto.url, "load/+") as sub:
        with caplog.at_level(logging.WARNING):
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/ingest", params={"t": f"load/m{n}"}, content=b"%d" % n, headers=headers()
                    )
                    for n in range(count)
                )
            )
        assert [r.status_code for r in responses] == [204] * count
        messages = await sub.wait_for(count)
    assert sorted(m.payload for m in messages) == sorted(b"%d" % n for n in range(count))
    # A burst is not an incident: nothing logged at warning level (aiomqtt used to warn per
    # publish past 10 pending; the link must not complain either).
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_mqtt_311_publishes_without_properties(
    mosquitto: MosquittoServer, device_store: MemoryDeviceStore
) -> None:
    settings = make_settings(mosquitto, mqtt_protocol="3.1.1")
    mqtt = MqttPublisher.from_settings(settings)
    await mqtt.start()
    try:
        app = create_app(settings, store=device_store, publisher=mqtt)
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as http,
            subscribed(mosquitto.url, f"devices/{ACTIVE}/messages") as sub,
        ):
            response = await http.post("/ingest", content=PAYLOAD, headers=headers())
            assert response.status_code == 204
            [message] = await sub.wait_for(1)
    finally:
        await mqtt.close()
    assert message.payload == PAYLOAD
    assert message.properties is None or not getattr(message.properties, "UserProperty", None)


async def test_served_by_uvicorn_with_lifespan(mosquitto: MosquittoServer) -> None:
    # No store or publisher given: the lifespan builds both (memory store, MqttPublisher).
    app = create_app(make_settings(mosquitto))
    async with serve_app(app) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        health = await http.get("/healthz")
        assert health.json() == {"status": "ok", "mqtt": "connected", "store": "memory"}
        created = await http.post(
            "/devices",
            json={"iccid": ACTIVE, "ip": ACTIVE_IP, "status": "active"},
            headers={"Authorization": "Bearer management-secret"},
        )
        assert created.status_code == 201
        ready = asyncio.Event()
        collector = asyncio.create_task(
            collect(mosquitto.url, f"devices/{ACTIVE}/messages", 1, ready=ready)
        )
        await ready.wait()
        response = await http.post("/ingest", content=PAYLOAD, headers=headers())
        assert response.status_code == 204
        [message] = await collector
        assert message.payload == PAYLOAD

        mosquitto.stop()
        for _ in range(100):
            if (await http.get("/healthz")).json()["mqtt"] == "disconnected":
                break
            await asyncio.sleep(0.01)
        assert (await http.get("/healthz")).json()["mqtt"] == "disconnected"


async def test_app_starts_while_broker_is_down(mosquitto: MosquittoServer) -> None:
    mosquitto.stop()
    app = create_app(make_settings(mosquitto))
    async with serve_app(app) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        assert (await http.get("/healthz")).json()["mqtt"] == "disconnected"
        await http.post(
            "/devices",
            json={"iccid": ACTIVE, "ip": ACTIVE_IP},
            headers={"Authorization": "Bearer management-secret"},
        )
        response = await http.post("/ingest", content=b"x", headers=headers())
        assert response.status_code == 503
        mosquitto.start()
        response = await http.post("/ingest", content=b"x", headers=headers())
        assert response.status_code == 204
