"""stores/redis.py, the one redis-py factory of both sides: which client each kind of URL gives,
with which options, on real servers (one redis-server; a sentinel and a 3-node cluster from
tests/support/redis_topologies.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

from stores.redis import RedisConnection, SlotClient, connect
from stores.redis_url import RedisTarget, parse_redis_url
from tests.support.redis_topologies import ClusterDeployment, SentinelDeployment
from tests.support.services import RedisServer, free_port


@contextlib.asynccontextmanager
async def opened(url: str | RedisTarget, **options: Any) -> AsyncIterator[RedisConnection]:
    connection = connect(url, **options)
    try:
        yield connection
    finally:
        await connection.aclose()


async def _round_trip(connection: RedisConnection, key: str = "k") -> None:
    client: Any = connection.client
    await client.set(key, b"v", px=5000)
    assert await client.get(key) == b"v"


async def test_one_server_gets_a_plain_client_with_the_options_asked(
    redis_server: RedisServer,
) -> None:
    async with opened(
        redis_server.url, timeout=1.5, connect_timeout=0.5, retries=2, health_check_interval=3
    ) as connection:
        assert isinstance(connection.client, Redis)
        assert not connection.cluster
        assert connection.sentinels == []
        options = connection.client.connection_pool.connection_kwargs
        assert options["socket_timeout"] == 1.5
        assert options["socket_connect_timeout"] == 0.5
        assert options["health_check_interval"] == 3
        assert options["decode_responses"] is False
        assert options["retry"].get_retries() == 2
        await _round_trip(connection)


async def test_retries_none_keeps_the_library_schedule_and_decoding_is_a_choice(
    redis_server: RedisServer,
) -> None:
    async with opened(
        redis_server.url, timeout=1.0, retries=None, decode_responses=True
    ) as connection:
        options = connection.client.connection_pool.connection_kwargs
        assert "retry" not in options
        assert "health_check_interval" not in options  # the library's default
        assert options["socket_connect_timeout"] == 1.0  # the command timeout, unless asked
        await connection.client.set("k", b"v", px=5000)
        assert await connection.client.get("k") == "v"


async def test_a_parsed_target_is_taken_as_well_as_a_url(redis_server: RedisServer) -> None:
    async with opened(parse_redis_url(redis_server.url), timeout=1.0) as connection:
        await _round_trip(connection)


async def test_rediss_gets_tls_connections() -> None:
    # Nothing connects until the first command: the client's kind is visible without a server.
    async with opened(f"rediss://127.0.0.1:{free_port()}/0", timeout=1.0) as connection:
        assert connection.client.connection_pool.connection_class is SSLConnection


def test_a_malformed_url_fails_when_the_client_is_built() -> None:
    with pytest.raises(ValueError, match="service name"):
        connect("redis+sentinel://127.0.0.1:26379", timeout=1.0)


async def test_sentinel_url_gives_the_master_and_the_sentinels_own_clients(
    redis_sentinel: SentinelDeployment,
) -> None:
    async with opened(redis_sentinel.url, timeout=1.0, retries=1) as connection:
        assert isinstance(connection.client, Redis)
        assert not connection.cluster
        assert len(connection.sentinels) == 1
        # The sentinels' clients get the same timeouts and retries as the master's.
        sentinel = connection.sentinels[0].connection_pool.connection_kwargs
        assert (sentinel["port"], sentinel["socket_timeout"]) == (redis_sentinel.port, 1.0)
        assert sentinel["retry"].get_retries() == 1
        await _round_trip(connection)
        master = Redis.from_url(redis_sentinel.node_urls[0])
        try:
            assert await master.get("k") == b"v"  # it found the master
        finally:
            await master.aclose()


async def test_cluster_url_gives_a_cluster_client_that_keeps_its_own_retries(
    redis_cluster: ClusterDeployment,
) -> None:
    async with opened(redis_cluster.url, timeout=1.0, retries=0) as connection:
        assert isinstance(connection.client, RedisCluster)
        assert connection.cluster
        assert "retry" not in connection.client.nodes_manager.connection_kwargs
        for n in range(20):  # keys on many slots, so on every node
            await _round_trip(connection, f"k{n}")


async def test_slot_client_on_a_cluster_talks_to_the_slot_owner(
    redis_cluster: ClusterDeployment,
) -> None:
    slot = SlotClient(redis_cluster.url, "{dev}:all", timeout=1.0)
    try:
        assert slot.cluster
        client = await slot.client()
        assert client.connection_pool.connection_kwargs["port"] == redis_cluster.owner("{dev}")
        await client.set("{dev}:x", b"1", px=5000)
        assert await client.get("{dev}:x") == b"1"
    finally:
        await slot.aclose()


async def test_slot_client_on_one_server_is_that_servers_client(
    redis_server: RedisServer,
) -> None:
    slot = SlotClient(redis_server.url, "{dev}:all", timeout=1.0, decode_responses=True)
    try:
        assert not slot.cluster
        client = await slot.client()
        await client.set("{dev}:x", "1", px=5000)
        assert await client.get("{dev}:x") == "1"
    finally:
        await slot.aclose()


async def test_more_calls_at_once_than_the_pool_holds_wait_for_a_connection(
    redis_server: RedisServer,
) -> None:
    # redis-py's own pool raises "Too many connections" beyond its limit: a 503 under load.
    from stores.redis import MAX_CONNECTIONS

    connection = connect(redis_server.url, timeout=5.0)
    try:
        client = connection.client
        # Each BLPOP holds its connection for a moment, so the calls really overlap.
        calls = [client.blpop([f"t:none:{n}"], timeout=0.2) for n in range(MAX_CONNECTIONS + 50)]
        assert await asyncio.gather(*calls) == [None] * (MAX_CONNECTIONS + 50)
    finally:
        await connection.aclose()
