"""The proxy's metrics listener (proxy/metrics.py, docs/OPERATIONS.md): a real proxy with
``metrics_port``, a real HTTP backend of the test's own, real CoAP datagrams (RawClient), a
real redis-server that the test stops; every scrape parsed with prometheus_client's own
text parser."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import codes
from proxy.coap.codec import ACK, NON
from proxy.server import ListenerError, RunningProxy, start_proxy
from proxy.settings import ProxySettings
from tests.support.coap import RawClient, request_datagram
from tests.support.http import serve_app
from tests.support.services import RedisServer

POLICY = """
[[route]]
path = "/thing"
methods = ["GET", "POST"]
target = "/thing"

[[route]]
path = "/things/{id}"
methods = ["GET"]
target = "/thing"
"""
SETTLE_WITHIN = 10.0


@dataclass
class Rig:
    proxy: RunningProxy
    client: RawClient
    http: httpx.AsyncClient
    mid: int = 100

    async def send(self, code: int, path: str, payload: bytes = b"", mtype: int = 0) -> object:
        self.mid += 1
        datagram = request_datagram(code, self.mid, path, token=b"\x01", payload=payload)
        return await self.client.request(datagram, timeout=5.0)

    async def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Every sample of /metrics: name → sorted labels → value."""
        answer = await self.http.get("/metrics")
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/plain")
        samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples.setdefault(sample.name, {})[labels] = sample.value
        return samples


@pytest.fixture
async def rig(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Rig]:
    async def thing(request: HttpRequest) -> HttpResponse:
        await request.body()
        return HttpResponse(b"ok", status_code=200 if request.method == "GET" else 204)

    async def healthz(request: HttpRequest) -> HttpResponse:
        return HttpResponse(b'{"status": "ok"}', media_type="application/json")

    app = Starlette(
        routes=[Route("/thing", thing, methods=["GET", "POST"]), Route("/healthz", healthz)]
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    # The request log counts answers by route and code at info (its default level).
    requests_log = logging.getLogger("proxy.requests")
    level = requests_log.level
    requests_log.setLevel(logging.INFO)
    try:
        async with serve_app(app) as base_url:
            settings = ProxySettings(
                coap_host="127.0.0.1",
                coap_port=0,
                coaps_port="off",
                upstream=base_url,
                policy=str(policy),
                redis_url=redis_server.url,
                redis_prefix="met",
                metrics_port=0,
                metrics_host="127.0.0.1",
            )
            proxy = await start_proxy(settings)
            assert proxy.metrics is not None
            host, port = proxy.metrics.address
            client = await RawClient.connect(*proxy.address)
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=5) as http:
                try:
                    yield Rig(proxy, client, http)
                finally:
                    await client.aclose()
                    await proxy.close()
    finally:
        requests_log.setLevel(level)


def _value(
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


async def test_counters_move_with_real_coap_traffic(rig: Rig) -> None:
    before = await rig.scrape()
    for _ in range(3):
        reply = await rig.send(codes.POST, "/thing", b"x")
        assert reply.code == codes.CHANGED
    reply = await rig.send(codes.GET, "/things/42")
    assert reply.code == codes.CONTENT
    reply = await rig.send(codes.GET, "/nowhere")
    assert reply.code == codes.NOT_FOUND
    # A retransmission of the last request: answered from the dedup cache, not forwarded.
    rig.client.send(request_datagram(codes.GET, rig.mid, "/nowhere", token=b"\x01"))
    duplicate = await rig.client.recv_message()
    assert (duplicate.mtype, duplicate.mid) == (ACK, rig.mid)
    after = await rig.scrape()

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert grew("coap_bridge_proxy_exchanges_total", transport="coap") == 5
    assert grew("coap_bridge_proxy_duplicates_total", transport="coap", cache="local") == 1
    assert grew("coap_bridge_proxy_requests_total", route="/thing", code="2.04") == 3
    # A template route counts as one route, whatever it names.
    assert grew("coap_bridge_proxy_requests_total", route="/things/{id}", code="2.05") == 1
    assert grew("coap_bridge_proxy_requests_total", route="other", code="4.04") == 1
    # Each forwarded request is one upstream call; the histogram is cumulative.
    calls = grew("coap_bridge_proxy_upstream_request_duration_seconds_count")
    assert calls == 4
    assert _value(
        after, "coap_bridge_proxy_upstream_request_duration_seconds_bucket", le="+Inf"
    ) == (_value(after, "coap_bridge_proxy_upstream_request_duration_seconds_count"))
    assert _value(after, "coap_bridge_proxy_dedup_entries", transport="coap") >= 5
    assert _value(after, "coap_bridge_proxy_dedup_bytes", transport="coap") > 0
    assert _value(after, "coap_bridge_proxy_redis_up") == 1
    assert _value(after, "coap_bridge_proxy_upstream_up") == 1


async def test_health_and_readiness(rig: Rig) -> None:
    live = await rig.http.get("/healthz")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    ready = await rig.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "accepting": True,
        "upstream": "reachable",
        "redis": "reachable",
    }
    head = await rig.http.head("/readyz")
    assert (head.status_code, head.content) == (200, b"")
    assert (await rig.http.get("/nope")).status_code == 404
    assert (await rig.http.post("/metrics")).status_code == 405


async def _until(http: httpx.AsyncClient, status: int) -> dict[str, object]:
    deadline = time.monotonic() + SETTLE_WITHIN
    while True:
        ready = await http.get("/readyz")
        assert (await http.get("/healthz")).status_code == 200
        if ready.status_code == status:
            body: dict[str, object] = ready.json()
            return body
        assert time.monotonic() < deadline, f"/readyz still {ready.status_code}: {ready.text}"
        await asyncio.sleep(0.1)


async def test_readiness_flips_while_redis_is_stopped(rig: Rig, redis_server: RedisServer) -> None:
    await _until(rig.http, 200)
    redis_server.stop()
    body = await _until(rig.http, 503)
    assert body == {
        "status": "unready",
        "accepting": True,
        "upstream": "reachable",
        "redis": "unreachable",
    }
    samples = await rig.scrape()
    assert _value(samples, "coap_bridge_proxy_redis_up") == 0
    assert _value(samples, "coap_bridge_proxy_ready") == 0
    # Devices are still served meanwhile (local dedup only, proxy/gate.py).
    reply = await rig.send(codes.POST, "/thing", b"x")
    assert reply.code == codes.CHANGED
    redis_server.start()
    assert (await _until(rig.http, 200))["redis"] == "reachable"


async def test_unready_once_draining(rig: Rig) -> None:
    await _until(rig.http, 200)
    rig.proxy.stop_accepting()
    body = await _until(rig.http, 503)
    assert body["accepting"] is False
    assert (await rig.http.get("/healthz")).status_code == 200


async def test_no_listener_by_default_and_a_taken_port_is_named(rig: Rig) -> None:
    settings = ProxySettings(coap_host="127.0.0.1", coap_port=0, coaps_port="off")
    assert settings.metrics_port is None
    assert ProxySettings(metrics_port="off").metrics_port is None
    _, taken = rig.proxy.metrics.address if rig.proxy.metrics is not None else ("", 0)
    busy = ProxySettings(coap_host="127.0.0.1", coap_port=0, coaps_port="off", metrics_port=taken)
    with pytest.raises(ListenerError) as caught:
        await start_proxy(busy)
    assert caught.value.listener == "metrics HTTP"
    assert caught.value.setting == "metrics_port"
    assert "address already in use" in str(caught.value)


async def test_a_non_request_is_not_counted_as_one(rig: Rig) -> None:
    before = await rig.scrape()
    rig.client.send(b"\x40")  # too short for a CoAP header: a format error (RFC 7252 §3)
    rig.client.send(request_datagram(codes.POST, 7, "/thing", payload=b"x", mtype=NON))
    await asyncio.sleep(0.2)
    after = await rig.scrape()
    assert (
        _value(after, "coap_bridge_proxy_format_errors_total", transport="coap")
        - _value(before, "coap_bridge_proxy_format_errors_total", transport="coap")
        == 1
    )


def test_each_worker_gets_its_own_metrics_port() -> None:
    from proxy.metrics import worker_metrics

    assert worker_metrics({"metrics_port": "9464"}, 2)["metrics_port"] == 9466
    assert worker_metrics({"metrics_port": "0"}, 2)["metrics_port"] == "0"
    assert "metrics_port" not in worker_metrics({}, 3)
