"""Fixtures for the API tests: an app on a real broker (or none, for endpoints that never
publish) and a real store, served in-process over ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
from stores.keys import psk_channel
from tests.support.http import free_port, serve_app
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

    async def publish_many(self, messages: object, within: float | None = None) -> list[None]:
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


# --- the API as a separate process ----------------------------------------------------------
# For requests that might hold the server's event loop (or its core) for good: the test keeps
# its own loop and its timeouts, and a stuck server is killed and started again.


class ApiProcess:
    """``uvicorn --factory api.app:create_app_from_env`` on a free port: memory store, the
    test broker, the keys of this package's tests."""

    def __init__(self, mqtt_url: str, log_path: Path) -> None:
        self.mqtt_url = mqtt_url
        self.log_path = log_path
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def start(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")} | {
            "COAP_BRIDGE_API_KEY": API_KEY,
            "COAP_BRIDGE_PROXY_TOKEN": PROXY_TOKEN,
            "COAP_BRIDGE_MQTT_URL": self.mqtt_url,
            "COAP_BRIDGE_COAPS_URL": COAPS_URL,
        }
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable, "-m", "uvicorn", "api.app:create_app_from_env", "--factory",
                    "--host", "127.0.0.1", "--port", str(self.port), "--no-proxy-headers",
                    "--log-level", "warning",
                ],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.responsive():
            assert self._process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=5) as http:
            created = http.post("/devices", json={"iccid": ACTIVE, "ip": "127.0.0.1"})
            assert created.status_code == 201, created.text

    def responsive(self, timeout: float = 2.0) -> bool:
        """True when ``/healthz`` answers within ``timeout`` seconds."""
        try:
            return httpx.get(f"{self.url}/healthz", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()  # a process stuck in one computation ignores this: then SIGKILL
        try:
            process.wait(3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart_if_stuck(self) -> None:
        if self._process is None or not self.responsive():
            self.stop()
            self.start()


@pytest.fixture(scope="module")
def _api_process(
    _mosquitto_process: MosquittoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    server = ApiProcess(_mosquitto_process.url, tmp_path_factory.mktemp("api") / "api.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api_process(_api_process: ApiProcess, mosquitto: MosquittoServer) -> ApiProcess:
    """The module's API process, started again if an earlier test left it stuck."""
    _api_process.restart_if_stuck()
    return _api_process
