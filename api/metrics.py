"""Prometheus metrics of the API: ``GET /metrics`` (docs/OPERATIONS.md).

What is measured, and where:

- every MQTT publish, by outcome, its latency and how many messages went in one call (the
  telemetry path publishes one batch per ``/ingest/batch``): :class:`MeteredPublisher`
  around the app's publisher, one clock read and a few integer updates per *call*, never per
  message;
- the broker connection and the device store, read when a scrape asks (the store answers
  the same lookup as ``/readyz``).

The open question was who may scrape. Prometheus servers are usually configured without a
bearer token, and nothing here names a device or a key, so ``/metrics`` is open like
``/healthz`` (api/guard.py lists it); put it behind the network policy that guards the API's
port, or off the public listener, where that matters.

Each uvicorn worker (``coap-bridge api --workers N``) is its own process with its own
counters, and they share one port: a scrape reads whichever worker accepted it. Scrape a
single-worker API (scale with replicas, each its own target) when the counters matter.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from api.errors import BrokerUnavailable
from api.publisher import Publisher

# A publish to a broker on the same host takes about a millisecond; the publisher waits at
# most its publish timeout (a few seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Messages in one publish call: the proxy's max_batch is at most 1024 (api/routes/ingest.py).
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _Histogram:
    """Plain integer buckets: the API runs on one event loop, an update needs no lock."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative: list[tuple[str, float]] = []
        seen = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            seen += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), seen))
        cumulative.append(("+Inf", seen + self.counts[-1]))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.total)


class PublishStats:
    def __init__(self) -> None:
        self.published = 0
        self.failed = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.sizes = _Histogram(SIZE_BUCKETS)

    def record(self, seconds: float, messages: int, failed: int) -> None:
        self.published += messages - failed
        self.failed += failed
        self.latency.observe(seconds)
        self.sizes.observe(messages)


class MeteredPublisher:
    """The app's publisher, with each call counted. Everything else (``subscribe``, ``start``)
    is the wrapped publisher's own: ``inner`` is what code that needs the concrete class
    (the MQTT command intake) uses."""

    def __init__(self, inner: Publisher, stats: PublishStats) -> None:
        self.inner = inner
        self.stats = stats
        self._clock = asyncio.get_running_loop().time

    @property
    def connected(self) -> bool:
        return self.inner.connected

    async def publish(
        self, topic: str, payload: bytes, properties: Mapping[str, str], *, retain: bool = False
    ) -> None:
        started = self._clock()
        try:
            await self.inner.publish(topic, payload, properties, retain=retain)
        except BrokerUnavailable:
            self.stats.record(self._clock() - started, 1, 1)
            raise
        self.stats.record(self._clock() - started, 1, 0)

    async def publish_many(
        self,
        messages: Sequence[tuple[str, bytes, Mapping[str, str]]],
        within: float | None = None,
        retain: bool = False,
    ) -> list[BrokerUnavailable | None]:
        if not messages:
            return []
        started = self._clock()
        inner: Any = self.inner  # MqttPublisher takes ``retain``; the Protocol does not
        if retain:
            results: list[BrokerUnavailable | None] = await inner.publish_many(
                messages, within, retain=True
            )
        else:
            results = await inner.publish_many(messages, within)
        failed = sum(1 for result in results if result is not None)
        self.stats.record(self._clock() - started, len(messages), failed)
        return results

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ApiCollector(Collector):
    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self.store_up: bool | None = None

    def collect(self) -> Iterator[Metric]:
        state = self._app.state
        stats: PublishStats = state.publish_stats
        publishes = CounterMetricFamily(
            "coap_bridge_api_publishes",
            "MQTT PUBLISHes (QoS 1) by outcome: published (PUBACK received) or failed (no "
            "connection, no PUBACK in time, or a PUBACK reason code of 0x80 or more)",
            labels=["outcome"],
        )
        publishes.add_metric(["published"], stats.published)
        publishes.add_metric(["failed"], stats.failed)
        yield publishes
        yield stats.latency.family(
            "coap_bridge_api_publish_duration_seconds",
            "One publish call, from the first PUBLISH to the last PUBACK (a batch counts once)",
        )
        yield stats.sizes.family(
            "coap_bridge_api_publish_batch_messages",
            "Messages in one publish call: for telemetry, the items of an /ingest/batch that "
            "needed publishing",
        )
        publisher: Publisher | None = state.publisher
        connected = GaugeMetricFamily(
            "coap_bridge_api_mqtt_connected", "1 while the MQTT connection to the broker is up"
        )
        connected.add_metric([], 1 if publisher is not None and publisher.connected else 0)
        yield connected
        if self.store_up is not None:
            store = GaugeMetricFamily(
                "coap_bridge_api_store_up",
                "1 when the device store answered a lookup at this scrape (as /readyz asks)",
                labels=["kind"],
            )
            kind = state.store.kind if state.store is not None else "none"
            store.add_metric([kind], 1 if self.store_up else 0)
            yield store


def install(app: FastAPI, store_reachable: Callable[[Any], Awaitable[bool]]) -> None:
    """Declare ``GET /metrics`` on ``app`` (its registry of its own: several apps in one
    process, as in the tests, never share counters). ``store_reachable``: the readiness
    lookup of the device store."""
    app.state.publish_stats = PublishStats()
    registry = CollectorRegistry(auto_describe=False)
    collector = ApiCollector(app)
    registry.register(collector)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics (text exposition format)",
        description="Open like `/healthz` (no device data in it): publishes by outcome, "
        "publish latency, messages per publish call, broker connection, device store. "
        "docs/OPERATIONS.md lists every metric.",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics(request: Request) -> Response:
        collector.store_up = await store_reachable(request.app.state.store)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def metered(app: FastAPI) -> None:
    """Count the publishes of the app's publisher from now on (the lifespan calls it once the
    publisher is built)."""
    publisher = app.state.publisher
    if publisher is not None and not isinstance(publisher, MeteredPublisher):
        app.state.publisher = MeteredPublisher(publisher, app.state.publish_stats)
