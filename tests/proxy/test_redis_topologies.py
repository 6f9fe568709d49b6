"""The proxy's Redis users behind Redis Sentinel and Redis Cluster URLs (issue #4), on real
servers: the dedup store and the PSK mirror.

Sentinel: one throwaway sentinel monitors the test's redis-server; the clients find the master
through it (``redis+sentinel://host:port/name``). Cluster: three throwaway redis-server nodes
made into a cluster by ``redis-cli --cluster create`` (``redis://seed/0?cluster=1``); dedup
keys of one batch land on different slots, so the store runs the batch as a pipeline instead of
one script; the PSK mirror reads the ``{dev}`` slot and hears announcements PUBLISHed on any
node. Fixtures: ``tests/support/redis_topologies.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from policies.keys import dedup_key, device_key, device_set_key, psk_channel
from policies.psk import psk_bytes
from proxy.state.base import Claim, DedupUnavailable
from proxy.state.psk import RedisPskMirror
from proxy.state.redis_store import PipelineBatches, RedisDedupStore, ScriptBatches
from tests.support.redis_topologies import ClusterDeployment, SentinelDeployment

PREFIX = "t"
A = "8988280666000000301"
B = "8988280666000000302"


async def _exercise(store: RedisDedupStore) -> None:
    keys = [dedup_key("10.1.2.3", 40000 + n, n) for n in range(40)]  # spread over many slots
    try:
        assert {await store.claim(key, lease=5) for key in keys} == {Claim.OWNED}
        assert await store.claim(keys[0], lease=5) is Claim.BUSY
        for key in keys:
            store.complete(key, key.encode(), lifetime=5)
        await store.flush()
        assert [await store.claim(key, lease=5) for key in keys] == [k.encode() for k in keys]
    finally:
        await store.close()


async def test_sentinel_url_finds_the_master(redis_sentinel: SentinelDeployment) -> None:
    store = RedisDedupStore.from_url(redis_sentinel.url)
    assert isinstance(store._batches, ScriptBatches)  # redis-py follows the sentinels
    await _exercise(store)


async def test_cluster_url_spreads_keys_over_slots(redis_cluster: ClusterDeployment) -> None:
    store = RedisDedupStore.from_url(redis_cluster.url)
    assert isinstance(store._batches, PipelineBatches)  # scripts cannot span slots
    await _exercise(store)


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


async def test_unreachable_deployment_means_local_dedup_and_a_waiting_mirror(
    unreachable_url: str,
) -> None:
    # A Cluster client that reaches no node raises RedisClusterException (no RedisError):
    # it must still become DedupUnavailable, and must not end the mirror's retry loop.
    store = RedisDedupStore.from_url(unreachable_url)
    try:
        with pytest.raises(DedupUnavailable):
            await store.claim("k", lease=1)
    finally:
        await store.close()
    mirror = RedisPskMirror(unreachable_url, prefix=PREFIX, reconnect_delay=0.05)
    await mirror.start(wait=0.2)
    try:
        assert not mirror.connected
        await asyncio.sleep(0.1)  # a few more attempts
        assert mirror._task is not None
        assert not mirror._task.done()
    finally:
        await mirror.close()
