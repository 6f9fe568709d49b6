"""Observe relation records (stores/relations.py) in a real redis-server: who holds what, and a
replica that stops refreshing its liveness has its records dropped by the others."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from stores.redis import connect
from stores.relations import MemoryRelationRecords, RedisRelationRecords, RelationReader
from tests.support.redis_topologies import ClusterDeployment
from tests.support.services import RedisServer

PATH = "/commands/8988280666000000001"


def _replica(redis_server: RedisServer, heartbeat: float = 0.2) -> RedisRelationRecords:
    return RedisRelationRecords(
        connect(redis_server.url, timeout=2.0), prefix="t", heartbeat=heartbeat
    )


async def test_records_count_live_replicas_and_a_silent_one_is_dropped(
    redis_server: RedisServer,
) -> None:
    a, b = _replica(redis_server), _replica(redis_server)
    reader = RelationReader.from_url(redis_server.url, prefix="t")
    try:
        a.add("dev1|01", PATH)
        a.add("dev1|02", PATH)
        b.add("dev2|01", PATH)
        b.add("dev2|02", "/other")
        await a.sync()
        await b.sync()
        assert await reader.observers(PATH) == 3
        b.remove("dev2|01", PATH)
        await b.sync()
        assert await reader.observers(PATH) == 2
        # A dies: no more heartbeats. Its liveness lapses after three of them (0.6 s); until
        # another replica's heartbeat sweeps, its records are already not counted.
        await asyncio.sleep(0.8)
        assert await reader.observers(PATH) == 0
        assert await b.sync() == 2  # B's heartbeat drops A's two records
        assert redis_server.execute("EXISTS", f"t:{{obs}}:r:{a.replica}") == b":0\r\n"
        assert redis_server.execute("SCARD", f"t:{{obs}}:p:{PATH}") == b":0\r\n"
        assert await reader.observers("/other") == 1
    finally:
        await reader.close()
        await b.close()
        await a._connection.aclose()  # the "dead" replica's socket (its records are gone)
    # B's close takes its records with it.
    assert redis_server.execute("EXISTS", f"t:{{obs}}:r:{b.replica}") == b":0\r\n"


async def test_records_are_written_again_after_redis_lost_them(redis_server: RedisServer) -> None:
    a = _replica(redis_server)
    reader = RelationReader.from_url(redis_server.url, prefix="t")
    try:
        a.add("dev1|01", PATH)
        await a.sync()
        redis_server.stop()  # a restart without persistence: everything is gone
        assert await a.sync() == 0  # not written: remembered
        redis_server.start()
        await a.sync()
        assert await reader.observers(PATH) == 1
    finally:
        await reader.close()
        await a.close()


async def test_memory_records_count_what_was_added() -> None:
    records = MemoryRelationRecords()
    records.add("dev1|01", PATH)
    records.add("dev1|02", PATH)
    records.remove("dev1|01", PATH)
    assert await records.observers(PATH) == 1
    records.remove("dev1|02", PATH)
    assert await records.observers(PATH) == 0


async def test_records_on_a_cluster(redis_cluster: ClusterDeployment) -> None:
    # Every key carries the {obs} tag: one slot, so each step is one script on its master.
    a = RedisRelationRecords(connect(redis_cluster.url, timeout=2.0), prefix="t", heartbeat=0.2)
    reader = RelationReader.from_url(redis_cluster.url, prefix="t")
    try:
        a.add("dev1|01", PATH)
        await a.sync()
        assert await reader.observers(PATH) == 1
        a.remove("dev1|01", PATH)
        await a.sync()
        assert await reader.observers(PATH) == 0
    finally:
        await reader.close()
        await a.close()


async def test_a_removal_asked_while_redis_was_away_is_written_after(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _replica(redis_server)
    reader = RelationReader.from_url(redis_server.url, prefix="t")
    try:
        a.add("dev1|01", PATH)
        a.add("dev1|02", PATH)
        await a.sync()
        working = a._script

        async def unreachable(*args: object) -> object:
            raise RedisConnectionError("connection refused")

        monkeypatch.setattr(a, "_script", unreachable)
        assert await a.sync() == 0  # not written: everything held goes again next time
        a.remove("dev1|02", PATH)  # asked while Redis is away; its record is still there
        monkeypatch.setattr(a, "_script", working)
        await a.sync()
        assert await reader.observers(PATH) == 1
    finally:
        await reader.close()
        await a.close()
