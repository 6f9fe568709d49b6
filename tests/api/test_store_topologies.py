"""The API's Redis users behind Redis Sentinel and Redis Cluster URLs (issue #4), on real
servers: the device store (its contract essentials and the PSK change announcements); the
Idempotency-Key ledger's: tests/stores/test_ledger_topologies.py.

Each test runs once per topology (``redis_topology``: ``tests/support/redis_topologies.py``):
a throwaway sentinel in front of the test's redis-server, and a throwaway 3-node cluster. On
the cluster every device key carries the ``{dev}`` hash tag, so the store's WATCH/MULTI/EXEC
transactions run on the one master that owns that slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from api.errors import DeviceExists, DeviceNotFound, IpInUse, StoreUnavailable
from api.store.base import Device
from api.store.redis_store import RedisDeviceStore
from stores.keys import device_set_key, psk_channel
from tests.support.redis_topologies import ClusterDeployment, SentinelDeployment, cli

PREFIX = "t"
A = "8988280666000000401"
B = "8988280666000000402"

Deployment = SentinelDeployment | ClusterDeployment


class Announcements:
    """One subscriber on every master: each announcement must reach all of them (on a
    Cluster, classic PUBLISH is broadcast to every node)."""

    def __init__(self, pubsubs: list[PubSub]) -> None:
        self._pubsubs = pubsubs

    async def next(self, timeout: float = 2.0) -> str:
        seen = {await self._next(pubsub, timeout) for pubsub in self._pubsubs}
        assert len(seen) == 1, f"the masters heard different announcements: {seen}"
        return seen.pop()

    @staticmethod
    async def _next(pubsub: PubSub, timeout: float) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            if message is not None:
                data = message["data"]
                return data.decode() if isinstance(data, bytes) else str(data)
        raise AssertionError(f"no PSK change announced within {timeout} s")

    async def assert_silent(self, timeout: float = 0.2) -> None:
        messages = await asyncio.gather(
            *(p.get_message(ignore_subscribe_messages=True, timeout=timeout) for p in self._pubsubs)
        )
        assert messages == [None] * len(messages), f"unexpected PSK announcements: {messages}"


@contextlib.asynccontextmanager
async def announcements(deployment: Deployment) -> AsyncIterator[Announcements]:
    clients = [Redis.from_url(url) for url in deployment.node_urls]
    pubsubs = [client.pubsub() for client in clients]
    try:
        for pubsub in pubsubs:
            await pubsub.subscribe(psk_channel(PREFIX))
            confirmation = await pubsub.get_message(timeout=2.0)
            assert confirmation is not None
            assert confirmation["type"] == "subscribe"
        yield Announcements(pubsubs)
    finally:
        for pubsub, client in zip(pubsubs, clients, strict=True):
            await pubsub.aclose()
            await client.aclose()


async def test_device_store_essentials(redis_topology: Deployment) -> None:
    store = RedisDeviceStore.from_url(redis_topology.url, prefix=PREFIX)
    try:
        async with announcements(redis_topology) as events:
            created = await store.create(Device(iccid=A, ip="10.0.0.1"))
            assert await store.get(A) == created
            assert await store.get_by_ip("10.0.0.1") == created
            assert await store.get(B) is None
            assert await store.get_by_ip("10.0.0.2") is None
            with pytest.raises(DeviceExists):
                await store.create(Device(iccid=A, ip="10.0.0.9"))
            with pytest.raises(IpInUse):
                await store.create(Device(iccid=B, ip="10.0.0.1"))
            await events.assert_silent()  # created without a key; failed writes say nothing

            updated = await store.update(A, ip="10.0.0.2", psk="first-key-0001")
            assert await events.next() == A
            assert await store.get(A) == updated
            assert await store.get_by_ip("10.0.0.1") is None
            assert await store.get_by_ip("10.0.0.2") == updated
            await store.create(Device(iccid=B, ip="10.0.0.1", psk="created-with-key"))
            assert await events.next() == B
            # The batch lookup is one script over {dev} keys: it must run on a Cluster too.
            both = await store.get_many_by_ip(["10.0.0.2", "10.0.0.3", "10.0.0.1"])
            assert both == [updated, None, await store.get(B)]
            assert [d.iccid for d in await store.list()] == [A, B]

            # Read-modify-write under contention: WATCH/MULTI/EXEC really conflict and retry.
            def bump(current: Device) -> Mapping[str, Any]:
                return {"bootstrap_window_calls": (current.bootstrap_window_calls or 0) + 1}

            await asyncio.gather(*(store.modify(A, bump) for _ in range(10)))
            device = await store.get(A)
            assert device is not None
            assert device.bootstrap_window_calls == 10
            await events.assert_silent()

            await store.delete(A)
            assert await events.next() == A
            assert await store.get(A) is None
            assert await store.get_by_ip("10.0.0.2") is None
            with pytest.raises(DeviceNotFound):
                await store.delete(A)
            assert [d.iccid for d in await store.list()] == [B]
    finally:
        await store.close()


async def test_device_store_follows_its_slot_to_a_new_master(
    redis_cluster: ClusterDeployment,
) -> None:
    # A resharding hands the {dev} slot to another master: the store's next command is told
    # MOVED, looks the owner up again and goes there, and the caller never notices.
    slot_key = device_set_key(PREFIX)
    store = RedisDeviceStore.from_url(redis_cluster.url, prefix=PREFIX)
    try:
        assert await store.get(A) is None  # the store now knows the current owner
        old = redis_cluster.owner(slot_key)
        new = next(port for port in redis_cluster.ports if port != old)
        redis_cluster.move_slot(slot_key, new)
        created = await store.create(Device(iccid=A, ip="10.0.0.1", psk="moved-key-0001"))
        assert await store.get_by_ip("10.0.0.1") == created
        assert cli(new, "SISMEMBER", slot_key, A).strip() == "1"
    finally:
        await store.close()


async def test_unreachable_deployment_is_store_unavailable(unreachable_url: str) -> None:
    # A Cluster client that reaches no node raises RedisClusterException (no RedisError).
    devices = RedisDeviceStore.from_url(unreachable_url, prefix=PREFIX)
    try:
        with pytest.raises(StoreUnavailable):
            await devices.get(A)
        with pytest.raises(StoreUnavailable):
            await devices.create(Device(iccid=A, ip="10.0.0.1"))
    finally:
        await devices.close()
