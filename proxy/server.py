"""Assemble and run the proxy: settings → policy, upstream, handler, UDP endpoint."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from policies.keys import dedup_key
from policies.routes import load_policy
from proxy.coap.exchanges import ExchangeCache
from proxy.coap.messaging import CoapServerProtocol, SharedDedup
from proxy.forward import ProxyHandler
from proxy.settings import ProxySettings
from proxy.state.base import DedupStore
from proxy.state.redis_store import RedisDedupStore
from proxy.upstream import HttpxUpstream, Upstream

log = logging.getLogger(__name__)


@dataclass
class RunningProxy:
    transport: asyncio.DatagramTransport
    protocol: CoapServerProtocol
    handler: ProxyHandler
    upstream: Upstream
    dedup: DedupStore | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    async def close(self) -> None:
        self.transport.close()
        await self.protocol.drain()
        await self.handler.drain()
        await self.upstream.aclose()
        if self.dedup is not None:
            await self.dedup.close()


async def start_proxy(
    settings: ProxySettings,
    *,
    upstream: Upstream | None = None,
    dedup: DedupStore | None = None,
    reuse_port: bool = False,
) -> RunningProxy:
    """Bind the CoAP port and start serving. ``reuse_port``: several worker processes share
    the port (SO_REUSEPORT); the kernel spreads datagrams by a hash of the source address, so
    one device keeps reaching the same worker while the worker count stays the same."""
    policy = load_policy(settings.policy)
    if upstream is None:
        upstream = HttpxUpstream(
            timeout=settings.upstream_timeout, max_connections=settings.upstream_connections
        )
    handler = ProxyHandler(
        policy=policy,
        upstream=upstream,
        base_url=settings.upstream,
        proxy_token=settings.proxy_token,
        max_payload=settings.max_payload,
        max_batch=settings.max_batch,
        batch_concurrency=settings.batch_concurrency,
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
