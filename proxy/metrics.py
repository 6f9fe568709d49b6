"""Prometheus metrics and health probes of the proxy, on a small HTTP listener of its own.

The proxy speaks CoAP over UDP, which an orchestrator cannot probe and a Prometheus server
cannot scrape; ``--metrics-port`` opens a plain HTTP/1.1 listener (``--metrics-host``,
127.0.0.1 by default) with three paths (docs/OPERATIONS.md):

- ``GET /metrics``: the text exposition format. The counters are the ones the messaging
  layer keeps anyway (``MessagingStats``, ``DtlsStats``, the dedup table, the batchers),
  read by :class:`ProxyCollector` when a scrape asks: nothing is added to a request's path —
  no lock, no await, no extra object. The one thing measured for the metrics alone is the
  upstream call's latency (:class:`TimedUpstream`): one clock read and one bucket increment
  per HTTP call, which is per batch for telemetry, and only while the listener is on.
- ``GET /healthz``: liveness. Answered by the event loop that runs the CoAP endpoints, so a
  blocked loop fails it; 200 as long as it answers, even while draining.
- ``GET /readyz``: readiness. 200 when this process accepts new exchanges, the upstream
  answers ``GET {upstream}/healthz`` (any answer below 500: an origin without that path
  still proves it is reachable) and, with ``--redis-url``, Redis answers a PING, each within
  :data:`PROBE_TIMEOUT`; else 503. The body says which.

Each worker of ``--workers N`` is its own process with its own counters: each opens its own
listener, on ``metrics_port + i`` for worker ``i`` (launcher/cli.py), and is scraped as its own
target; Prometheus sums them (``sum without (instance)``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.coap import codes
from proxy.errors import UpstreamTimeout
from proxy.settings import ProxySettings
from proxy.upstream import Upstream, UpstreamResponse
from stores.redis import REDIS_ERRORS, RedisConnection, connect

if TYPE_CHECKING:
    from proxy.coap.driver import CoapDriver
    from proxy.server import RunningProxy

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 1.0
"""Seconds each readiness check (upstream, Redis) may take: an orchestrator's probe timeout
is typically 1 s too."""
PROBE_REUSE = 1.0
"""Seconds a readiness result is reused: a scrape and a probe arriving together check once."""
UPSTREAM_PROBE_PATH = "/healthz"
DEDUP_ENTRY_BYTES = 134
"""Bytes one remembered exchange costs in this process's dedup table (docs/ARCHITECTURE.md,
"Lean dedup memory"; measured, not counted per entry: summing a million entries at every
scrape would hold the event loop)."""
# Upstream latency buckets (seconds): a loopback API answers in about a millisecond, the
# default upstream_timeout is 5 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MAX_HEAD = 8192
_READ_TIMEOUT = 5.0


class TimedUpstream:
    """The :class:`~proxy.upstream.Upstream` seam with a latency histogram of every call.

    Plain integers in a list: the proxy has one thread, so a bucket increment needs no lock
    (prometheus_client's own Histogram takes one per observation). The collector turns them
    into a cumulative histogram at scrape time."""

    def __init__(self, inner: Upstream, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.inner = inner
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.timeouts = 0
        self.failures = 0
        self._clock = asyncio.get_running_loop().time

    async def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes
    ) -> UpstreamResponse:
        clock = self._clock
        started = clock()
        try:
            return await self.inner.request(method, url, headers, content)
        except UpstreamTimeout:
            self.timeouts += 1
            raise
        except Exception:
            self.failures += 1
            raise
        finally:
            elapsed = clock() - started
            self.counts[bisect.bisect_left(self.bounds, elapsed)] += 1
            self.total += elapsed

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True)
class Readiness:
    accepting: bool
    upstream: bool
    redis: bool | None  # None: no Redis configured

    @property
    def ready(self) -> bool:
        return self.accepting and self.upstream and self.redis is not False

    def body(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "unready",
            "accepting": self.accepting,
            "upstream": "reachable" if self.upstream else "unreachable",
            "redis": "none"
            if self.redis is None
            else ("reachable" if self.redis else "unreachable"),
        }


class Probes:
    """The readiness checks, run when asked (a probe or a scrape), reused for
    :data:`PROBE_REUSE` seconds."""

    def __init__(self, running: RunningProxy, upstream_url: str, redis_url: str | None) -> None:
        self._running = running
        self._url = upstream_url.rstrip("/") + UPSTREAM_PROBE_PATH
        self._redis_url = redis_url
        self._redis: RedisConnection | None = None
        self._last: Readiness | None = None
        self._at = -float("inf")
        self._running_check: asyncio.Future[Readiness] | None = None

    @property
    def last(self) -> Readiness | None:
        return self._last

    async def check(self) -> Readiness:
        loop = asyncio.get_running_loop()
        if self._last is not None and loop.time() - self._at < PROBE_REUSE:
            return self._last
        if self._running_check is None:
            # One check at a time: concurrent probes wait for the same answer.
            self._running_check = asyncio.ensure_future(self._check())
        try:
            return await asyncio.shield(self._running_check)
        finally:
            if self._running_check is not None and self._running_check.done():
                self._running_check = None

    async def _check(self) -> Readiness:
        upstream, redis = await asyncio.gather(self._upstream_ok(), self._redis_ok())
        result = Readiness(self._running.accepting, upstream, redis)
        if self._last is not None and result.ready != self._last.ready:
            log.info("readiness: %s", json.dumps(result.body()))
        self._last, self._at = result, asyncio.get_running_loop().time()
        return result

    async def _upstream_ok(self) -> bool:
        upstream = self._running.upstream
        if isinstance(upstream, TimedUpstream):
            upstream = upstream.inner  # probes stay out of the devices' latency histogram
        try:
            answer = await asyncio.wait_for(
                upstream.request("GET", self._url, {}, b""), PROBE_TIMEOUT
            )
        except Exception:  # unreachable, timeout, anything: not ready
            return False
        return answer.status < 500

    async def _redis_ok(self) -> bool | None:
        if self._redis_url is None:
            return None
        if self._redis is None:
            self._redis = connect(self._redis_url, timeout=PROBE_TIMEOUT)
        try:
            await asyncio.wait_for(self._redis.client.ping(), PROBE_TIMEOUT)
        except (*REDIS_ERRORS, TimeoutError):
            return False
        return True

    async def aclose(self) -> None:
        if self._running_check is not None:
            self._running_check.cancel()
            with contextlib.suppress(BaseException):
                await self._running_check
        if self._redis is not None:
            await self._redis.aclose()


def _transports(running: RunningProxy) -> list[tuple[str, CoapDriver]]:
    drivers = [("coap", running.driver)]
    if running.dtls_driver is not None:
        drivers.append(("coaps", running.dtls_driver))
    return drivers


class ProxyCollector(Collector):
    """Reads the proxy's own counters when a scrape asks (prometheus_client's custom
    collector): no metric object is touched while requests are served."""

    def __init__(
        self,
        running: RunningProxy,
        timed: TimedUpstream | None = None,
        probes: Probes | None = None,
    ) -> None:
        self._running = running
        self._timed = timed
        self._probes = probes

    def collect(self) -> Iterator[Metric]:
        running = self._running
        if running.request_log is not None:
            yield self._answered(running.request_log.cumulative())
        yield from self._messaging(running)
        yield from self._batching(running)
        if running.dtls is not None:
            yield from self._dtls(running)
        if running.observers is not None:
            relations = GaugeMetricFamily(
                "coap_bridge_proxy_observe_relations",
                "Observe relations (RFC 7641) this process holds",
            )
            relations.add_metric([], len(running.observers))
            yield relations
        if self._timed is not None:
            yield from self._latency(self._timed)
        if self._probes is not None and self._probes.last is not None:
            yield from self._up(self._probes.last)

    def _answered(self, counts: Mapping[tuple[str, int], int]) -> Metric:
        answered = CounterMetricFamily(
            "coap_bridge_proxy_requests",
            "Requests answered, by the policy's route (a template counts once; 'other': no "
            "route) and CoAP response code; kept by the request log (at every log level)",
            labels=["route", "code"],
        )
        for (route, code), value in sorted(counts.items()):
            answered.add_metric([route, codes.code_text(code)], value)
        return answered

    def _messaging(self, running: RunningProxy) -> Iterator[Metric]:
        labels = ["transport"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=[*labels, *extra])

        requests = counter(
            "coap_bridge_proxy_exchanges",
            "New CoAP request exchanges received (duplicates not counted)",
        )
        duplicates = counter(
            "coap_bridge_proxy_duplicates",
            "Duplicate requests answered from a dedup cache: this process's (local) or the "
            "bytes another replica stored in Redis (shared)",
            ("cache",),
        )
        retransmissions = counter(
            "coap_bridge_proxy_retransmissions",
            "CON messages this proxy sent again for want of an ACK (RFC 7252 §4.2)",
        )
        separate = counter(
            "coap_bridge_proxy_separate_responses",
            "Responses sent separately after an empty ACK (RFC 7252 §5.2.2)",
        )
        format_errors = counter(
            "coap_bridge_proxy_format_errors",
            "Datagrams that were not a valid CoAP message (RFC 7252 §4.2, §4.3)",
        )
        handler_errors = counter(
            "coap_bridge_proxy_handler_errors", "Requests whose handler raised (answered 5.00)"
        )
        misdirected = counter(
            "coap_bridge_proxy_misdirected",
            "Datagrams not sent because the DTLS session at the destination no longer belongs "
            "to the device they are for (a NAT gave its address to another device)",
        )
        claims = counter(
            "coap_bridge_proxy_shared_claims",
            "Cross-replica dedup claims by outcome: busy (another replica holds it), "
            "unavailable (Redis down: local dedup only), skipped (no claim needed)",
            ("outcome",),
        )
        entries = GaugeMetricFamily(
            "coap_bridge_proxy_dedup_entries",
            "Exchanges remembered in this process's dedup table",
            labels=labels,
        )
        size = GaugeMetricFamily(
            "coap_bridge_proxy_dedup_bytes",
            f"Memory of this process's dedup table, estimated at {DEDUP_ENTRY_BYTES} B per entry",
            labels=labels,
        )
        awaiting = GaugeMetricFamily(
            "coap_bridge_proxy_awaiting_ack",
            "CON messages sent and not yet acknowledged",
            labels=labels,
        )
        for name, driver in _transports(running):
            stats = driver.stats
            requests.add_metric([name], stats.requests)
            duplicates.add_metric([name, "local"], stats.duplicates)
            duplicates.add_metric([name, "shared"], stats.shared_replays)
            retransmissions.add_metric([name], stats.retransmissions)
            separate.add_metric([name], stats.separate_responses)
            format_errors.add_metric([name], stats.format_errors)
            handler_errors.add_metric([name], stats.handler_errors)
            misdirected.add_metric([name], stats.misdirected)
            claims.add_metric([name, "busy"], stats.shared_busy)
            claims.add_metric([name, "unavailable"], stats.shared_unavailable)
            claims.add_metric([name, "skipped"], stats.claims_skipped)
            endpoint = driver._endpoint
            held = len(endpoint._exchanges)
            entries.add_metric([name], held)
            size.add_metric([name], held * DEDUP_ENTRY_BYTES)
            awaiting.add_metric([name], endpoint.awaiting_ack)
        yield from (requests, duplicates, retransmissions, separate, format_errors)
        yield from (handler_errors, misdirected, claims, entries, size, awaiting)

    def _batching(self, running: RunningProxy) -> Iterator[Metric]:
        calls: dict[str, int] = {}
        items: dict[str, int] = {}
        for handler in (running.handler, running.dtls_handler):
            if handler is None:
                continue
            batchers: Mapping[str, Any] = getattr(handler.inner, "_batchers", {})
            for target, batcher in batchers.items():
                calls[target] = calls.get(target, 0) + batcher.calls
                items[target] = items.get(target, 0) + batcher.items
        calls_family = CounterMetricFamily(
            "coap_bridge_proxy_batch_calls",
            "Upstream batch calls (group commit, docs/ARCHITECTURE.md) per batch target",
            labels=["target"],
        )
        items_family = CounterMetricFamily(
            "coap_bridge_proxy_batch_items",
            "Device requests carried by batch calls per target (items / calls = mean batch size)",
            labels=["target"],
        )
        for target in sorted(calls):
            calls_family.add_metric([target], calls[target])
            items_family.add_metric([target], items[target])
        yield calls_family
        yield items_family

    def _dtls(self, running: RunningProxy) -> Iterator[Metric]:
        transport = running.dtls
        assert transport is not None
        stats = transport.stats
        sessions = GaugeMetricFamily("coap_bridge_dtls_sessions", "DTLS sessions established")
        sessions.add_metric([], transport.session_count)
        handshaking = GaugeMetricFamily(
            "coap_bridge_dtls_handshakes_in_progress", "DTLS handshakes under way"
        )
        handshaking.add_metric([], transport.peer_count - transport.session_count)
        cid_sessions = GaugeMetricFamily(
            "coap_bridge_dtls_cid_sessions",
            "DTLS sessions with a Connection ID (RFC 9146): found by CID, not by address",
        )
        cid_sessions.add_metric([], transport.cid_session_count)
        yield sessions
        yield handshaking
        yield cid_sessions
        for name, doc, value in (
            ("coap_bridge_dtls_datagrams", "Datagrams received on the DTLS port", stats.datagrams),
            (
                "coap_bridge_dtls_handshakes",
                "DTLS handshakes started (client cookie verified, RFC 6347 §4.2.1)",
                stats.handshakes,
            ),
            (
                "coap_bridge_dtls_handshakes_completed",
                "DTLS handshakes completed",
                stats.connected,
            ),
            (
                "coap_bridge_dtls_address_updates",
                "DTLS sessions moved to a new address by an authenticated CID record",
                stats.address_updates,
            ),
            (
                "coap_bridge_dtls_parked",
                "DTLS CID sessions parked because another device's session moved to their "
                "address (a NAT reused the port); the next record of their own moves them",
                stats.parked,
            ),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        failures = CounterMetricFamily(
            "coap_bridge_dtls_handshake_failures",
            "DTLS handshakes that will not complete: an unknown PSK identity (answered with a "
            "dummy key) or stalled past dtls_handshake_timeout",
            labels=["reason"],
        )
        failures.add_metric(["unknown_identity"], stats.unknown_identity)
        failures.add_metric(["timeout"], stats.evicted_handshake)
        closed = CounterMetricFamily(
            "coap_bridge_dtls_sessions_closed", "DTLS peers dropped, by reason", labels=["reason"]
        )
        for reason, value in (
            ("idle", stats.evicted_idle),
            ("cap", stats.evicted_cap),
            ("peer", stats.closed_by_peer),
            ("psk_change", stats.closed_psk_change),
        ):
            closed.add_metric([reason], value)
        dropped = CounterMetricFamily(
            "coap_bridge_dtls_dropped",
            "DTLS datagrams dropped: stateless (no peer, not a ClientHello), stopping "
            "(ClientHello while draining), unsent (a response for a peer without a session), "
            "unknown_cid (a Connection ID no session has here or in Redis), cid_not_moved (a "
            "CID record from a new address that was not authentic and newest: RFC 9146 §6), "
            "lookup_busy (too many unknown CIDs being looked up in Redis at once), "
            "unsent_parked (a response for a parked session, which has no address until its "
            "next record)",
            labels=["reason"],
        )
        dropped.add_metric(["stateless"], stats.dropped_stateless)
        dropped.add_metric(["stopping"], stats.refused_stopping)
        dropped.add_metric(["unsent"], stats.unsent)
        dropped.add_metric(["unknown_cid"], stats.dropped_unknown_cid)
        dropped.add_metric(["cid_not_moved"], stats.cid_not_moved)
        dropped.add_metric(["lookup_busy"], stats.lookup_dropped)
        dropped.add_metric(["unsent_parked"], stats.unsent_parked)
        shared = CounterMetricFamily(
            "coap_bridge_dtls_shared_sessions",
            "DTLS sessions shared through Redis (docs/SCALING.md, 'DTLS sessions'), by event: "
            "saved / save_failed at handshake, lookup of an unknown CID, imported, refused "
            "(key changed), unauthenticated (first record), taken_over by another replica, "
            "seq_exhausted (write range used up), touched (sequence number written back)",
            labels=["event"],
        )
        for event, value in (
            ("saved", stats.saved),
            ("save_failed", stats.save_failed),
            ("lookup", stats.lookups),
            ("imported", stats.imported),
            ("refused", stats.import_refused),
            ("unauthenticated", stats.import_unauthenticated),
            ("taken_over", stats.taken_over),
            ("seq_exhausted", stats.seq_exhausted),
            ("touched", stats.touches),
        ):
            shared.add_metric([event], value)
        yield failures
        yield closed
        yield dropped
        yield shared

    def _latency(self, timed: TimedUpstream) -> Iterator[Metric]:
        cumulative: list[tuple[str, float]] = []
        seen = 0
        for bound, count in zip((*timed.bounds, float("inf")), timed.counts, strict=True):
            seen += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), seen))
        histogram = HistogramMetricFamily(
            "coap_bridge_proxy_upstream_request_duration_seconds",
            "HTTP calls to the upstream (a batch call counts once), failures included",
            buckets=cumulative,
            sum_value=timed.total,
        )
        yield histogram
        errors = CounterMetricFamily(
            "coap_bridge_proxy_upstream_errors",
            "HTTP calls to the upstream without an answer: timeout (5.04) or unreachable (5.02)",
            labels=["kind"],
        )
        errors.add_metric(["timeout"], timed.timeouts)
        errors.add_metric(["unreachable"], timed.failures)
        yield errors

    def _up(self, last: Readiness) -> Iterator[Metric]:
        upstream = GaugeMetricFamily(
            "coap_bridge_proxy_upstream_up",
            f"1 when the upstream answered GET {UPSTREAM_PROBE_PATH} at the last check",
        )
        upstream.add_metric([], 1 if last.upstream else 0)
        yield upstream
        if last.redis is not None:
            redis = GaugeMetricFamily(
                "coap_bridge_proxy_redis_up", "1 when Redis answered a PING at the last check"
            )
            redis.add_metric([], 1 if last.redis else 0)
            yield redis
        ready = GaugeMetricFamily("coap_bridge_proxy_ready", "1 when /readyz answers 200")
        ready.add_metric([], 1 if last.ready else 0)
        yield ready


class MetricsListener:
    """The HTTP/1.1 listener: one request per connection (``Connection: close``), GET or HEAD
    on three paths, a request head of at most 8 KiB. Enough for Prometheus and a kubelet; not
    a general web server."""

    def __init__(self, registry: CollectorRegistry, probes: Probes) -> None:
        self._registry = registry
        self._probes = probes
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        await self._probes.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            if len(head) > _MAX_HEAD:
                await _answer(writer, 431, "text/plain", b"request head too large\n", False)
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) != 3:
                await _answer(writer, 400, "text/plain", b"malformed request line\n", False)
                return
            method, target = parts[0], parts[1].split(b"?", 1)[0]
            if method not in (b"GET", b"HEAD"):
                await _answer(writer, 405, "text/plain", b"GET or HEAD only\n", False)
                return
            status, content_type, body = await self._route(target)
            await _answer(writer, status, content_type, body, method == b"HEAD")
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, target: bytes) -> tuple[int, str, bytes]:
        if target == b"/healthz":
            # Answering at all is the proof: this coroutine runs on the CoAP endpoints' loop.
            return 200, "application/json", b'{"status": "ok"}\n'
        if target == b"/readyz":
            readiness = await self._probes.check()
            body = json.dumps(readiness.body()).encode() + b"\n"
            return (200 if readiness.ready else 503), "application/json", body
        if target == b"/metrics":
            await self._probes.check()  # the up gauges are as fresh as the scrape
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, "text/plain", b"not found: /metrics, /healthz, /readyz\n"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


async def _answer(
    writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes, head_only: bool
) -> None:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()


async def start_metrics(
    running: RunningProxy,
    *,
    host: str,
    port: int,
    upstream_url: str,
    redis_url: str | None,
    timed: TimedUpstream | None = None,
) -> MetricsListener:
    """Open the listener for ``running`` (a registry of its own: several proxies in one
    process, as in the tests, never share counters)."""
    probes = Probes(running, upstream_url, redis_url)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(running, timed, probes))
    listener = MetricsListener(registry, probes)
    try:
        await listener.start(host, port)
    except BaseException:
        await probes.aclose()
        raise
    return listener


def worker_metrics(given: dict[str, Any], worker: int) -> dict[str, Any]:
    """The settings of proxy worker ``worker`` of ``--workers N``: each worker is a process
    with its own counters, so each gets its own listener, ``metrics_port + worker`` (a shared
    port would hand each scrape to a random worker). Port 0 stays 0 (any free port)."""
    port = ProxySettings(**given).metrics_port
    if not port:
        return given
    return {**given, "metrics_port": port + worker}
