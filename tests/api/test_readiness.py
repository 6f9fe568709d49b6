"""Liveness and readiness (issue 12, item 14): ``/readyz`` is 503 while the MQTT broker or the
device store (Redis) cannot be reached, and says which; ``/healthz`` stays 200 throughout.

A real uvicorn server with the app's own publisher and Redis store, against a real mosquitto
and a real redis-server that the tests stop, pause and start again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api.app import create_app
from tests.api.conftest import make_settings, real_server
from tests.support.services import MosquittoServer, RedisServer

SETTLE_WITHIN = 10.0  # seconds for the publisher to notice a broker going or coming back


@pytest.fixture
async def api(
    mosquitto: MosquittoServer, redis_server: RedisServer
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(mosquitto, redis_url=redis_server.url, redis_prefix="rdy"))
    async with real_server(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as client:
        await _until(client, 200)
        yield client


async def _until(client: httpx.AsyncClient, status: int) -> dict[str, Any]:
    """The /readyz answer once it has ``status`` (liveness checked on every round)."""
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        ready = await client.get("/readyz")
        live = await client.get("/healthz")
        assert live.status_code == 200, live.text
        if ready.status_code == status:
            body: dict[str, Any] = ready.json()
            return body
        assert time.monotonic() < deadline, f"/readyz still {ready.status_code}: {ready.text}"
        await asyncio.sleep(0.05)


async def test_ready_when_broker_and_store_answer(api: httpx.AsyncClient) -> None:
    assert await _until(api, 200) == {
        "status": "ready",
        "mqtt": "connected",
        "store": "reachable",
        "store_kind": "redis",
    }


async def test_unready_while_the_broker_is_down(
    api: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    mosquitto.stop()
    body = await _until(api, 503)
    assert body == {
        "status": "unready",
        "mqtt": "disconnected",
        "store": "reachable",
        "store_kind": "redis",
    }
    mosquitto.start()
    assert (await _until(api, 200))["mqtt"] == "connected"


async def test_unready_while_the_store_is_down(
    api: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    redis_server.stop()
    body = await _until(api, 503)
    assert body["store"] == "unreachable"
    assert body["mqtt"] == "connected"
    redis_server.start()
    assert (await _until(api, 200))["store"] == "reachable"


async def test_a_hung_store_makes_readiness_503_not_a_hung_probe(
    api: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    redis_server.pause()
    try:
        body = await _until(api, 503)  # each probe ends after READINESS_TIMEOUT
        assert body["store"] == "unreachable"
    finally:
        redis_server.resume()
    await _until(api, 200)


async def test_liveness_keeps_its_answer(api: httpx.AsyncClient) -> None:
    live = await api.get("/healthz")
    assert live.status_code == 200
    assert live.json() == {"status": "ok", "mqtt": "connected", "store": "redis"}
