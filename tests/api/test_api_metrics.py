"""The API's ``GET /metrics`` (api/metrics.py, docs/OPERATIONS.md): a real uvicorn server with
its own publisher and Redis store, a real mosquitto and redis-server that the tests stop;
every scrape parsed with prometheus_client's text parser, without a bearer (open, like
/healthz)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from policies.forwarding import format_forwarded
from tests.api.conftest import ACTIVE, ACTIVE_IP, AUTH, PROXY_HEADERS, make_settings, real_server
from tests.support.services import MosquittoServer, RedisServer

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
SETTLE_WITHIN = 10.0


@pytest.fixture
async def api(
    mosquitto: MosquittoServer, redis_server: RedisServer
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(mosquitto, redis_url=redis_server.url, redis_prefix="met"))
    async with real_server(app) as url, httpx.AsyncClient(base_url=url, timeout=5) as client:
        created = await client.post(
            "/devices", json={"iccid": ACTIVE, "ip": ACTIVE_IP, "status": "active"}, headers=AUTH
        )
        assert created.status_code == 201, created.text
        await _until(client, lambda s: _value(s, "coap_bridge_api_mqtt_connected") == 1)
        yield client


async def _scrape(client: httpx.AsyncClient) -> Samples:
    answer = await client.get("/metrics")  # no Authorization header
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


async def _until(client: httpx.AsyncClient, check: object) -> Samples:
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        samples = await _scrape(client)
        if check(samples):  # type: ignore[operator]
            return samples
        assert time.monotonic() < deadline, "metrics did not settle"
        await asyncio.sleep(0.1)


async def _ingest(client: httpx.AsyncClient) -> int:
    headers = {**PROXY_HEADERS, "Forwarded": format_forwarded(ACTIVE_IP, 40001)}
    answer = await client.post("/ingest", content=b"21.5", headers=headers)
    return answer.status_code


async def test_publishes_are_counted_by_outcome(
    api: httpx.AsyncClient, mosquitto: MosquittoServer
) -> None:
    before = await _scrape(api)
    assert await _ingest(api) == 204
    assert await _ingest(api) == 204
    after = await _scrape(api)

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert grew("coap_bridge_api_publishes_total", outcome="published") == 2
    assert grew("coap_bridge_api_publishes_total", outcome="failed") == 0
    assert grew("coap_bridge_api_publish_duration_seconds_count") == 2
    assert grew("coap_bridge_api_publish_batch_messages_bucket", le="1.0") == 2
    assert _value(after, "coap_bridge_api_store_up", kind="redis") == 1

    mosquitto.stop()
    down = await _until(api, lambda s: _value(s, "coap_bridge_api_mqtt_connected") == 0)
    assert await _ingest(api) == 503
    failed = await _scrape(api)
    assert (
        _value(failed, "coap_bridge_api_publishes_total", outcome="failed")
        - _value(down, "coap_bridge_api_publishes_total", outcome="failed")
        == 1
    )
    mosquitto.start()
    await _until(api, lambda s: _value(s, "coap_bridge_api_mqtt_connected") == 1)


async def test_store_up_follows_redis(api: httpx.AsyncClient, redis_server: RedisServer) -> None:
    await _until(api, lambda s: _value(s, "coap_bridge_api_store_up", kind="redis") == 1)
    redis_server.stop()
    await _until(api, lambda s: _value(s, "coap_bridge_api_store_up", kind="redis") == 0)
    redis_server.start()
    await _until(api, lambda s: _value(s, "coap_bridge_api_store_up", kind="redis") == 1)


async def test_metrics_is_listed_open_in_the_guard() -> None:
    from api.guard import Caller, rule_for

    assert rule_for("/metrics").caller is Caller.ANYONE
