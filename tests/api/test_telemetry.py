"""``POST /telemetry?id=`` (the managed-PSK profile) against a real mosquitto: who may send for
which device, the Content-Formats, exactly-once across replicas (a real redis-server), the
broker down, and presence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import cbor2
import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.idempotency import build_ledger
from api.presence import PresenceWatcher
from api.publisher import MqttPublisher
from api.routes import telemetry
from api.store.base import Device, DeviceStore
from api.store.memory import MemoryDeviceStore
from policies.forwarding import IDEMPOTENCY_HEADER, IDENTITY_HEADER, format_forwarded
from stores.ledger import Ledger
from stores.presence import MemoryPresenceStore
from tests.api.conftest import PROXY_HEADERS, make_settings
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer, RedisServer

NODE = "koru-869181072798893"
IMEI = "869181072798893"
OTHER = "koru-869181072798901"
OTHER_IMEI = "869181072798901"
ASLEEP = "koru-asleep"
SIM = "8988280666000000001"
TOPIC = f"devices/{NODE}/messages"
PAYLOAD = b'{"temperature": 21.5, "battery": 3.7}'


@pytest.fixture
async def store() -> MemoryDeviceStore:
    devices = MemoryDeviceStore()
    await devices.create(Device(id=NODE, imei=IMEI, psk="a" * 64))
    await devices.create(Device(id=OTHER, imei=OTHER_IMEI, psk="b" * 64))
    await devices.create(Device(id=ASLEEP, status="inactive"))
    await devices.create(Device(iccid=SIM, ip="10.0.0.1"))
    return devices


def managed_app(
    mosquitto: MosquittoServer,
    store: DeviceStore,
    publisher: MqttPublisher,
    idempotency: Ledger | None = None,
    **overrides: object,
) -> FastAPI:
    """An API serving the managed-PSK profile, with presence noted in memory."""
    settings = make_settings(mosquitto, profiles=["managed_psk"], **overrides)
    app = create_app(settings, store=store, publisher=publisher, idempotency=idempotency)
    if not any(getattr(route, "path", None) == "/telemetry" for route in app.routes):
        app.include_router(telemetry.router)  # until api/profiles.py lists it
    if getattr(app.state, "presence", None) is None:
        app.state.presence = PresenceWatcher(
            MemoryPresenceStore(), lambda: publisher, settings.status_topic
        )
    return app


@pytest.fixture
async def app(
    mosquitto: MosquittoServer, store: MemoryDeviceStore, publisher: MqttPublisher
) -> FastAPI:
    return managed_app(mosquitto, store, publisher)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as http:
        yield http


def proxied(identity: str | None = NODE, **extra: str) -> dict[str, str]:
    """What the proxy sends for a device at 10.20.0.1:5000 (over DTLS: with its identity)."""
    headers = {**PROXY_HEADERS, "Forwarded": format_forwarded("10.20.0.1", 5000), **extra}
    if identity is not None:
        headers[IDENTITY_HEADER] = identity
    return headers


JSON_TYPE = {"Content-Type": "application/json"}


async def test_json_over_dtls_is_published_byte_exact_and_answered_201(
    client: httpx.AsyncClient, mosquitto: MosquittoServer, app: FastAPI
) -> None:
    async with subscribed(mosquitto.url, "devices/#") as sub:
        response = await client.post(
            "/telemetry", params={"id": NODE}, content=PAYLOAD, headers=proxied(**JSON_TYPE)
        )
        assert response.status_code == 201, response.text
        assert response.content == b""
        [message] = await sub.wait_for(1)
    assert str(message.topic) == TOPIC
    assert (message.payload, message.qos) == (PAYLOAD, 1)
    assert message.properties is not None
    props = dict(message.properties.UserProperty)
    assert set(props) == {"device", "source", "content-format", "received-at"}  # no iccid
    assert (props["device"], props["source"], props["content-format"]) == (
        NODE,
        "10.20.0.1:5000",
        "50",
    )
    # The first message turned the device online for the online window.
    presence = await app.state.presence.get(NODE)
    assert presence.online
    assert presence.expires_at == pytest.approx(presence.last_seen + 3600)


async def test_the_imei_names_the_device_too(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    async with subscribed(mosquitto.url, TOPIC) as sub:
        response = await client.post(
            "/telemetry", params={"id": IMEI}, content=PAYLOAD, headers=proxied(**JSON_TYPE)
        )
        assert response.status_code == 201, response.text
        [message] = await sub.wait_for(1)
    assert dict(message.properties.UserProperty)["device"] == NODE  # type: ignore[union-attr]


@pytest.mark.parametrize("named", [OTHER, OTHER_IMEI, "koru-nobody", SIM])
async def test_another_devices_id_over_dtls_is_403_and_nothing_is_published(
    client: httpx.AsyncClient, mosquitto: MosquittoServer, named: str
) -> None:
    async with subscribed(mosquitto.url, "devices/#") as sub:
        response = await client.post(
            "/telemetry", params={"id": named}, content=PAYLOAD, headers=proxied(**JSON_TYPE)
        )
        assert response.status_code == 403
        assert f"may not send for {named}" in response.json()["detail"]
        await sub.assert_silent()


@pytest.mark.parametrize("identity", ["koru-nobody", ASLEEP])
async def test_unknown_or_inactive_identity_is_401(
    client: httpx.AsyncClient, identity: str
) -> None:
    response = await client.post(
        "/telemetry", params={"id": identity}, content=PAYLOAD, headers=proxied(identity)
    )
    assert response.status_code == 401
    assert response.json() == {"detail": "unknown or inactive device"}


async def test_plain_coap_names_the_device_by_id_or_imei_alone(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    """Only in development mode does the proxy forward plain CoAP here: ``id`` is all there
    is (docs/PROFILES.md)."""
    async with subscribed(mosquitto.url, "devices/#") as sub:
        for named in (NODE, OTHER_IMEI):
            response = await client.post(
                "/telemetry", params={"id": named}, content=b"raw", headers=proxied(None)
            )
            assert response.status_code == 201, response.text
        first, second = await sub.wait_for(2)
    assert (str(first.topic), str(second.topic)) == (TOPIC, f"devices/{OTHER}/messages")
    for named in ("koru-nobody", "869181072798000", ASLEEP):
        response = await client.post(
            "/telemetry", params={"id": named}, content=b"raw", headers=proxied(None)
        )
        assert response.status_code == 401, named


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("", "query 'id' is missing"),
        ("?id=", "query 'id' is empty"),
        (f"?id={NODE}&id={NODE}", "query 'id' given more than once"),
        ("?device=x", "query 'id' is missing"),
    ],
)
async def test_id_missing_empty_or_twice_is_400(
    client: httpx.AsyncClient, query: str, detail: str
) -> None:
    response = await client.post(f"/telemetry{query}", content=PAYLOAD, headers=proxied())
    assert response.status_code == 400
    assert response.json() == {"detail": detail}


@pytest.mark.parametrize(
    ("content_type", "payload", "detail"),
    [
        ("application/json", b'{"t": 21.5', "not valid JSON"),
        ("application/json", b"", "not valid JSON"),
        ("application/json", b"NaN", "not valid JSON"),
        ("application/json", b"\xff\xfe", "not valid JSON"),
        ("application/cbor", b"", "not valid CBOR"),
        ("application/cbor", b"\xa1\x01", "not valid CBOR"),  # a map missing its value
        ("application/cbor", b"\x62\xff\xfe", "not valid CBOR"),  # text that is not UTF-8
        ("application/cbor", b"\xff", "break stop code"),
        ("application/cbor", b"\x01\x02", "1 bytes after the data item"),
        ("application/cbor", b"\x81" * 1000 + b"\x01", "not valid CBOR"),  # nested too deep
    ],
)
async def test_payload_that_does_not_decode_is_400_and_not_published(
    client: httpx.AsyncClient,
    mosquitto: MosquittoServer,
    content_type: str,
    payload: bytes,
    detail: str,
) -> None:
    async with subscribed(mosquitto.url, "devices/#") as sub:
        response = await client.post(
            "/telemetry",
            params={"id": NODE},
            content=payload,
            headers=proxied(**{"Content-Type": content_type}),
        )
        assert response.status_code == 400
        assert detail in response.json()["detail"]
        await sub.assert_silent()


async def test_cbor_raw_and_no_content_format_are_published_as_sent(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    cbor = cbor2.dumps({"temperature": 21.5, "tags": ["a", "b"], "raw": b"\x00\xff"})
    raw = bytes(range(256))
    sent = [("application/cbor", cbor, "60"), ("application/octet-stream", raw, "42")]
    async with subscribed(mosquitto.url, TOPIC) as sub:
        for content_type, payload, _ in sent:
            response = await client.post(
                "/telemetry",
                params={"id": NODE},
                content=payload,
                headers=proxied(**{"Content-Type": content_type}),
            )
            assert response.status_code == 201, response.text
        response = await client.post(
            "/telemetry", params={"id": NODE}, content=b"\xc3\x28", headers=proxied()
        )
        assert response.status_code == 201
        messages = await sub.wait_for(3)
    for message, (_, payload, number) in zip(messages, sent, strict=False):
        assert message.payload == payload
        assert dict(message.properties.UserProperty)["content-format"] == number  # type: ignore[union-attr]
    # No Content-Format: raw bytes, and no content-format property claims one.
    assert messages[2].payload == b"\xc3\x28"
    assert "content-format" not in dict(messages[2].properties.UserProperty)  # type: ignore[union-attr]


@pytest.mark.parametrize("content_type", ["text/plain; charset=utf-8", "application/xml"])
async def test_another_content_format_is_415(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post(
        "/telemetry",
        params={"id": NODE},
        content=b"21.5",
        headers=proxied(**{"Content-Type": content_type}),
    )
    assert response.status_code == 415
    assert "JSON (50), CBOR (60) or raw bytes (42)" in response.json()["detail"]


async def test_too_large_is_413_and_no_proxy_token_is_403(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/telemetry", params={"id": NODE}, content=b"x" * 65537, headers=proxied()
    )
    assert response.status_code == 413
    response = await client.post(
        "/telemetry",
        params={"id": NODE},
        content=PAYLOAD,
        headers={"Forwarded": format_forwarded("10.20.0.1", 5000), IDENTITY_HEADER: NODE},
    )
    assert response.status_code == 403
    assert response.json() == {"detail": "missing or invalid proxy token"}


async def test_a_retransmission_on_another_replica_is_published_once(
    mosquitto: MosquittoServer,
    store: MemoryDeviceStore,
    publisher: MqttPublisher,
    redis_server: RedisServer,
) -> None:
    """Two API replicas share the Idempotency-Key ledger in Redis: the same key through either
    is answered 201 both times and published once (docs/CONTRACT.md §11)."""
    ledgers = [build_ledger(redis_server.url, "telemetry") for _ in range(2)]
    apps = [managed_app(mosquitto, store, publisher, ledger) for ledger in ledgers]
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
        for app in apps
    ]
    try:
        async with subscribed(mosquitto.url, TOPIC) as sub:
            for http, ledger in zip(clients, ledgers, strict=True):
                response = await http.post(
                    "/telemetry",
                    params={"id": NODE},
                    content=PAYLOAD,
                    headers=proxied(**JSON_TYPE, **{IDEMPOTENCY_HEADER: "exchange-1"}),
                )
                assert response.status_code == 201, response.text
                # An answer is written with the replica's next claim or a moment later
                # (api/idempotency.py); until then a retransmission is 503 (retried), never
                # published. Written now, so the retransmission finds the answer.
                await ledger.flush()
            # Another exchange is another message: it arrives, and right after the first.
            response = await clients[0].post(
                "/telemetry",
                params={"id": NODE},
                content=b"second",
                headers=proxied(**{IDEMPOTENCY_HEADER: "exchange-2"}),
            )
            assert response.status_code == 201
            first, second = await sub.wait_for(2)
            await sub.assert_silent()
        assert (first.payload, second.payload) == (PAYLOAD, b"second")
    finally:
        for http in clients:
            await http.aclose()
        for ledger in ledgers:
            await ledger.close()


async def test_broker_down_is_503_and_the_retry_is_published(
    client: httpx.AsyncClient, mosquitto: MosquittoServer, publisher: MqttPublisher
) -> None:
    mosquitto.stop()
    for _ in range(100):  # the client notices the closed socket within milliseconds
        if not publisher.connected:
            break
        await asyncio.sleep(0.01)
    key = {IDEMPOTENCY_HEADER: "exchange-down"}
    response = await client.post(
        "/telemetry", params={"id": NODE}, content=PAYLOAD, headers=proxied(**key)
    )
    assert response.status_code == 503
    assert "broker" in response.json()["detail"].lower()
    mosquitto.start()
    async with subscribed(mosquitto.url, TOPIC) as sub:
        # The failed publish released its key: the device's retry goes ahead.
        response = await client.post(
            "/telemetry", params={"id": NODE}, content=PAYLOAD, headers=proxied(**key)
        )
        assert response.status_code == 201, response.text
        [message] = await sub.wait_for(1)
    assert message.payload == PAYLOAD


async def test_a_sim_over_dtls_may_use_telemetry_under_its_iccid(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    async with subscribed(mosquitto.url, f"devices/{SIM}/messages") as sub:
        response = await client.post(
            "/telemetry", params={"id": SIM}, content=PAYLOAD, headers=proxied(SIM)
        )
        assert response.status_code == 201, response.text
        [message] = await sub.wait_for(1)
    props = dict(message.properties.UserProperty)  # type: ignore[union-attr]
    assert (props["iccid"], props["device"]) == (SIM, SIM)


async def test_the_topic_template_may_name_the_device(
    mosquitto: MosquittoServer, store: MemoryDeviceStore, publisher: MqttPublisher
) -> None:
    app = managed_app(mosquitto, store, publisher, topic_template="fleet/{device}/up")
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http,
        subscribed(mosquitto.url, f"fleet/{NODE}/up") as sub,
    ):
        response = await http.post(
            "/telemetry", params={"id": NODE}, content=PAYLOAD, headers=proxied()
        )
        assert response.status_code == 201
        [message] = await sub.wait_for(1)
    assert message.payload == PAYLOAD
