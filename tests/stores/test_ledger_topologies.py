"""The ledger (stores/ledger.py) behind Redis Sentinel and Redis Cluster URLs, on real servers
(fixtures: tests/support/redis_topologies.py). Behind a sentinel the batch script goes through
redis-py, which follows the sentinels to the master; on a Cluster the keys of one batch land on
different slots, so the batch is a pipeline of the same commands."""

from __future__ import annotations

import pytest

from stores.keys import dedup_key
from stores.ledger import Claim, ClientRunner, LedgerUnavailable, ScriptReads, redis_ledger
from tests.support.redis_topologies import ClusterDeployment, SentinelDeployment, cli

PREFIX = "t:led:"
Deployment = SentinelDeployment | ClusterDeployment


async def test_claim_record_release(redis_topology: Deployment) -> None:
    ledger = redis_ledger(redis_topology.url, prefix=PREFIX)
    assert isinstance(ledger._runner, ClientRunner)
    assert ledger.spans_slots == isinstance(redis_topology, ClusterDeployment)
    keys = [dedup_key("10.1.2.3", 40000 + n, n) for n in range(30)]  # spread over many slots
    try:
        assert await ledger.claim([*keys, keys[0]], 5) == [Claim.OWNED] * 30 + [Claim.BUSY]
        if isinstance(redis_topology, ClusterDeployment):
            # One batch, records on every master: the batch really spanned slots.
            assert all(int(cli(port, "DBSIZE")) > 0 for port in redis_topology.ports)
        for key in keys[:15]:
            ledger.record(key, key.encode(), 5)
        for key in keys[15:]:
            ledger.release(key)
        await ledger.flush()
        expected = [key.encode() for key in keys[:15]] + [Claim.OWNED] * 15
        assert await ledger.claim(keys, 5) == expected
        for key in keys:
            ledger.release(key)  # a release never drops an answer
        await ledger.flush()
        assert await ledger.claim(keys, 5) == expected
    finally:
        await ledger.close()


async def test_reads_with_claims_are_refused_where_a_script_cannot_span_slots(
    redis_cluster: ClusterDeployment,
) -> None:
    ledger = redis_ledger(redis_cluster.url, prefix=PREFIX)
    try:
        with pytest.raises(LedgerUnavailable):
            await ledger.claim_after(ScriptReads("", [], []), ["k"], 5)
    finally:
        await ledger.close()


async def test_an_unreachable_deployment_is_ledger_unavailable(unreachable_url: str) -> None:
    # A Cluster client that reaches no node raises RedisClusterException (no RedisError): it
    # must still become LedgerUnavailable (as MasterNotFoundError does behind a sentinel).
    ledger = redis_ledger(unreachable_url, prefix=PREFIX, retries=0)
    try:
        with pytest.raises(LedgerUnavailable):
            await ledger.claim(["k"], 1)
    finally:
        await ledger.close()
