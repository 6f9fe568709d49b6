"""Assemble and run the proxy: settings → policy, upstream, handler, UDP and DTLS endpoints."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from policies.keys import dedup_key
from policies.routes import Policy, load_policy
from proxy.coap.exchanges import ExchangeCache
from proxy.coap.messaging import CoapServerProtocol, SharedDedup
from proxy.forward import PLAIN_PATHS_IN_PRODUCTION, ProxyHandler
from proxy.http1 import Http1Upstream
from proxy.settings import ProxySettings
from proxy.state.base import DedupStore
from proxy.state.psk import PskStore, RedisPskMirror
from proxy.state.redis_store import RedisDedupStore
from proxy.transports.dtls import DtlsTransport, create_dtls_endpoint
from proxy.upstream import HttpxUpstream, Upstream

log = logging.getLogger(__name__)

# ``upstream_client`` → the Upstream implementation (each takes timeout and max_connections).
UPSTREAMS: dict[str, Callable[..., Upstream]] = {"http1": Http1Upstream, "httpx": HttpxUpstream}


@dataclass
class RunningProxy:
    transport: asyncio.DatagramTransport
    protocol: CoapServerProtocol
    handler: ProxyHandler
    upstream: Upstream
    dedup: DedupStore | None = None
    # coaps:// (SPEC §5): its own transport and protocol, the same upstream and dedup store.
    dtls: DtlsTransport | None = None
    dtls_protocol: CoapServerProtocol | None = None
    dtls_handler: ProxyHandler | None = None
    psk_store: PskStore | None = None
    owns_psk_store: bool = False

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

    async def close(self) -> None:
        self.transport.close()
        if self.dtls is not None:
            self.dtls.close()
        await self.protocol.drain()
        await self.handler.drain()
        if self.dtls_protocol is not None and self.dtls_handler is not None:
            await self.dtls_protocol.drain()
            await self.dtls_handler.drain()
        if self.psk_store is not None and self.owns_psk_store:
            await self.psk_store.close()
        await self.upstream.aclose()
        if self.dedup is not None:
            await self.dedup.close()


def _handler(
    settings: ProxySettings,
    policy: Policy,
    upstream: Upstream,
    *,
    proto: str,
    plain_paths: frozenset[str] | None = None,
) -> ProxyHandler:
    """One per transport: coap and coaps differ in the ``proto`` they report upstream (and,
    in production mode, in what plain CoAP may reach)."""
    return ProxyHandler(
        policy=policy,
        upstream=upstream,
        base_url=settings.upstream,
        proxy_token=settings.proxy_token,
        proto=proto,
        max_payload=settings.max_payload,
        max_batch=settings.max_batch,
        batch_concurrency=settings.batch_concurrency,
        plain_paths=plain_paths,
    )


async def start_proxy(
    settings: ProxySettings,
    *,
    upstream: Upstream | None = None,
    dedup: DedupStore | None = None,
    psk_store: PskStore | None = None,
    reuse_port: bool = False,
) -> RunningProxy:
    """Bind the CoAP port and start serving. ``reuse_port``: several worker processes share
    the port (SO_REUSEPORT); the kernel spreads datagrams by a hash of the source address, so
    one device keeps reaching the same worker while the worker count stays the same.

    DTLS (``settings.coaps_port`` not None) runs when there are PSKs to check: ``psk_store``
    if given (``coap-bridge up`` without Redis passes its in-process store), else a
    :class:`RedisPskMirror` of ``settings.redis_url``; with neither it stays off."""
    policy = load_policy(settings.policy)
    if upstream is None:
        upstream = UPSTREAMS[settings.upstream_client](
            timeout=settings.upstream_timeout, max_connections=settings.upstream_connections
        )
    handler = _handler(
        settings,
        policy,
        upstream,
        proto="coap",
        plain_paths=PLAIN_PATHS_IN_PRODUCTION if settings.require_dtls else None,
    )
    if dedup is None and settings.redis_url is not None:
        dedup = RedisDedupStore.from_url(settings.redis_url)
    shared = None
    if dedup is not None:
        prefix = settings.redis_prefix
        shared = SharedDedup(
            store=dedup,
            key=lambda ip, port, mid, identity: dedup_key(ip, port, mid, identity, prefix),
            lease=settings.dedup_lease,
        )
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: CoapServerProtocol(
            handler,
            exchanges=ExchangeCache(max_entries=settings.dedup_max_entries),
            ack_window=settings.ack_window,
            shared=shared,
        ),
        local_addr=(settings.coap_host, settings.coap_port),
        reuse_port=reuse_port or None,
    )
    running = RunningProxy(
        transport=transport, protocol=protocol, handler=handler, upstream=upstream, dedup=dedup
    )
    if settings.coaps_port is not None and (psk_store is not None or settings.redis_url):
        try:
            await _start_dtls(running, settings, policy, shared, psk_store, reuse_port)
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


async def _start_dtls(
    running: RunningProxy,
    settings: ProxySettings,
    policy: Policy,
    shared: SharedDedup | None,
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

    def protocol_for(transport: DtlsTransport) -> CoapServerProtocol:
        return CoapServerProtocol(
            handler,
            exchanges=ExchangeCache(max_entries=settings.dedup_max_entries),
            ack_window=settings.ack_window,
            shared=shared,
            identity_of=transport.identity_of,
        )

    host = settings.coaps_host if settings.coaps_host is not None else settings.coap_host
    transport, protocol = await create_dtls_endpoint(
        protocol_for,
        psk_store=psk_store,
        host=host,
        port=settings.coaps_port,
        max_sessions=settings.dtls_max_sessions,
        max_handshakes=settings.dtls_max_handshakes,
        idle_timeout=settings.dtls_idle_timeout,
        handshake_timeout=settings.dtls_handshake_timeout,
        require_extended_master_secret=settings.dtls_require_extended_master_secret,
        reuse_port=reuse_port,
    )
    running.dtls = transport
    running.dtls_protocol = cast(CoapServerProtocol, protocol)
    address = running.dtls_address
    assert address is not None
    log.info(
        "CoAP over DTLS listening on udp %s:%s (PSKs %s, at most %d peers, idle timeout %g s)",
        address[0],
        address[1],
        "mirrored from Redis" if running.owns_psk_store else "in this process",
        settings.dtls_max_sessions,
        settings.dtls_idle_timeout,
    )
