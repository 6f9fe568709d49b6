"""Fixtures for the API tests: an app on a real broker (or none, for endpoints that never
publish) and a real store, served in-process over ASGI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from api.app import create_app
from api.deps import get_now
from api.publisher import MqttPublisher
from api.settings import ApiSettings
from api.store.base import Device, DeviceStore
from api.store.memory import MemoryDeviceStore
from api.store.redis_store import RedisDeviceStore
from policies.forwarding import IDENTITY_HEADER, TOKEN_HEADER, format_forwarded
from policies.keys import psk_channel
from tests.support.http import serve_app
from tests.support.services import MosquittoServer, RedisServer

ACTIVE = "8988280666000000001"
INACTIVE = "8988280666000000002"
ACTIVE_IP = "10.64.0.1"
INACTIVE_IP = "10.64.0.2"
PROXY_TOKEN = "proxy-secret"
API_KEY = "management-secret"
PROXY_HEADERS = {TOKEN_HEADER: PROXY_TOKEN}


def make_settings(mosquitto: MosquittoServer, **overrides: object) -> ApiSettings:
    values: dict[str, object] = {
        "mqtt_url": mosquitto.url,
        "proxy_token": PROXY_TOKEN,
        "api_key": API_KEY,
        "mqtt_publish_timeout": 2.0,
    }
    values.update(overrides)
    return ApiSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def device_store() -> MemoryDeviceStore:
    store = MemoryDeviceStore()
    await store.create(Device(iccid=ACTIVE, ip=ACTIVE_IP, status="active"))
    await store.create(Device(iccid=INACTIVE, ip=INACTIVE_IP, status="inactive"))
    return store


@pytest.fixture
async def publisher(mosquitto: MosquittoServer) -> AsyncIterator[MqttPublisher]:
    mqtt = MqttPublisher.from_settings(make_settings(mosquitto))
    await mqtt.start()
    assert mqtt.connected
    try:
        yield mqtt
    finally:
        await mqtt.close()


@pytest.fixture
async def client(
    mosquitto: MosquittoServer, device_store: MemoryDeviceStore, publisher: MqttPublisher
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(mosquitto), store=device_store, publisher=publisher)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield http


# --- PSK, bootstrap, onboarding and location tests ------------------------------------------
# An app on a real store (memory, or a real redis-server) with a clock the test moves, served
# in process over ASGI from a chosen client address. No broker: these endpoints never publish.

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
COAPS_URL = "coaps://coap.example.com:5684"


class Clock:
    """The app's ``now`` dependency; ``advance`` moves it without sleeping."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    async def __call__(self) -> datetime:
        return self.now


class NoPublisher:
    """For apps whose tests never reach ``/ingest``: publishing would be a bug."""

    connected = False

    async def publish(self, topic: str, payload: bytes, properties: object) -> None:
        raise AssertionError("this endpoint must not publish")

    async def publish_many(self, messages: object) -> list[None]:
        raise AssertionError("this endpoint must not publish")

    async def close(self) -> None:
        return None


def build_app(store: DeviceStore, clock: Clock | None = None, **overrides: object) -> FastAPI:
    values: dict[str, object] = {
        "proxy_token": PROXY_TOKEN,
        "api_key": API_KEY,
        "coaps_url": COAPS_URL,
    }
    values.update(overrides)
    app = create_app(ApiSettings(**values), store=store, publisher=NoPublisher())  # type: ignore[arg-type]
    if clock is not None:
        app.dependency_overrides[get_now] = clock
    return app


def asgi_client(app: FastAPI, client_ip: str = "127.0.0.1") -> httpx.AsyncClient:
    """An HTTP client whose requests reach ``app`` from ``client_ip`` (the TCP peer)."""
    transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://api")


def proxied(ip: str, port: int = 40001, identity: str | None = None) -> dict[str, str]:
    """Headers of a request the proxy forwards for the device at ``ip``."""
    headers = {**PROXY_HEADERS, "Forwarded": format_forwarded(ip, port)}
    if identity is not None:
        headers[IDENTITY_HEADER] = identity
    return headers


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "redis"])
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[DeviceStore]:
    """Each test once on the memory store and once on a real redis-server."""
    if request.param == "memory":
        yield MemoryDeviceStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisDeviceStore.from_url(server.url, prefix=REDIS_PREFIX)
    try:
        yield store
    finally:
        await store.close()


REDIS_PREFIX = "t"


class PskEvents:
    """What the API announced on the PSK channel, seen by a real Redis subscriber."""

    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub

    async def next(self, timeout: float = 2.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            if message is not None:
                data = message["data"]
                return data.decode() if isinstance(data, bytes) else str(data)
        raise AssertionError(f"no PSK change announced within {timeout} s")

    async def assert_silent(self, timeout: float = 0.3) -> None:
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        assert message is None, f"unexpected PSK announcement: {message}"


@contextlib.asynccontextmanager
async def psk_events(redis_url: str, prefix: str = REDIS_PREFIX) -> AsyncIterator[PskEvents]:
    client = Redis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(psk_channel(prefix))
        # The subscription is confirmed before anything under test can publish.
        confirmation = await pubsub.get_message(timeout=2.0)
        assert confirmation is not None
        assert confirmation["type"] == "subscribe"
        yield PskEvents(pubsub)
    finally:
        await pubsub.aclose()
        await client.aclose()


@contextlib.asynccontextmanager
async def real_server(app: FastAPI) -> AsyncIterator[str]:
    """uvicorn on a real socket, with its own X-Forwarded-For handling off (the app decides
    whom to trust: ``trusted_proxy_networks``)."""
    async with serve_app(app, proxy_headers=False) as url:
        yield url
