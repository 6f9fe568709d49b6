"""The command queue (stores/queue.py): one contract for every backend — in memory, in a real
redis-server, behind a real Sentinel and on a real 3-node Cluster (tests/support/
redis_topologies.py) — and what is particular to Redis: one slot per device, keys that expire
by themselves, an unreachable server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from stores.keys import command_keys
from stores.queue import (
    Command,
    CommandQueue,
    MemoryCommandQueue,
    QueueUnavailable,
    RedisCommandQueue,
    queue_for,
)
from tests.support.redis_topologies import ClusterDeployment, cli
from tests.support.services import RedisServer

PREFIX = "t"
NOW = 1_700_000_000.0
RETENTION = 3600.0
DEVICE = "8988280666000000001"
OTHER = "8988280666000000002"


def command(
    command_id: str,
    payload: bytes = b"{}",
    *,
    iccid: str = DEVICE,
    ttl: float = 600.0,
    created: float = NOW,
) -> Command:
    return Command(
        id=command_id,
        iccid=iccid,
        payload=payload,
        content_format=50,
        state="queued",
        created_at=created,
        expires_at=created + ttl,
    )


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def queue(request: pytest.FixtureRequest) -> AsyncIterator[CommandQueue]:
    if request.param == "memory":
        built: CommandQueue = MemoryCommandQueue(retention=RETENTION)
    else:
        fixture = "redis_server" if request.param == "redis" else f"redis_{request.param}"
        deployment = request.getfixturevalue(fixture)
        built = queue_for(deployment.url, prefix=PREFIX, retention=RETENTION)
        assert isinstance(built, RedisCommandQueue)
        assert built.cluster == (request.param == "cluster")
    yield built
    await built.close()


async def test_a_push_into_an_empty_queue_changes_the_head(queue: CommandQueue) -> None:
    first = await queue.push(command("a", b'{"x":1}'), limit=10, now=NOW)
    assert first.command is not None
    assert (first.command.id, first.command.state, first.command.size) == ("a", "queued", 7)
    assert first.head_changed
    second = await queue.push(command("b"), limit=10, now=NOW + 1)
    assert second.command is not None
    assert not second.head_changed  # behind "a": the head is the same


async def test_the_head_is_the_oldest_and_is_marked_sent_once(queue: CommandQueue) -> None:
    await queue.push(command("a", b"first"), limit=10, now=NOW)
    await queue.push(command("b", b"second"), limit=10, now=NOW)
    looked = await queue.head(DEVICE, now=NOW + 1, mark_sent=False)
    assert looked.command is not None
    assert (looked.command.id, looked.command.state, looked.sent_now) == ("a", "queued", False)
    sent = await queue.head(DEVICE, now=NOW + 2, mark_sent=True)
    assert sent.command is not None
    assert (sent.command.id, sent.command.payload, sent.command.state) == ("a", b"first", "sent")
    assert sent.sent_now
    assert sent.command.sent_at == NOW + 2
    again = await queue.head(DEVICE, now=NOW + 3, mark_sent=True)
    assert again.command is not None
    assert (again.command.id, again.sent_now, again.command.sent_at) == ("a", False, NOW + 2)
    assert not again.head_changed


async def test_only_the_head_can_be_acknowledged_and_then_the_next_one_is_head(
    queue: CommandQueue,
) -> None:
    for name in "abc":
        await queue.push(command(name, name.encode()), limit=10, now=NOW)
    assert (await queue.ack(DEVICE, "b", now=NOW + 1)).command is None  # not the head
    assert (await queue.ack(DEVICE, "zzz", now=NOW + 1)).command is None  # unknown
    done = await queue.ack(DEVICE, "a", now=NOW + 2)
    assert done.command is not None
    assert (done.command.state, done.command.delivered_at) == ("delivered", NOW + 2)
    assert done.head_changed
    assert (await queue.ack(DEVICE, "a", now=NOW + 3)).command is None  # delivered already
    head = await queue.head(DEVICE, now=NOW + 4, mark_sent=True)
    assert head.command is not None
    assert (head.command.id, head.command.payload) == ("b", b"b")
    last = await queue.ack(DEVICE, "b", now=NOW + 5)
    assert last.command is not None
    await queue.ack(DEVICE, "c", now=NOW + 6)
    empty = await queue.head(DEVICE, now=NOW + 7, mark_sent=True)
    assert empty.command is None
    assert not empty.head_changed


async def test_a_full_queue_refuses_until_one_is_delivered(queue: CommandQueue) -> None:
    assert (await queue.push(command("a"), limit=2, now=NOW)).command is not None
    assert (await queue.push(command("b"), limit=2, now=NOW)).command is not None
    full = await queue.push(command("c"), limit=2, now=NOW)
    assert full.command is None
    assert [c.id for c in (await queue.list(DEVICE, now=NOW)).commands] == ["a", "b"]
    await queue.ack(DEVICE, "a", now=NOW + 1)
    assert (await queue.push(command("c"), limit=2, now=NOW + 2)).command is not None


async def test_a_push_of_a_known_id_changes_nothing(queue: CommandQueue) -> None:
    await queue.push(command("a", b"one"), limit=10, now=NOW)
    again = await queue.push(command("a", b"other"), limit=10, now=NOW + 1)
    assert again.command is not None
    assert again.command.id == "a"
    assert not again.head_changed
    head = await queue.head(DEVICE, now=NOW + 2, mark_sent=False)
    assert head.command is not None
    assert head.command.payload == b"one"
    assert len((await queue.list(DEVICE, now=NOW + 2)).commands) == 1


async def test_an_expired_head_is_reported_once_and_the_next_one_takes_its_place(
    queue: CommandQueue,
) -> None:
    await queue.push(command("short", ttl=10), limit=10, now=NOW)
    await queue.push(command("long", ttl=1000), limit=10, now=NOW)
    await queue.head(DEVICE, now=NOW + 1, mark_sent=True)
    later = await queue.head(DEVICE, now=NOW + 10, mark_sent=True)  # expires_at is not later
    assert [(c.id, c.state, c.expires_at) for c in later.expired] == [
        ("short", "expired", NOW + 10)
    ]
    assert later.head_changed
    assert later.command is not None
    assert later.command.id == "long"
    assert (await queue.ack(DEVICE, "short", now=NOW + 11)).command is None
    quiet = await queue.list(DEVICE, now=NOW + 12)
    assert quiet.expired == ()
    assert [(c.id, c.state) for c in quiet.commands] == [("short", "expired"), ("long", "sent")]


async def test_a_command_behind_the_head_expires_without_changing_the_head(
    queue: CommandQueue,
) -> None:
    await queue.push(command("head", ttl=1000), limit=10, now=NOW)
    await queue.push(command("brief", ttl=5), limit=10, now=NOW)
    listed = await queue.list(DEVICE, now=NOW + 6)
    assert [c.id for c in listed.expired] == ["brief"]
    assert not listed.head_changed
    # An expired command frees its place in the queue.
    assert (await queue.push(command("next"), limit=2, now=NOW + 7)).command is not None


async def test_the_listing_is_oldest_first_with_states_and_times(queue: CommandQueue) -> None:
    for n, name in enumerate(["c1", "c2", "c3", "c4"]):
        await queue.push(command(name, b"x" * n, created=NOW + n), limit=10, now=NOW + n)
    await queue.head(DEVICE, now=NOW + 10, mark_sent=True)
    await queue.ack(DEVICE, "c1", now=NOW + 11)
    await queue.head(DEVICE, now=NOW + 12, mark_sent=True)
    listed = (await queue.list(DEVICE, now=NOW + 13)).commands
    assert [(c.id, c.state, c.size) for c in listed] == [
        ("c1", "delivered", 0),
        ("c2", "sent", 1),
        ("c3", "queued", 2),
        ("c4", "queued", 3),
    ]
    assert [c.created_at for c in listed] == [NOW, NOW + 1, NOW + 2, NOW + 3]
    assert (listed[0].sent_at, listed[0].delivered_at) == (NOW + 10, NOW + 11)
    assert (listed[1].sent_at, listed[1].delivered_at) == (NOW + 12, None)
    assert listed[2].sent_at is None
    assert all(c.payload == b"" for c in listed)  # listings carry no payloads
    assert all(c.content_format == 50 for c in listed)


async def test_finished_records_are_kept_for_the_retention_time_only(
    queue: CommandQueue,
) -> None:
    await queue.push(command("a"), limit=10, now=NOW)
    await queue.ack(DEVICE, "a", now=NOW + 1)
    kept = await queue.list(DEVICE, now=NOW + 1 + RETENTION - 1)
    assert [c.id for c in kept.commands] == ["a"]
    gone = await queue.list(DEVICE, now=NOW + 1 + RETENTION)
    assert gone.commands == ()


async def test_payloads_are_bytes_exactly(queue: CommandQueue) -> None:
    every_byte = bytes(range(256)) * 4
    await queue.push(command("bin", every_byte), limit=10, now=NOW)
    await queue.push(command("empty", b""), limit=10, now=NOW)
    head = await queue.head(DEVICE, now=NOW, mark_sent=True)
    assert head.command is not None
    assert head.command.payload == every_byte
    await queue.ack(DEVICE, "bin", now=NOW)
    empty = await queue.head(DEVICE, now=NOW, mark_sent=True)
    assert empty.command is not None
    assert (empty.command.id, empty.command.payload, empty.command.size) == ("empty", b"", 0)


async def test_devices_have_queues_of_their_own(queue: CommandQueue) -> None:
    await queue.push(command("mine"), limit=1, now=NOW)
    theirs = await queue.push(command("theirs", iccid=OTHER), limit=1, now=NOW)
    assert theirs.command is not None
    assert theirs.head_changed
    assert (await queue.ack(OTHER, "mine", now=NOW)).command is None
    head = await queue.head(OTHER, now=NOW, mark_sent=False)
    assert head.command is not None
    assert head.command.id == "theirs"


# --- Redis only -----------------------------------------------------------------------------


async def test_a_devices_keys_share_one_cluster_slot_and_devices_spread(
    redis_cluster: ClusterDeployment,
) -> None:
    queue = queue_for(redis_cluster.url, prefix=PREFIX, retention=RETENTION)
    try:
        iccids = [f"89882806660000{n:05d}" for n in range(40)]
        for iccid in iccids:
            await queue.push(command(f"c-{iccid}", iccid=iccid), limit=5, now=NOW)
        owners = set()
        for iccid in iccids:
            slots = {cli(redis_cluster.ports[0], "CLUSTER", "KEYSLOT", k).strip()
                     for k in command_keys(iccid, PREFIX)}  # fmt: skip
            assert len(slots) == 1
            owners.add(redis_cluster.owner(command_keys(iccid, PREFIX)[0]))
        assert len(owners) == len(redis_cluster.ports)  # the queues spread over every master
    finally:
        await queue.close()


async def test_a_devices_keys_expire_by_themselves(redis_server: RedisServer) -> None:
    queue = queue_for(redis_server.url, prefix=PREFIX, retention=RETENTION)
    try:
        await queue.push(command("a", ttl=600), limit=5, now=NOW)
        await queue.ack(DEVICE, "a", now=NOW + 1)
        records, pending, expiry, done = command_keys(DEVICE, PREFIX)
        assert int(cli(redis_server.port, "EXISTS", pending, expiry)) == 0  # emptied: gone
        for key in (records, done):
            ttl_ms = int(cli(redis_server.port, "PTTL", key))
            assert 0 < ttl_ms <= (RETENTION + 600) * 1000, key
        assert int(cli(redis_server.port, "HLEN", records)) == 2  # #seq, a
    finally:
        await queue.close()


async def test_an_unreachable_redis_is_queue_unavailable(redis_server: RedisServer) -> None:
    queue = queue_for(redis_server.url, prefix=PREFIX, timeout=1.0)
    redis_server.stop()
    try:
        with pytest.raises(QueueUnavailable):
            await queue.push(command("a"), limit=5, now=NOW)
        with pytest.raises(QueueUnavailable):
            await queue.head(DEVICE, now=NOW, mark_sent=True)
    finally:
        await queue.close()
