"""The firmware store (stores/firmware.py): one contract for memory, a real redis-server and a
real 3-node Cluster; and what is particular to Redis: a range reads only the chunks it covers,
an upload is invisible until its one switch, the old copy goes with it, leftovers expire."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stores.firmware import (
    CHUNK_SIZE,
    FirmwareChanged,
    FirmwareStore,
    FirmwareUnavailable,
    MemoryFirmwareStore,
    RedisFirmwareStore,
    firmware_store_for,
    valid_version,
)
from tests.support.redis_topologies import cli
from tests.support.services import RedisServer

PREFIX = "t"
NOW = 1_700_000_000.0
IMAGE = os.urandom(3 * CHUNK_SIZE + 123)
OTHER = os.urandom(CHUNK_SIZE + 7)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[FirmwareStore]:
    if request.param == "memory":
        built: FirmwareStore = MemoryFirmwareStore()
    else:
        fixture = "redis_server" if request.param == "redis" else f"redis_{request.param}"
        deployment = request.getfixturevalue(fixture)
        built = firmware_store_for(deployment.url, prefix=PREFIX)
        assert isinstance(built, RedisFirmwareStore)
        assert built.cluster == (request.param == "cluster")
    yield built
    await built.close()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisFirmwareStore]:
    built = firmware_store_for(redis_server.url, prefix=PREFIX)
    assert isinstance(built, RedisFirmwareStore)
    yield built
    await built.close()


@pytest.mark.parametrize(
    ("version", "valid"),
    [
        ("1.2.3", True),
        ("v1_rc-2", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        (".hidden", False),
        ("..", False),
        ("a/b", False),
        ("a b", False),
        ("a{b}", False),
        ("é", False),
    ],
)
def test_version_names(version: str, valid: bool) -> None:
    assert valid_version(version) is valid


async def test_an_image_comes_back_whole_and_its_metadata_is_right(store: FirmwareStore) -> None:
    stored, replaced = await store.put("1.0.0", IMAGE, now=NOW)
    assert not replaced
    assert (stored.version, stored.size, stored.sha256, stored.created_at) == (
        "1.0.0",
        len(IMAGE),
        hashlib.sha256(IMAGE).hexdigest(),
        NOW,
    )
    found = await store.get("1.0.0")
    assert found == stored
    assert await store.read(found, 0, len(IMAGE) - 1) == IMAGE


@pytest.mark.parametrize(
    ("first", "last"),
    [
        (0, 0),
        (0, 1023),
        (CHUNK_SIZE - 1, CHUNK_SIZE),  # across one border
        (CHUNK_SIZE - 10, 2 * CHUNK_SIZE + 10),  # one whole chunk and two pieces
        (CHUNK_SIZE, 2 * CHUNK_SIZE - 1),  # exactly one chunk
        (3 * CHUNK_SIZE, 3 * CHUNK_SIZE + 122),  # the short last chunk, whole
        (len(IMAGE) - 1, len(IMAGE) - 1),
    ],
)
async def test_ranges_across_chunk_borders(store: FirmwareStore, first: int, last: int) -> None:
    stored, _ = await store.put("r", IMAGE, now=NOW)
    assert await store.read(stored, first, last) == IMAGE[first : last + 1]


async def test_a_range_outside_the_image_is_a_programming_error(store: FirmwareStore) -> None:
    stored, _ = await store.put("r", OTHER, now=NOW)
    for first, last in [(-1, 3), (5, 4), (0, len(OTHER))]:
        with pytest.raises(ValueError, match="outside an image"):
            await store.read(stored, first, last)


async def test_unknown_versions(store: FirmwareStore) -> None:
    assert await store.get("nope") is None
    assert not await store.delete("nope")
    assert await store.list() == []


async def test_a_replacement_is_seen_whole_and_the_old_copy_is_gone(store: FirmwareStore) -> None:
    old, _ = await store.put("2.0", IMAGE, now=NOW)
    new, replaced = await store.put("2.0", OTHER, now=NOW + 5)
    assert replaced
    assert new.sha256 != old.sha256
    assert new.generation != old.generation
    assert await store.get("2.0") == new
    assert await store.read(new, 0, len(OTHER) - 1) == OTHER
    # A reader still holding the old metadata learns that it changed: it never gets a mix.
    with pytest.raises(FirmwareChanged):
        await store.read(old, 0, 1023)


async def test_list_and_delete(store: FirmwareStore) -> None:
    await store.put("b", OTHER, now=NOW)
    a, _ = await store.put("a", IMAGE, now=NOW + 1)
    assert [(f.version, f.size) for f in await store.list()] == [
        ("a", len(IMAGE)),
        ("b", len(OTHER)),
    ]
    assert await store.delete("a")
    assert await store.get("a") is None
    with pytest.raises(FirmwareChanged):
        await store.read(a, 0, 10)
    assert [f.version for f in await store.list()] == ["b"]
    assert not await store.delete("a")


# --- Redis only -----------------------------------------------------------------------------


def _stats(port: int) -> dict[str, int]:
    text = cli(port, "INFO", "commandstats")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"cmdstat_(\w+):calls=(\d+)", text)}


def _keys(port: int) -> list[str]:
    return sorted(cli(port, "--scan", "--pattern", f"{PREFIX}:*").split())


async def test_a_block_reads_only_the_chunk_slice_it_covers(
    redis_store: RedisFirmwareStore, redis_server: RedisServer
) -> None:
    big = os.urandom(16 * CHUNK_SIZE)  # 1 MiB
    stored, _ = await redis_store.put("big", big, now=NOW)
    cli(redis_server.port, "CONFIG", "RESETSTAT")
    assert await redis_store.read(stored, 5 * 1024, 6 * 1024 - 1) == big[5 * 1024 : 6 * 1024]
    stats = _stats(redis_server.port)
    # One GETRANGE of 1 KiB; nothing read the image or a whole chunk.
    assert stats.get("getrange") == 1
    assert "get" not in stats
    assert "mget" not in stats


async def test_an_upload_is_invisible_until_its_switch(
    redis_store: RedisFirmwareStore, redis_server: RedisServer
) -> None:
    old, _ = await redis_store.put("3.0", OTHER, now=NOW)
    real: Any = redis_store._commit
    seen: list[object] = []

    async def spying_commit(**kwargs: Any) -> Any:
        # Every chunk of the new copy is written by now; readers still get the old one.
        seen.append(await redis_store.get("3.0"))
        seen.append(await redis_store.read(old, 0, len(OTHER) - 1))
        return await real(**kwargs)

    redis_store._commit = spying_commit
    new, _ = await redis_store.put("3.0", IMAGE, now=NOW + 1)
    assert seen == [old, OTHER]
    assert await redis_store.read(new, 0, len(IMAGE) - 1) == IMAGE
    # The old copy's chunks went with the switch; the new ones no longer expire.
    keys = _keys(redis_server.port)
    assert not [k for k in keys if old.generation in k]
    chunks = [k for k in keys if new.generation in k]
    assert len(chunks) == 4
    assert {cli(redis_server.port, "PTTL", k).strip() for k in chunks} == {"-1"}


async def test_an_abandoned_upload_leaves_only_expiring_chunks(
    redis_store: RedisFirmwareStore, redis_server: RedisServer
) -> None:
    async def dying_commit(**kwargs: Any) -> Any:
        raise ConnectionError("uploader died")

    redis_store._commit = dying_commit
    with pytest.raises(FirmwareUnavailable):
        await redis_store.put("4.0", IMAGE, now=NOW)
    assert await redis_store.get("4.0") is None
    keys = _keys(redis_server.port)
    assert len(keys) == 4
    assert all(int(cli(redis_server.port, "PTTL", k)) > 0 for k in keys)


async def test_a_chunk_that_expired_before_the_switch_fails_the_upload(
    redis_store: RedisFirmwareStore, redis_server: RedisServer
) -> None:
    real: Any = redis_store._commit

    async def slow_commit(**kwargs: Any) -> Any:
        cli(redis_server.port, "DEL", kwargs["keys"][2])  # as if its expiry had passed
        return await real(**kwargs)

    redis_store._commit = slow_commit
    with pytest.raises(FirmwareUnavailable, match="chunk 1 of the upload expired"):
        await redis_store.put("5.0", IMAGE, now=NOW)
    assert await redis_store.get("5.0") is None


async def test_an_unreachable_server_is_unavailable(
    redis_store: RedisFirmwareStore, redis_server: RedisServer
) -> None:
    stored, _ = await redis_store.put("6.0", OTHER, now=NOW)
    redis_server.stop()
    with pytest.raises(FirmwareUnavailable):
        await redis_store.get("6.0")
    with pytest.raises(FirmwareUnavailable):
        await redis_store.read(stored, 0, 10)
    with pytest.raises(FirmwareUnavailable):
        await redis_store.put("6.1", OTHER, now=NOW)
    with pytest.raises(FirmwareUnavailable):
        await redis_store.list()
    with pytest.raises(FirmwareUnavailable):
        await redis_store.delete("6.0")
