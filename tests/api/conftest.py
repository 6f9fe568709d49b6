"""Fixtures for the API tests: an app on a real broker, served in-process over ASGI."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from api.app import create_app
from api.publisher import MqttPublisher
from api.settings import ApiSettings
from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from policies.forwarding import TOKEN_HEADER
from tests.support.services import MosquittoServer

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
