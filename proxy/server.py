"""Assemble and run the proxy: settings → policy, upstream, handler, UDP and DTLS endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from policies.routes import Policy, load_policy, load_profiles
from proxy.coap.blockwise import BlockwiseHandler
from proxy.coap.driver import CoapDriver
from proxy.coap.endpoint import Endpoint
from proxy.coap.exchanges import ExchangeCache
from proxy.coap.observe import Observers, Relation, relation_record_id
from proxy.coap.requests import RequestHandler
from proxy.feed import ChangeFeed
from proxy.forward import ProxyHandler
from proxy.gate import Gate
from proxy.http1 import Http1Upstream, upstream_tls
from proxy.metrics import MetricsListener, TimedUpstream, start_metrics
from proxy.observing import Observing, dispatch_change, refresh_all
from proxy.request_log import RequestLog, log_requests
from proxy.settings import ProxySettings
from proxy.sockets import size_receive_buffer
from proxy.state.blocks import BlockLimits, RedisBlockStore
from proxy.state.psk import PskStore, RedisPskMirror
from proxy.transports.dtls import DtlsError, DtlsTransport, create_dtls_endpoint
from proxy.upstream import Upstream
from stores.dtls_sessions import DtlsSessionStore, dtls_sessions_for
from stores.keys import dedup_key, dedup_prefix
from stores.ledger import Ledger, redis_ledger
from stores.relations import RedisRelationRecords, RelationRecords

log = logging.getLogger(__name__)


class ListenerError(OSError):
    """A listening socket could not be bound: which listener, where, the OS's reason, and the
    settings that move it (``host_setting``/``port_setting``: field names, which are the
    flags and ``COAP_BRIDGE_*`` variables of the launcher). The launcher prints it as one line
    instead of a traceback."""

    def __init__(
        self,
        listener: str,
        host: str,
        port: int,
        cause: OSError,
        *,
        host_setting: str,
        port_setting: str,
    ) -> None:
        code = os_errno(cause)
        reason = os.strerror(code) if code is not None else str(cause)
        super().__init__(code, reason)
        self.listener = listener
        self.host = host
        self.port = port
        self.reason = reason[:1].lower() + reason[1:]
        self.host_setting = host_setting
        self.port_setting = port_setting

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def setting(self) -> str:
        """The setting to change: the host when the address is not this machine's, else the
        port (in use, or privileged)."""
        return self.host_setting if self.errno == errno.EADDRNOTAVAIL else self.port_setting

    def __str__(self) -> str:
        return f"{self.listener} on {self.address}: {self.reason}"


def os_errno(exc: BaseException) -> int | None:
    """The errno of an OSError, or of the OSError it was raised from: uvloop raises its own
    "could not bind to local_addr" with the bind(2) error as the context."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno is not None:
            return int(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass
class RunningProxy:
    transport: asyncio.DatagramTransport
    # The messaging layer on the transport (stats, stop_accepting, drain).
    driver: CoapDriver
    handler: BlockwiseHandler
    upstream: Upstream
    dedup: Ledger | None = None
    # coaps:// (docs/CONTRACT.md §6): its own transport and driver, the same upstream and dedup
    # store.
    dtls: DtlsTransport | None = None
    dtls_driver: CoapDriver | None = None
    dtls_handler: BlockwiseHandler | None = None
    psk_store: PskStore | None = None
    owns_psk_store: bool = False
    # With --redis-url: CID sessions shared with the other replicas (stores/dtls_sessions.py).
    dtls_sessions: DtlsSessionStore | None = None
    # RFC 7641 (when the policy has observable routes): the relations of both transports, the
    # change feed, and each transport's glue.
    observers: Observers | None = None
    feed: ChangeFeed | None = None
    observing: list[Observing] = field(default_factory=list)
    # Which replica holds which relation, in Redis (stores/relations.py), and its writer.
    relations: RelationRecords | None = None
    relations_task: asyncio.Task[None] | None = None
    # The request log's counts (at every level) and summary line (info; proxy/request_log.py).
    request_log: RequestLog | None = None
    # --metrics-port (proxy/metrics.py): /metrics, /healthz, /readyz on HTTP.
    metrics: MetricsListener | None = None
    # False once stop_accepting ran: /readyz turns 503 so that balancers stop sending.
    accepting: bool = True

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def dtls_address(self) -> tuple[str, int] | None:
        if self.dtls is None:
            return None
        host, port = self.dtls.get_extra_info("sockname")[:2]
        return host, port

    def stop_accepting(self) -> None:
        """Begin a graceful shutdown: no new exchange or DTLS handshake is taken; answers in
        flight, retransmissions and ACKs keep going (Endpoint.stop_accepting)."""
        self.accepting = False
        self.driver.stop_accepting()
        if self.dtls is not None:
            self.dtls.stop_accepting()
        if self.dtls_driver is not None:
            self.dtls_driver.stop_accepting()

    async def close(self, drain_timeout: float = 0.0) -> bool:
        """Release everything. With ``drain_timeout`` > 0, first stop taking new requests and
        give those in flight up to that many seconds to be answered and, for separate
        responses, acknowledged (RFC 7252 §4.2), over both transports; then close. Returns
        False when something had to be abandoned at the deadline."""
        drained = True
        if drain_timeout > 0:
            self.stop_accepting()
            log.info("stopping: finishing what is in flight (at most %g s)", drain_timeout)
            drivers = [self.driver]
            if self.dtls_driver is not None:
                drivers.append(self.dtls_driver)
            results = await asyncio.gather(*(d.drain(drain_timeout) for d in drivers))
            drained = all(results)
        if self.metrics is not None:
            await self.metrics.aclose()
        if self.feed is not None:
            await self.feed.aclose()
        for observing in self.observing:
            await observing.aclose()
        if self.relations_task is not None:
            self.relations_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.relations_task
        if self.relations is not None:
            await self.relations.close()
        self.transport.close()
        if self.dtls is not None:
            self.dtls.close()
        await self.driver.drain()
        await self.handler.drain()
        if self.dtls_driver is not None and self.dtls_handler is not None:
            await self.dtls_driver.drain()
            await self.dtls_handler.drain()
        if self.psk_store is not None and self.owns_psk_store:
            await self.psk_store.close()
        if self.dtls_sessions is not None:
            await self.dtls_sessions.close()
        if self.request_log is not None:
            await self.request_log.aclose()
        await self.upstream.aclose()
        if self.dedup is not None:
            await self.dedup.close()
        return drained


def route_policy(settings: ProxySettings) -> Policy:
    """The route table: the ``policy`` file when one is given (it replaces the profiles'
    tables entirely), else the enabled profiles' tables merged (policies/profiles/)."""
    if settings.policy is not None:
        return load_policy(settings.policy)
    return load_profiles(settings.profiles)


def _handler(
    settings: ProxySettings,
    policy: Policy,
    upstream: Upstream,
    *,
    proto: str,
    plain_only: bool = False,
) -> BlockwiseHandler:
    """One per transport: coap and coaps differ in the ``proto`` they report upstream (and,
    in production mode, in what plain CoAP may reach). The forwarder sits inside the
    block-wise layer (RFC 7959); with ``redis_url`` Block1 transfers are shared by replicas."""
    forwarder = ProxyHandler(
        policy=policy,
        upstream=upstream,
        base_url=settings.upstream,
        proxy_token=settings.proxy_token,
        upstream_timeout=settings.upstream_timeout,
        proto=proto,
        max_payload=settings.max_payload,
        max_batch=settings.max_batch,
        batch_concurrency=settings.batch_concurrency,
        plain_only=plain_only,
        failure_interval=settings.log_interval,
    )
    limits = BlockLimits(max_body=settings.max_payload)
    store = None
    if settings.redis_url is not None:
        store = RedisBlockStore.from_url(
            settings.redis_url, prefix=settings.redis_prefix, limits=limits
        )
    return BlockwiseHandler(
        forwarder,
        block_size=settings.block_size,
        max_payload=settings.max_payload,
        store=store,
    )


def _driver(
    settings: ProxySettings,
    handler: RequestHandler,
    dedup: Ledger | None,
    identity_of: Callable[[tuple[str, int]], str | None] | None = None,
    observing: Observing | None = None,
    requests: RequestLog | None = None,
) -> CoapDriver:
    """The messaging layer for one transport: endpoint (RFC 7252), and with a shared store
    the gate (the cross-replica claim) in front of the handler. ``requests``: the request
    log, which wraps the handler at its level (proxy/request_log.py)."""
    handler = log_requests(handler, requests)
    endpoint = Endpoint(
        exchanges=ExchangeCache(max_entries=settings.dedup_max_entries),
        ack_window=settings.ack_window,
        ack_timeout=settings.ack_timeout,
        claims=dedup is not None,
    )
    gate = None
    if dedup is not None:
        gate = Gate(
            handler,
            dedup,
            dedup_key,
            lease=settings.dedup_lease,
            stats=endpoint.stats,
        )
    return CoapDriver(endpoint, handler, gate=gate, identity_of=identity_of, observing=observing)


def _observing(
    settings: ProxySettings, policy: Policy, handler: BlockwiseHandler
) -> tuple[Observers, ChangeFeed] | None:
    """Observe's shared parts when the policy has an observable route: the relations (both
    transports, one set of limits) and the change feed on the upstream (proxy/feed.py)."""
    if not any(route.observe for route in policy.routes.values()):
        return None
    forwarder = handler.inner
    assert isinstance(forwarder, ProxyHandler)
    observers = Observers(
        max_per_device=settings.max_observers_per_device, max_total=settings.max_observers
    )
    feed = ChangeFeed(
        forwarder.observe_events_url,
        forwarder.internal_headers,
        lambda path: dispatch_change(observers, path),
        lambda: refresh_all(observers),
    )
    return observers, feed


def _record_relations(
    running: RunningProxy, observers: Observers, records: RelationRecords
) -> None:
    """Keep this replica's relations recorded (stores/relations.py; in Redis with
    ``--redis-url``): the API shows who observes, and a dead replica's records are dropped by
    the survivors' heartbeats."""

    def changed(relation: Relation, started: bool) -> None:
        name = relation_record_id(relation)
        if started:
            records.add(name, relation.route.origin_path)
        else:
            records.remove(name, relation.route.origin_path)

    observers.listener = changed
    running.relations = records
    running.relations_task = asyncio.get_running_loop().create_task(
        records.run(), name="observe-relation-records"
    )


async def start_proxy(
    settings: ProxySettings,
    *,
    upstream: Upstream | None = None,
    dedup: Ledger | None = None,
    psk_store: PskStore | None = None,
    reuse_port: bool = False,
    relations: RelationRecords | None = None,
) -> RunningProxy:
    """Bind the CoAP port and start serving. ``reuse_port``: several worker processes share
    the port (SO_REUSEPORT); the kernel spreads datagrams by a hash of the source address, so
    one device keeps reaching the same worker while the worker count stays the same.

    DTLS (``settings.coaps_port`` not None) runs when there are PSKs to check: ``psk_store``
    if given (``coap-bridge up`` without Redis passes its in-process store), else a
    :class:`RedisPskMirror` of ``settings.redis_url``; with neither it stays off."""
    policy = route_policy(settings)
    made_upstream, made_dedup = upstream is None, dedup is None
    if upstream is None:
        upstream = Http1Upstream(
            timeout=settings.upstream_timeout,
            max_connections=settings.upstream_connections,
            tls=upstream_tls(settings.upstream_ca),
        )
    # The upstream latency histogram is kept only when something can read it.
    timed = TimedUpstream(upstream) if settings.metrics_port is not None else None
    if timed is not None:
        upstream = timed
    handler = _handler(
        settings,
        policy,
        upstream,
        proto="coap",
        plain_only=settings.require_dtls,
    )
    if dedup is None and settings.redis_url is not None:
        # No retries: a failed claim is served on local dedup, better for the device than
        # waiting through a retry schedule (proxy/gate.py).
        dedup = redis_ledger(
            settings.redis_url, prefix=dedup_prefix(settings.redis_prefix), timeout=1.0, retries=0
        )
    shared = _observing(settings, policy, handler)
    observing = Observing(shared[0], handler, shared[1]) if shared is not None else None
    requests = RequestLog.at_level(policy, interval=settings.log_interval)
    loop = asyncio.get_running_loop()
    try:
        transport, driver = await loop.create_datagram_endpoint(
            lambda: _driver(settings, handler, dedup, observing=observing, requests=requests),
            local_addr=(settings.coap_host, settings.coap_port),
            reuse_port=reuse_port or None,
        )
    except OSError as exc:
        if made_upstream:
            await upstream.aclose()
        if made_dedup and dedup is not None:
            await dedup.close()
        raise ListenerError(
            "CoAP UDP",
            settings.coap_host,
            settings.coap_port,
            exc,
            host_setting="coap_host",
            port_setting="coap_port",
        ) from exc
    size_receive_buffer(
        transport.get_extra_info("socket"), settings.udp_receive_buffer, "CoAP UDP listener"
    )
    running = RunningProxy(
        transport=transport, driver=driver, handler=handler, upstream=upstream, dedup=dedup
    )
    if requests is not None:
        running.request_log = requests
        requests.start()
    if shared is not None and observing is not None:
        running.observers, running.feed = shared
        running.observing.append(observing)
        if relations is None and settings.redis_url is not None:
            relations = RedisRelationRecords.from_url(
                settings.redis_url,
                prefix=settings.redis_prefix,
                heartbeat=settings.observe_heartbeat,
            )
        if relations is not None:
            _record_relations(running, shared[0], relations)
    if settings.coaps_port is not None and (psk_store is not None or settings.redis_url):
        try:
            await _start_dtls(running, settings, policy, psk_store, reuse_port)
        except BaseException:
            await running.close()
            raise
    if settings.metrics_port is not None:
        try:
            running.metrics = await _start_metrics(running, settings, timed)
        except BaseException:
            await running.close()
            raise
    host, port = running.address
    log.info(
        "CoAP proxy listening on udp %s:%s, forwarding to %s (%d routes), dedup %s",
        host,
        port,
        settings.upstream,
        len(policy.routes),
        "shared in Redis" if dedup is not None else "in this process only",
    )
    return running


async def _start_metrics(
    running: RunningProxy, settings: ProxySettings, timed: TimedUpstream | None
) -> MetricsListener:
    assert settings.metrics_port is not None
    try:
        listener = await start_metrics(
            running,
            host=settings.metrics_host,
            port=settings.metrics_port,
            upstream_url=settings.upstream,
            redis_url=settings.redis_url,
            timed=timed,
        )
    except OSError as exc:
        raise ListenerError(
            "metrics HTTP",
            settings.metrics_host,
            settings.metrics_port,
            exc,
            host_setting="metrics_host",
            port_setting="metrics_port",
        ) from exc
    host, port = listener.address
    log.info("metrics and probes on http://%s:%s (/metrics, /healthz, /readyz)", host, port)
    return listener


async def _start_dtls(
    running: RunningProxy,
    settings: ProxySettings,
    policy: Policy,
    psk_store: PskStore | None,
    reuse_port: bool,
) -> None:
    assert settings.coaps_port is not None
    if psk_store is None:
        assert settings.redis_url is not None
        psk_store = RedisPskMirror(settings.redis_url, prefix=settings.redis_prefix)
        running.owns_psk_store = True
    running.psk_store = psk_store
    await psk_store.start()
    handler = _handler(settings, policy, running.upstream, proto="coaps")
    running.dtls_handler = handler
    observing = None
    if running.observers is not None:
        observing = Observing(running.observers, handler, running.feed)
        running.observing.append(observing)

    def driver_for(transport: DtlsTransport) -> CoapDriver:
        return _driver(
            settings, handler, running.dedup, transport.identity_of, observing, running.request_log
        )

    host = settings.coaps_host if settings.coaps_host is not None else settings.coap_host
    if settings.redis_url is not None and settings.dtls_connection_id:
        # Only CID sessions are stored: a record without a CID is found by its address, which
        # no other replica can map to a session (docs/SCALING.md, "DTLS sessions").
        running.dtls_sessions = dtls_sessions_for(settings.redis_url, settings.redis_prefix)
    try:
        transport, driver = await create_dtls_endpoint(
            driver_for,
            psk_store=psk_store,
            host=host,
            port=settings.coaps_port,
            max_sessions=settings.dtls_max_sessions,
            max_handshakes=settings.dtls_max_handshakes,
            idle_timeout=settings.dtls_idle_timeout,
            handshake_timeout=settings.dtls_handshake_timeout,
            require_extended_master_secret=settings.dtls_require_extended_master_secret,
            connection_id=settings.dtls_connection_id,
            reuse_port=reuse_port,
            session_store=running.dtls_sessions,
        )
    except DtlsError:
        raise  # DTLSSocket missing or not the patched build: its message says what to do
    except OSError as exc:
        raise ListenerError(
            "CoAP DTLS",
            host,
            settings.coaps_port,
            exc,
            host_setting="coaps_host",
            port_setting="coaps_port",
        ) from exc
    size_receive_buffer(
        transport.get_extra_info("socket"), settings.udp_receive_buffer, "CoAP DTLS listener"
    )
    running.dtls = transport
    running.dtls_driver = cast(CoapDriver, driver)
    address = running.dtls_address
    assert address is not None
    log.info(
        "CoAP over DTLS listening on udp %s:%s (PSKs %s, at most %d peers, idle timeout %g s, "
        "Connection ID %s)",
        address[0],
        address[1],
        "mirrored from Redis" if running.owns_psk_store else "in this process",
        settings.dtls_max_sessions,
        settings.dtls_idle_timeout,
        "off"
        if not settings.dtls_connection_id
        else "on, sessions shared in Redis"
        if running.dtls_sessions is not None
        else "on",
    )
