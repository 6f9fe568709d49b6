"""The proxy's Redis users behind Redis Sentinel and Redis Cluster URLs (issue #4), on real
servers: the PSK mirror (the exactly-once ledger's: tests/stores/test_ledger_topologies.py).

Sentinel: one throwaway sentinel monitors the test's redis-server; the clients find the master
through it (``redis+sentinel://host:port/name``). Cluster: three throwaway redis-server nodes
made into a cluster by ``redis-cli --cluster create`` (``redis://seed/0?cluster=1``); the PSK
mirror reads the ``{dev}`` slot and hears announcements PUBLISHed on any node. Fixtures:
``tests/support/redis_topologies.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from policies.psk import psk_bytes
from proxy.state.psk import RedisPskMirror
from stores.keys import device_key, device_set_key, psk_channel
from tests.support.redis_topologies import ClusterDeployment, SentinelDeployment

PREFIX = "t"
A = "8988280666000000301"
B = "8988280666000000302"


@contextlib.asynccontextmanager
async def _writer(deployment: SentinelDeployment | ClusterDeployment) -> AsyncIterator[Any]:
    """A redis-py client that reaches every key of the deployment."""
    if isinstance(deployment, ClusterDeployment):
        client: Any = RedisCluster.from_url(deployment.seed)
    else:
        client = aioredis.Redis.from_url(deployment.node_urls[0])
    try:
        yield client
    finally:
        await client.aclose()


async def _eventually(check: Any, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not true in time"
        await asyncio.sleep(0.01)


async def test_psk_mirror_loads_and_follows_announcements(
    redis_topology: SentinelDeployment | ClusterDeployment,
) -> None:
    async with _writer(redis_topology) as writer:
        for identity, psk in ((A, "first-key-0001"), (B, "second-key-0002")):
            await writer.sadd(device_set_key(PREFIX), identity)
            await writer.hset(device_key(identity, PREFIX), "psk", psk)
        mirror = RedisPskMirror(redis_topology.url, prefix=PREFIX)
        changed: list[str] = []
        mirror.subscribe(changed.append)
        await mirror.start()
        try:
            assert mirror.connected
            assert (mirror.lookup(A), mirror.lookup(B)) == (
                psk_bytes("first-key-0001"),
                psk_bytes("second-key-0002"),
            )
            # A change announced from each master in turn: on a Cluster, classic PUBLISH is
            # broadcast, so the mirror's one subscription hears every node.
            for n, url in enumerate(redis_topology.node_urls):
                psk = f"changed-key-{n:04d}"
                await writer.hset(device_key(A, PREFIX), "psk", psk)
                node = aioredis.Redis.from_url(url)
                try:
                    await node.publish(psk_channel(PREFIX), A)
                finally:
                    await node.aclose()
                await _eventually(lambda psk=psk: mirror.lookup(A) == psk_bytes(psk))
            assert changed == [A] * len(redis_topology.node_urls)
            await writer.hdel(device_key(B, PREFIX), "psk")
            await writer.publish(psk_channel(PREFIX), B)
            await _eventually(lambda: mirror.lookup(B) is None)
            assert changed[-1] == B
        finally:
            await mirror.close()


async def test_an_unreachable_deployment_leaves_the_mirror_waiting(
    unreachable_url: str,
) -> None:
    # A Cluster client that reaches no node raises RedisClusterException (no RedisError):
    # it must not end the mirror's retry loop (the ledger's side: tests/stores/).
    mirror = RedisPskMirror(unreachable_url, prefix=PREFIX, reconnect_delay=0.05)
    await mirror.start(wait=0.2)
    try:
        assert not mirror.connected
        await asyncio.sleep(0.1)  # a few more attempts
        assert mirror._task is not None
        assert not mirror._task.done()
    finally:
        await mirror.close()
