"""The API's Idempotency-Key records: one contract, in memory and in a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from api.errors import StoreUnavailable
from api.idempotency import IdempotencyStore, MemoryIdempotencyStore, RedisIdempotencyStore
from policies import dedup
from tests.support.services import RedisServer


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[IdempotencyStore]:
    if request.param == "memory":
        built: IdempotencyStore = MemoryIdempotencyStore()
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        built = RedisIdempotencyStore.from_url(redis_server.url, prefix="t")
    yield built
    await built.close()


async def test_claim_answer_release(store: IdempotencyStore) -> None:
    assert await store.claim(["a", "b", "a"]) == [dedup.OWNED, dedup.OWNED, dedup.BUSY]
    await store.settle([("a", b"204")], ["b"])
    assert await store.claim(["a", "b"]) == [b"204", dedup.OWNED]


async def test_release_never_drops_an_answer(store: IdempotencyStore) -> None:
    assert await store.claim(["k"]) == [dedup.OWNED]
    await store.settle([("k", b"204")], [])
    await store.settle([], ["k"])
    assert await store.claim(["k"]) == [b"204"]


async def test_redis_down_is_store_unavailable(redis_server: RedisServer) -> None:
    store = RedisIdempotencyStore.from_url(redis_server.url, prefix="t")
    try:
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await store.claim(["x"])
    finally:
        redis_server.start()
        await store.close()
