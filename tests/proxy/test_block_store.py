"""The BlockStore contract (proxy/state/blocks.py), run against both implementations: this
process's memory and a real redis-server (two store instances on one Redis stand for two
replicas)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from proxy.state.blocks import (
    AppendResult,
    BlockLimits,
    BlockStore,
    BlockStoreUnavailable,
    MemoryBlockStore,
    Outcome,
    RedisBlockStore,
)
from stores.keys import block_transfer_key
from tests.support.services import RedisServer, free_port

CONTINUE, COMPLETE = AppendResult(Outcome.CONTINUE), Outcome.COMPLETE
INCOMPLETE = AppendResult(Outcome.INCOMPLETE)
LIMITS = BlockLimits(max_body=1000, per_peer=2, total=4)
Factory = Callable[[BlockLimits], BlockStore]


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Factory]:
    stores: list[BlockStore] = []
    shared = MemoryBlockStore(LIMITS)  # "replicas" of the memory store share one process

    def factory(limits: BlockLimits) -> BlockStore:
        store: BlockStore
        if request.param == "memory":
            store = shared if limits == LIMITS else MemoryBlockStore(limits)
        else:
            store = RedisBlockStore.from_url(redis_server.url, prefix="t", limits=limits)
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.close()


async def test_blocks_in_order_complete_the_body(make: Factory) -> None:
    store = make(LIMITS)
    assert await store.append("a", "p", 0, b"0123", b"c0", False) == CONTINUE
    assert await store.append("a", "p", 4, b"4567", b"c0", False) == CONTINUE
    done = await store.append("a", "p", 8, b"89", b"c0", True)
    assert done == AppendResult(COMPLETE, b"0123456789")
    # Completed: the state is gone.
    assert await store.append("a", "p", 10, b"x", b"c0", True) == INCOMPLETE


async def test_another_replica_continues_the_transfer(make: Factory) -> None:
    one, two = make(LIMITS), make(LIMITS)
    assert await one.append("a", "p", 0, b"ab", b"", False) == CONTINUE
    assert await two.append("a", "p", 2, b"cd", b"", False) == CONTINUE
    assert await one.append("a", "p", 4, b"ef", b"", False) == CONTINUE
    assert await two.append("a", "p", 6, b"g", b"", True) == AppendResult(COMPLETE, b"abcdefg")


async def test_a_repeated_block_changes_nothing_wherever_it_arrives(make: Factory) -> None:
    one, two = make(LIMITS), make(LIMITS)
    await one.append("a", "p", 0, b"ab", b"", False)
    await one.append("a", "p", 2, b"cd", b"", False)
    assert await two.append("a", "p", 2, b"cd", b"", False) == CONTINUE
    assert await two.append("a", "p", 0, b"ab", b"", False) == CONTINUE
    assert await one.append("a", "p", 4, b"e", b"", True) == AppendResult(COMPLETE, b"abcde")


async def test_block_0_with_other_bytes_starts_over(make: Factory) -> None:
    store = make(LIMITS)
    await store.append("a", "p", 0, b"ab", b"", False)
    await store.append("a", "p", 2, b"cd", b"", False)
    assert await store.append("a", "p", 0, b"xy", b"", False) == CONTINUE
    assert await store.append("a", "p", 2, b"z", b"", True) == AppendResult(COMPLETE, b"xyz")


@pytest.mark.parametrize(
    ("offset", "data"),
    [
        pytest.param(4, b"ef", id="gap"),
        pytest.param(1, b"bX", id="overlap-with-other-bytes"),
        pytest.param(1, b"bcd", id="overlap-past-the-end"),
    ],
)
async def test_a_block_that_does_not_continue_is_incomplete(
    make: Factory, offset: int, data: bytes
) -> None:
    store = make(LIMITS)
    await store.append("a", "p", 0, b"ab", b"", False)
    assert await store.append("a", "p", offset, data, b"", False) == INCOMPLETE
    # The transfer is still there for the right block.
    assert await store.append("a", "p", 2, b"c", b"", True) == AppendResult(COMPLETE, b"abc")


async def test_no_transfer_is_incomplete_and_stores_nothing(make: Factory) -> None:
    store = make(LIMITS)
    for offset in range(16, 976, 16):
        assert await store.append("junk", "p", offset, b"x" * 16, b"", False) == INCOMPLETE
    assert await store.append("junk", "p", 1000, b"", b"", True) == INCOMPLETE


async def test_another_fingerprint_is_incomplete_and_drops_the_transfer(make: Factory) -> None:
    store = make(LIMITS)
    await store.append("a", "p", 0, b"ab", b"c0", False)
    assert await store.append("a", "p", 2, b"cd", b"c50", False) == INCOMPLETE
    assert await store.append("a", "p", 2, b"cd", b"c0", False) == INCOMPLETE


async def test_beyond_max_body_is_too_large_and_drops_the_transfer(make: Factory) -> None:
    store = make(LIMITS)
    await store.append("a", "p", 0, b"x" * 600, b"", False)
    too_large = await store.append("a", "p", 600, b"x" * 401, b"", False)
    assert too_large == AppendResult(Outcome.TOO_LARGE)
    assert await store.append("a", "p", 600, b"x" * 400, b"", True) == INCOMPLETE


async def test_a_peer_beyond_its_cap_loses_its_oldest_transfer(make: Factory) -> None:
    store = make(LIMITS)
    for name in ("a", "b", "c"):
        assert await store.append(name, "p", 0, b"ab", b"", False) == CONTINUE
    assert await store.append("a", "p", 2, b"c", b"", True) == INCOMPLETE  # evicted
    assert await store.append("b", "p", 2, b"c", b"", True) == AppendResult(COMPLETE, b"abc")
    assert await store.append("c", "p", 2, b"c", b"", True) == AppendResult(COMPLETE, b"abc")


async def test_beyond_the_total_cap_a_new_transfer_is_refused(make: Factory) -> None:
    store = make(LIMITS)
    for n in range(4):
        assert await store.append(f"t{n}", f"peer{n}", 0, b"ab", b"", False) == CONTINUE
    assert await store.append("t5", "peer5", 0, b"ab", b"", False) == AppendResult(Outcome.BUSY)
    # Transfers in progress go on.
    assert await store.append("t0", "peer0", 2, b"c", b"", True) == AppendResult(COMPLETE, b"abc")
    assert await store.append("t5", "peer5", 0, b"ab", b"", False) == CONTINUE


async def test_a_transfer_expires_after_its_lifetime(make: Factory) -> None:
    store = make(BlockLimits(max_body=1000, lifetime=0.2))
    await store.append("a", "p", 0, b"ab", b"", False)
    await asyncio.sleep(0.5)
    assert await store.append("a", "p", 2, b"c", b"", True) == INCOMPLETE


async def test_the_memory_store_counts_bytes_and_frees_them() -> None:
    now = [0.0]
    store = MemoryBlockStore(
        BlockLimits(max_body=100, per_peer=10, total=10, total_bytes=50, lifetime=10),
        clock=lambda: now[0],
    )
    assert await store.append("a", "p", 0, b"x" * 30, b"", False) == CONTINUE
    assert await store.append("b", "q", 0, b"x" * 30, b"", False) == AppendResult(Outcome.BUSY)
    assert await store.append("a", "p", 30, b"x" * 30, b"", False) == AppendResult(Outcome.BUSY)
    assert store.stored_bytes == 30
    now[0] = 11  # expired: the next append sweeps it
    assert await store.append("b", "q", 0, b"x" * 30, b"", False) == CONTINUE
    assert (store.transfers, store.stored_bytes) == (1, 30)


async def test_redis_keys_live_under_the_prefix_and_expire(redis_server: RedisServer) -> None:
    store = RedisBlockStore.from_url(redis_server.url, prefix="t", limits=LIMITS)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.append("a", "p", 0, b"ab", b"", False)
        keys = sorted(await client.keys("*"))
        assert keys
        assert all(key.startswith(b"t:{blk}:") for key in keys)
        ttl = await client.pttl(block_transfer_key("a", "t"))
        assert 0 < ttl <= LIMITS.lifetime * 1000
    finally:
        await client.aclose()
        await store.close()


async def test_redis_unreachable_is_reported_as_unavailable() -> None:
    store = RedisBlockStore.from_url(f"redis://127.0.0.1:{free_port()}/0", limits=LIMITS)
    try:
        with pytest.raises(BlockStoreUnavailable):
            await store.append("a", "p", 0, b"ab", b"", False)
    finally:
        await store.close()
