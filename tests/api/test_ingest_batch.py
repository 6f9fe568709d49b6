"""POST /ingest/batch against a real mosquitto: per-item statuses, exactly what /ingest says."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest

from api.app import create_app
from api.publisher import MqttPublisher, pack_user_properties
from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from policies.batch import BATCH_CONTENT_TYPE, BatchItem, encode_batch
from policies.forwarding import format_forwarded
from tests.api.conftest import ACTIVE, ACTIVE_IP, INACTIVE_IP, PROXY_HEADERS, make_settings
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer

BATCH_HEADERS = {**PROXY_HEADERS, "Content-Type": BATCH_CONTENT_TYPE}


_keys = itertools.count()


def item(
    ip: str = ACTIVE_IP,
    topic: str = "",
    payload: bytes = b"p",
    identity: str = "",
    idempotency_key: str | None = None,
    content_format: int | None = None,
) -> BatchItem:
    key = f"coap:{ip}:40000:{next(_keys)}:aa" if idempotency_key is None else idempotency_key
    return BatchItem(ip, 40000, "coap", identity, key, topic, content_format, payload)


@pytest.fixture
async def client(
    mosquitto: MosquittoServer, device_store: MemoryDeviceStore, publisher: MqttPublisher
) -> AsyncIterator[httpx.AsyncClient]:
    """The app as production runs it: the proxy's calls take the fast path (api/fast_path.py);
    tests/api/test_fast_path.py holds it to the route's answers."""
    app = create_app(make_settings(mosquitto), store=device_store, publisher=publisher)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield http


async def test_each_item_gets_the_status_the_single_form_would_give(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    # A bad topic or address cannot reach this route: the proxy checks the topic and writes
    # the address (policies/batch.py; tests/proxy/test_forwarding.py).
    items = [
        item(payload=b"one"),
        item(topic="batch/two", payload=b"\x00two\xff", content_format=42),
        item(ip="10.99.0.9"),  # unknown device
        item(ip=INACTIVE_IP),
        item(payload=b"x" * 70000),
        item(identity=ACTIVE, ip="10.99.0.8", topic="batch/dtls", payload=b"by identity"),
    ]
    async with (
        subscribed(mosquitto.url, f"devices/{ACTIVE}/messages") as default,
        subscribed(mosquitto.url, "batch/#") as named,
    ):
        response = await client.post(
            "/ingest/batch", content=encode_batch(items), headers=BATCH_HEADERS
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"statuses": [204, 204, 401, 401, 413, 204]}
        assert "retry-after" not in response.headers
        [first] = await default.wait_for(1)
        published = await named.wait_for(2)
        await default.assert_silent(0.3)
        await named.assert_silent(0.1)
    assert first.payload == b"one"
    assert {(str(m.topic), m.payload) for m in published} == {
        ("batch/two", b"\x00two\xff"),
        ("batch/dtls", b"by identity"),
    }
    # The same user properties as /ingest gives (docs/CONTRACT.md §9).
    two = next(m for m in published if str(m.topic) == "batch/two")
    assert two.properties is not None
    properties = dict(two.properties.UserProperty)
    assert properties["iccid"] == ACTIVE
    assert properties["source"] == f"{ACTIVE_IP}:40000"
    assert properties["content-format"] == "42"
    assert list(properties) == ["iccid", "device", "source", "content-format", "received-at"]


async def test_invalid_body_and_missing_token(client: httpx.AsyncClient) -> None:
    bad = await client.post("/ingest/batch", content=b"\x00\x05ab", headers=BATCH_HEADERS)
    assert bad.status_code == 400
    assert "truncated" in bad.json()["detail"] or "runs past" in bad.json()["detail"]
    forbidden = await client.post("/ingest/batch", content=encode_batch([item()]))
    assert forbidden.status_code == 403


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("application/vnd.coap-bridge.batch", id="the-first-layout"),
        pytest.param("application/vnd.coap-bridge.batch; v=3", id="a-later-layout"),
        pytest.param(None, id="none"),
    ],
)
async def test_a_batch_in_another_layout_is_415_not_a_garbled_decode(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    # A proxy and an API of different releases during a rolling upgrade: the whole batch is
    # refused with a message saying so (the proxy answers its devices 5.02 and logs the 415).
    headers = dict(PROXY_HEADERS)
    if content_type is not None:
        headers["Content-Type"] = content_type
    answer = await client.post("/ingest/batch", content=encode_batch([item()]), headers=headers)
    assert answer.status_code == 415
    assert "same release" in answer.json()["detail"]


async def test_broker_hung_makes_items_503_with_retry_after(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    mosquitto.pause()
    try:
        response = await client.post(
            "/ingest/batch",
            content=encode_batch([item(), item(ip="10.99.0.9")]),
            headers=BATCH_HEADERS,
        )
    finally:
        mosquitto.resume()
    assert response.status_code == 200
    assert response.json() == {"statuses": [503, 401]}
    assert response.headers["retry-after"] == "1"


def test_packed_user_properties_are_byte_identical_to_paho() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    values = {"iccid": "8988280666000000001", "source": "[::1]:5683", "ä": "x" * 300}
    reference = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    reference.UserProperty = list(values.items())
    assert pack_user_properties(values) == reference.pack()  # type: ignore[no-untyped-call]
    assert pack_user_properties({}) == b"\x00"


async def test_an_idempotency_key_is_published_once_whatever_the_form(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    # A proxy replica died after forwarding; the retransmission comes back through another
    # replica with the same key, in a batch or alone: 204 again, no second message.
    again = item(topic="idem/x", payload=b"once", idempotency_key="coap:10.64.0.1:7:7:07")
    async with subscribed(mosquitto.url, "idem/#") as sub:
        for _ in range(2):
            response = await client.post(
                "/ingest/batch", content=encode_batch([again]), headers=BATCH_HEADERS
            )
            assert response.json() == {"statuses": [204]}
        single = await client.post(
            "/ingest?t=idem/x",
            content=b"once",
            headers={
                **PROXY_HEADERS,
                "Forwarded": format_forwarded(again.ip, again.port),
                "Idempotency-Key": again.idempotency_key,
            },
        )
        assert single.status_code == 204
        [message] = await sub.wait_for(1)
        await sub.assert_silent(0.5)
    assert message.payload == b"once"


async def test_a_failed_publish_releases_its_key_for_the_retry(
    client: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    retry = item(topic="idem/retry", payload=b"late", idempotency_key="coap:10.64.0.1:8:8:08")
    mosquitto.pause()
    try:
        failed = await client.post(
            "/ingest/batch", content=encode_batch([retry]), headers=BATCH_HEADERS
        )
    finally:
        mosquitto.resume()
    assert failed.json() == {"statuses": [503]}
    async with subscribed(mosquitto.url, "idem/#") as sub:
        ok = await client.post(
            "/ingest/batch", content=encode_batch([retry]), headers=BATCH_HEADERS
        )
        assert ok.json() == {"statuses": [204]}
        [message] = await sub.wait_for(1)
    assert message.payload == b"late"


async def test_a_refused_item_gives_its_key_back(
    client: httpx.AsyncClient, mosquitto: MosquittoServer, device_store
) -> None:
    # Refused because the device is unknown; registered a moment later, its retry (same key)
    # must go through at once rather than wait out the claim's lease.
    from api.store.base import Device

    early = item(ip="10.64.9.9", topic="idem/late", payload=b"retry", idempotency_key="k-late")
    first = await client.post("/ingest/batch", content=encode_batch([early]), headers=BATCH_HEADERS)
    assert first.json() == {"statuses": [401]}
    await device_store.create(Device(iccid="8988280666000000099", ip="10.64.9.9", status="active"))
    async with subscribed(mosquitto.url, "idem/#") as sub:
        again = await client.post(
            "/ingest/batch", content=encode_batch([early]), headers=BATCH_HEADERS
        )
        assert again.json() == {"statuses": [204]}
        [message] = await sub.wait_for(1)
    assert message.payload == b"retry"


class CountingStore(MemoryDeviceStore):
    """The real in-memory store, counting the lookups the batch route makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def get(self, iccid: str) -> Device | None:
        self.calls.append("get")
        return await super().get(iccid)

    async def get_by_ip(self, ip: str) -> Device | None:
        self.calls.append("get_by_ip")
        return await super().get_by_ip(ip)

    async def get_many(self, iccids: Sequence[str]) -> list[Device | None]:
        self.calls.append("get_many")
        return [self._devices.get(iccid) for iccid in iccids]

    async def get_many_by_ip(self, ips: Sequence[str]) -> list[Device | None]:
        self.calls.append("get_many_by_ip")
        return [await super(CountingStore, self).get_by_ip(ip) for ip in ips]


async def test_a_batch_from_many_devices_looks_them_up_together(
    mosquitto: MosquittoServer, publisher: MqttPublisher
) -> None:
    # Each device its own address (the usual case): one lookup call for the whole batch, not
    # one (two Redis round trips) per device one after another.
    store = CountingStore()
    iccids = [f"89882806660001{n:05d}" for n in range(40)]
    for n, iccid in enumerate(iccids):
        await store.create(Device(iccid=iccid, ip=f"10.70.0.{n + 1}", status="active"))
    await store.create(Device(iccid="8988280666000200001", ip="10.70.1.1", status="inactive"))
    items = [item(ip=f"10.70.0.{n + 1}", topic=f"many/{n}") for n in range(40)]
    items += [
        item(ip="10.70.1.1"),  # inactive
        item(ip="10.70.9.9"),  # unknown
        item(identity=iccids[3], ip="10.99.0.1", topic="many/dtls"),
    ]
    app = create_app(make_settings(mosquitto), store=store, publisher=publisher)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
        subscribed(mosquitto.url, "many/#") as sub,
    ):
        response = await client.post(
            "/ingest/batch", content=encode_batch(items), headers=BATCH_HEADERS
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"statuses": [204] * 40 + [401, 401, 204]}
        received = await sub.wait_for(41)
    assert sorted(store.calls) == ["get_many", "get_many_by_ip"]
    by_topic = {str(m.topic): m for m in received}
    assert by_topic["many/7"].properties is not None
    assert dict(by_topic["many/7"].properties.UserProperty)["iccid"] == iccids[7]
    assert dict(by_topic["many/dtls"].properties.UserProperty)["iccid"] == iccids[3]
