"""The proxy's batch call served before FastAPI's router (api/fast_path.py): what it takes, what
it leaves to the route, and the oracle — the same batches through the fast path and through the
route give byte-identical answers and the same MQTT publishes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiomqtt
import httpx
from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from api.app import create_app
from api.deps import get_now
from api.publisher import MqttPublisher
from api.routes.ingest import MAX_BATCH_ITEMS
from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from policies.batch import BatchItem, encode_batch
from stores.templates import StoredTemplate
from tests.api.conftest import ACTIVE, ACTIVE_IP, INACTIVE, INACTIVE_IP, make_settings
from tests.api.test_ingest_batch import BATCH_HEADERS, item
from tests.api.test_templates_api import PAYLOAD, TRACKER
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer


class Witness:
    """Innermost middleware: records what the fast path passed on to the router."""

    def __init__(self, inner: ASGIApp, reached: list[str]) -> None:
        self.inner = inner
        self.reached = reached

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.reached.append(scope["path"])
        await self.inner(scope, receive, send)


def _witnessed(app: FastAPI) -> list[str]:
    reached: list[str] = []
    app.user_middleware.append(Middleware(Witness, reached=reached))
    return reached


async def test_the_fast_path_answers_the_proxy_before_the_router(
    mosquitto: MosquittoServer, device_store: MemoryDeviceStore, publisher: MqttPublisher
) -> None:
    app = create_app(make_settings(mosquitto), store=device_store, publisher=publisher)
    reached_router = _witnessed(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        ok = await c.post("/ingest/batch", content=encode_batch([item()]), headers=BATCH_HEADERS)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"statuses": [204]}
        assert reached_router == []
        # What it leaves to the route (here: a chunked body, no declared length) is answered
        # there. (A call without the token never gets this far: api/guard.py answers 403.)
        body = encode_batch([item()])

        async def chunked() -> AsyncIterator[bytes]:
            yield body

        routed = await c.post("/ingest/batch", content=chunked(), headers=BATCH_HEADERS)
        assert routed.status_code == 200, routed.text
        assert routed.json() == {"statuses": [204]}
        assert reached_router == ["/ingest/batch"]


async def test_overridden_dependencies_do_not_switch_it_off(
    mosquitto: MosquittoServer, device_store: MemoryDeviceStore, publisher: MqttPublisher
) -> None:
    # Production never overrides a dependency; a test that does (the clock, here) must still
    # run the code production runs.
    app = create_app(make_settings(mosquitto), store=device_store, publisher=publisher)
    app.dependency_overrides[get_now] = get_now
    reached_router = _witnessed(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        ok = await c.post("/ingest/batch", content=encode_batch([item()]), headers=BATCH_HEADERS)
    assert ok.json() == {"statuses": [204]}
    assert reached_router == []


# -- the oracle ---------------------------------------------------------------------------------

_ORACLE_TOPICS = (f"devices/{ACTIVE}/messages", "oracle/#")


def _oracle_item(key: str, **fields: object) -> BatchItem:
    values: dict[str, object] = {
        "ip": ACTIVE_IP,
        "topic": "",
        "payload": b"p",
        "identity": "",
        "idempotency_key": key,
        "content_format": None,
    }
    values.update(fields)
    return item(**values)  # type: ignore[arg-type]


_TEMPLATED = "8988280666000000009"
_TEMPLATED_IP = "10.64.0.9"
_TEMPLATE_ID = "oracle-tpl"

# (body, expected statuses or the error status): every outcome an item or a call can have
# without the broker failing. Each app gets a fresh store and ledger, so the keys repeat.
_REPLAYED = _oracle_item("o-replayed", topic="oracle/replayed", payload=b"once")
ORACLE_CALLS: list[tuple[bytes, object]] = [
    (
        encode_batch(
            [
                _oracle_item("o-1", payload=b"default topic"),
                _oracle_item("o-2", topic="oracle/cf", payload=b"\x00cf\xff", content_format=42),
                _oracle_item("o-3", ip="10.99.0.9"),  # unknown device
                _oracle_item("o-4", ip=INACTIVE_IP),
                _oracle_item("o-5", payload=b"x" * 70000),  # over max_payload
                _oracle_item("o-6", ip="10.99.0.8", identity=ACTIVE, topic="oracle/dtls"),
                _oracle_item("o-7", ip="10.99.0.7", identity=INACTIVE, topic="oracle/no"),
                _oracle_item("", topic="oracle/keyless", payload=b"no key"),
            ]
        ),
        [204, 204, 401, 401, 413, 204, 401, 204],
    ),
    (encode_batch([_REPLAYED]), [204]),
    (encode_batch([_REPLAYED, _oracle_item("o-8", topic="oracle/after")]), [204, 204]),
    # A device with a payload template (issue 17): translated, refused when too short.
    (
        encode_batch(
            [
                _oracle_item("o-t1", ip=_TEMPLATED_IP, topic="oracle/tpl", payload=PAYLOAD),
                _oracle_item("o-t2", ip=_TEMPLATED_IP, topic="oracle/tpl", payload=PAYLOAD[:5]),
                _oracle_item(
                    "o-t3",
                    ip="10.99.0.6",
                    identity=_TEMPLATED,
                    topic="oracle/t3",
                    payload=PAYLOAD * 2,
                ),
            ]
        ),
        [204, 400, 204],
    ),
    (encode_batch([]), []),
    (b"\x00\x05ab", 400),  # truncated: the error body comes from the error handler
    (encode_batch([_oracle_item(f"o-many-{n}") for n in range(MAX_BATCH_ITEMS + 1)]), 400),
]
# What the broker must get for the calls above, in either app: the 204s but the replay.
ORACLE_PUBLISHES = 8


def _publish(message: aiomqtt.Message) -> tuple[object, ...]:
    """A publish as the subscriber saw it, but the arrival time the API stamps on each."""
    properties = message.properties.json() if message.properties is not None else {}
    users = [p for p in properties.pop("UserProperty", []) if p[0] != "received-at"]
    return (
        str(message.topic),
        message.payload,
        message.qos,
        message.retain,
        sorted(properties.items()),
        users,
    )


async def _through(
    app: FastAPI, mosquitto: MosquittoServer
) -> tuple[list[tuple[int, list[tuple[bytes, bytes]], bytes]], list[tuple[object, ...]]]:
    """Every call of :data:`ORACLE_CALLS` through ``app``: the raw answers and the publishes."""
    answers = []
    async with (
        subscribed(mosquitto.url, _ORACLE_TOPICS[0]) as default,
        subscribed(mosquitto.url, _ORACLE_TOPICS[1]) as named,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as http,
    ):
        for body, _expected in ORACLE_CALLS:
            answer = await http.post("/ingest/batch", content=body, headers=BATCH_HEADERS)
            answers.append((answer.status_code, answer.headers.raw, answer.content))
        await asyncio.sleep(0.5)  # a publish is acknowledged before its 204: only delivery lags
        published = default.messages + named.messages
    return answers, sorted((_publish(m) for m in published), key=repr)


async def _oracle_store() -> MemoryDeviceStore:
    store = MemoryDeviceStore()
    await store.create(Device(iccid=ACTIVE, ip=ACTIVE_IP, status="active"))
    await store.create(Device(iccid=INACTIVE, ip=INACTIVE_IP, status="inactive"))
    await store.create(Device(iccid=_TEMPLATED, ip=_TEMPLATED_IP, template=_TEMPLATE_ID))
    return store


async def _with_template(app: FastAPI) -> FastAPI:
    record = StoredTemplate(_TEMPLATE_ID, json.dumps(TRACKER), None, 1.0)
    await app.state.templates.store.create(record)
    return app


async def test_the_fast_path_answers_exactly_as_the_route(
    mosquitto: MosquittoServer, publisher: MqttPublisher
) -> None:
    settings = make_settings(mosquitto)
    fast_app = await _with_template(
        create_app(settings, store=await _oracle_store(), publisher=publisher)
    )
    route_app = await _with_template(
        create_app(settings, store=await _oracle_store(), publisher=publisher, fast_path=False)
    )
    reached_router = _witnessed(fast_app)
    fast, fast_published = await _through(fast_app, mosquitto)
    assert reached_router == []  # the oracle compares two paths, not one path twice
    route, route_published = await _through(route_app, mosquitto)
    for (body, expected), by_fast, by_route in zip(ORACLE_CALLS, fast, route, strict=True):
        assert by_fast == by_route, f"{len(body)}-byte batch: fast path and route differ"
        status, _headers, content = by_fast
        if isinstance(expected, int):
            assert status == expected, content
        else:
            assert (status, httpx.Response(status, content=content).json()) == (
                200,
                {"statuses": expected},
            )
    assert fast_published == route_published
    assert len(fast_published) == ORACLE_PUBLISHES
