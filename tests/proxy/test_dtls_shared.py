"""Issue 19, part 2: DTLS sessions that outlive their replica, shared through Redis.

Real redis-server (tests/support/services.py), real DTLS transports on our tinydtls build, and
the RFC-written client of tests/support/dtls_cid_client.py. Two transports in one process play
two replicas (each with its own connection to the one Redis); the revocation test runs two
whole proxies (``start_proxy`` with ``redis_url``: PSKs mirrored from Redis).

- A CID session is in Redis as soon as its handshake completes: the replica that made it can
  die without a word, and the client's next record, sent to another replica, is answered there
  with no handshake, with sequence numbers from that replica's own claim.
- A record the first replica had received (and written back) is refused by the second.
- A changed PSK: stored sessions are deleted, and one written with the old key is refused.
- Junk CIDs cost one Redis lookup each per negative-cache period.
- A small claim span: the holder claims the next range in time, notices a takeover, and never
  sends past its range when Redis cannot confirm a new one.
- A client without CID is not stored at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import options as opt
from proxy.coap.codec import CON, decode, encode_parts
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from proxy.state.psk import MemoryPskStore, PskStore
from proxy.transports.dtls import CID_LENGTH, DtlsTransport, create_dtls_endpoint
from stores.dtls_sessions import RedisDtlsSessionStore, dtls_sessions_for
from stores.keys import device_key, device_set_key, dtls_session_key, psk_channel
from tests.support import dtls_cid_client
from tests.support.dtls_cid_client import (
    CT_APPLICATION_DATA,
    CT_TLS12_CID,
    BoundPorts,
    CidClient,
    DtlsAlert,
    DtlsTimeout,
)
from tests.support.http import serve_app
from tests.support.services import RedisServer

PREFIX = "t"
CONTENT = 69  # 2.05


def new_device() -> tuple[str, str]:
    return f"dev-{secrets.token_hex(4)}", secrets.token_hex(8)


def port_of(transport: Any) -> int:
    return int(transport.get_extra_info("sockname")[1])


def seq_of(record: bytes) -> int:
    return int.from_bytes(record[5:11], "big")


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Polls until ``check()`` is true (a deadline for a stuck test, not a timing claim)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.01)


async def eventually_async(check: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.01)


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, transport: DtlsTransport, name: bytes) -> None:
        self._transport, self._name = transport, name

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._transport.sendto(self._name + b":" + data, addr)


@contextlib.asynccontextmanager
async def replica(
    redis_url: str, psks: PskStore, name: bytes, *, span: int = 1 << 20
) -> AsyncIterator[DtlsTransport]:
    """One replica: a DTLS echo server with its own connection to the shared Redis."""
    store = dtls_sessions_for(redis_url, PREFIX, span=span)
    transport, _ = await create_dtls_endpoint(
        lambda t: _Echo(t, name),
        psk_store=psks,
        host="127.0.0.1",
        port=0,
        session_store=store,
    )
    try:
        yield transport
    finally:
        transport.close()
        await store.close()


@pytest.fixture
def heard(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every datagram the test clients receive, raw (the server's record headers)."""
    seen: list[bytes] = []
    original = dtls_cid_client._Socket.datagram_received

    def recording(self: Any, data: bytes, addr: tuple[str, int]) -> None:
        seen.append(data)
        original(self, data, addr)

    monkeypatch.setattr(dtls_cid_client._Socket, "datagram_received", recording)
    return seen


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def connected(transport: DtlsTransport, identity: str, psk: str, offer: bytes | None):
    client = CidClient(identity.encode(), psk.encode(), offer_cid=offer)
    await client.connect("127.0.0.1", port_of(transport))
    return client


def session_key(cid: bytes) -> str:
    return dtls_session_key(cid.hex(), PREFIX)


async def test_a_session_continues_on_another_replica_after_the_first_dies(
    redis_server: RedisServer, redis_client: aioredis.Redis, heard: list[bytes]
) -> None:
    identity, psk = new_device()
    psks = MemoryPskStore({identity: psk})
    async with (
        replica(redis_server.url, psks, b"A") as a,
        replica(redis_server.url, psks, b"B") as b,
    ):
        client = await connected(a, identity, psk, b"\x0a\x0b")
        try:
            cid = client.negotiated_cid
            assert cid is not None
            assert await client.request(b"one") == b"A:one"
            # The last record A receives; it has to be written back before A dies.
            last = client.seal(CT_APPLICATION_DATA, b"two")
            client.send_raw(last)
            assert await client.recv() == b"A:two"
            await eventually(lambda: a.stats.saved == 1)
            key = session_key(cid)
            await eventually_async(
                lambda: _field_at_least(redis_client, key, "received", 1 << 48 | seq_of(last))
            )
            from_a = [seq_of(d) for d in heard if d[0] == CT_TLS12_CID]
            a.abort()  # as a crash: nothing sent, nothing exported now
            assert client.stats.records_dropped == 0

            heard.clear()
            await client.rebind(server=("127.0.0.1", port_of(b)))
            assert await client.request(b"three") == b"B:three"
            # A record A had received, replayed to B: refused there, not answered.
            client.send_raw(last)
            assert await client.request(b"four") == b"B:four"
            assert client.stats.handshakes == 1
            assert (b.stats.handshakes, b.stats.imported, b.stats.lookups) == (0, 1, 1)
            assert len(heard) == 2  # the two answers, nothing for the replay
            from_b = [seq_of(d) for d in heard]
            span = 1 << 20
            # B's claim is the range after A's: [span, 2 span); A used the first one only.
            assert from_b == [span, span + 1]
            assert max(from_a) < span
            assert b.cid_of(("127.0.0.1", client.local_port)) == cid
        finally:
            client.close()


async def _field_at_least(client: aioredis.Redis, key: str, name: str, value: int) -> bool:
    raw = await client.hget(key, name)
    return raw is not None and int(raw) >= value


async def test_a_replayed_first_record_imports_nothing(
    redis_server: RedisServer, heard: list[bytes]
) -> None:
    identity, psk = new_device()
    psks = MemoryPskStore({identity: psk})
    async with (
        replica(redis_server.url, psks, b"A") as a,
        replica(redis_server.url, psks, b"B") as b,
    ):
        client = await connected(a, identity, psk, b"")
        try:
            old = client.seal(CT_APPLICATION_DATA, b"one")
            client.send_raw(old)
            assert await client.recv() == b"A:one"
            await eventually(lambda: a.stats.touches >= 1)
            heard.clear()
            await client.rebind(server=("127.0.0.1", port_of(b)))
            client.send_raw(old)  # at or below the written-back number
            await eventually(lambda: b.stats.import_unauthenticated == 1)
            assert b.stats.imported == 1
            assert b.session_count == 0
            assert heard == []
        finally:
            client.close()


async def _retransmitting(client: CidClient, data: bytes) -> bytes:
    """A request sent again until answered, as a device does (RFC 7252 §4.2; a deadline for a
    stuck test, not a timing claim)."""
    for _ in range(4):
        with contextlib.suppress(DtlsTimeout):
            return await client.request(data, timeout=1.5)
    raise AssertionError(f"{data!r} not answered")


@pytest.mark.parametrize("victim_offer", [b"", None], ids=["cid-victim", "no-cid-victim"])
async def test_an_import_displaces_a_session_at_its_address_only_once_it_authenticated(
    redis_server: RedisServer, victim_offer: bytes | None
) -> None:
    (identity, psk), (victim, victim_psk) = new_device(), new_device()
    psks = MemoryPskStore({identity: psk, victim: victim_psk})
    async with (
        replica(redis_server.url, psks, b"A") as a,
        replica(redis_server.url, psks, b"B") as b,
    ):
        client = await connected(a, identity, psk, b"")
        ports = BoundPorts()
        v = CidClient(victim.encode(), victim_psk.encode(), offer_cid=victim_offer,
                      socket_factory=ports)  # fmt: skip
        try:
            old = client.seal(CT_APPLICATION_DATA, b"one")
            client.send_raw(old)
            assert await client.recv() == b"A:one"
            await eventually(lambda: a.stats.touches >= 1)
            await v.connect("127.0.0.1", port_of(b))
            assert await v.request(b"v1") == b"B:v1"
            victim_at = v.local_port
            # A replay of the client's record, sent from the victim's address (as a spoofer
            # would): looked up, imported, refused, and gone again; the victim's session
            # is untouched (RFC 9146 §6).
            v.send_raw(old)
            await eventually(lambda: b.stats.import_unauthenticated == 1)
            assert await v.request(b"v2") == b"B:v2"
            assert b.identity_of(("127.0.0.1", victim_at)) == victim
            assert (b.session_count, b.stats.parked, b.stats.address_updates) == (1, 0, 0)
            # Then a NAT really gives the victim's port to the client's device, whose next
            # record reaches B: imported, authenticated, moved there. The victim's session is
            # parked (CID) or, found by that address only, stale and evicted.
            await v.rebind()
            await asyncio.sleep(0)  # (asyncio closes the old socket on the next loop pass)
            ports.port = victim_at
            client._socket_factory = ports
            await client.rebind(server=("127.0.0.1", port_of(b)))
            assert client.local_port == victim_at
            # (B does not ask Redis for that CID again for 2 s after the replay: the device's
            # retransmission after that is answered.)
            assert await _retransmitting(client, b"two") == b"B:two"
            assert b.identity_of(("127.0.0.1", victim_at)) == identity
            assert (b.stats.imported, b.stats.handshakes) == (2, 1)
            if victim_offer is None:
                assert (b.session_count, b.stats.parked) == (1, 0)
                return
            assert (b.session_count, b.stats.parked) == (2, 1)
            assert await v.request(b"v3") == b"B:v3"  # from its new port, by CID
            assert b.identity_of(("127.0.0.1", v.local_port)) == victim
            assert (client.stats.handshakes, v.stats.handshakes) == (1, 1)
        finally:
            client.close()
            v.close()


async def test_a_changed_psk_deletes_and_refuses_stored_sessions(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    identity, psk = new_device()
    psks_a = MemoryPskStore({identity: psk})
    # B's mirror already has the new key, A's has not heard of the change yet.
    psks_b = MemoryPskStore({identity: "a-new-key"})
    async with (
        replica(redis_server.url, psks_a, b"A") as a,
        replica(redis_server.url, psks_b, b"B") as b,
    ):
        client = await connected(a, identity, psk, b"\x01")
        try:
            assert client.negotiated_cid is not None
            key = session_key(client.negotiated_cid)
            assert await client.request(b"one") == b"A:one"
            await eventually(lambda: a.stats.saved == 1)
            assert await redis_client.exists(key) == 1
            await client.rebind(server=("127.0.0.1", port_of(b)))
            with pytest.raises(DtlsTimeout):
                await client.request(b"two", timeout=0.5)
            assert (b.stats.import_refused, b.stats.imported) == (1, 0)
            await eventually_async(lambda: _gone(redis_client, key))

            # And a change announced to a replica deletes what is stored at once.
            other, other_psk = new_device()
            psks_a.set(other, other_psk)
            second = await connected(a, other, other_psk, b"\x02")
            try:
                assert second.negotiated_cid is not None
                stored = session_key(second.negotiated_cid)
                await eventually(lambda: a.stats.saved == 2)
                assert await redis_client.exists(stored) == 1
                psks_a.set(other, "changed")
                await eventually_async(lambda: _gone(redis_client, stored))
                assert a.stats.closed_psk_change == 1
            finally:
                second.close()
        finally:
            client.close()


async def _gone(client: aioredis.Redis, key: str) -> bool:
    return await client.exists(key) == 0


async def test_junk_cids_cost_one_lookup_per_negative_cache_period(
    redis_server: RedisServer,
) -> None:
    async with replica(redis_server.url, MemoryPskStore({}), b"B") as b:
        loop = asyncio.get_running_loop()
        sender, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port_of(b))
        )
        try:
            cids = [secrets.token_bytes(CID_LENGTH) for _ in range(3)]

            def junk(cid: bytes) -> bytes:
                body = secrets.token_bytes(40)
                return (
                    bytes([CT_TLS12_CID])
                    + b"\xfe\xfd\x00\x01"
                    + secrets.token_bytes(6)
                    + cid
                    + len(body).to_bytes(2, "big")
                    + body
                )

            for _ in range(4):
                for cid in cids:
                    sender.sendto(junk(cid))
            await eventually(lambda: b.stats.dropped_unknown_cid == 12)
            assert b.stats.lookups == 3
            for cid in cids:
                sender.sendto(junk(cid))
            await eventually(lambda: b.stats.dropped_unknown_cid == 15)
            assert b.stats.lookups == 3  # the negative cache answered
            assert b.session_count == 0
        finally:
            sender.close()


async def test_the_holder_claims_ranges_in_time_and_lets_a_taken_over_session_go(
    redis_server: RedisServer, redis_client: aioredis.Redis, heard: list[bytes]
) -> None:
    identity, psk = new_device()
    psks = MemoryPskStore({identity: psk})
    span = 8
    async with replica(redis_server.url, psks, b"A", span=span) as a:
        client = await connected(a, identity, psk, b"\x03")
        try:
            cid = client.negotiated_cid
            assert cid is not None
            key = session_key(cid)
            await eventually(lambda: a.stats.saved == 1)
            for i in range(3 * span):
                assert await client.request(b"%d" % i) == b"A:%d" % i
                sent = i + 1  # the answer's sequence number (the Finished was 0)
                if sent % span == span // 2:
                    # Half the range used: the next one is being claimed. (Waited for here:
                    # a device sends far slower than this loop, which could otherwise outrun
                    # a Redis round trip.)
                    ceiling = (sent // span + 2) * span
                    await eventually_async(
                        lambda c=ceiling: _field_at_least(redis_client, key, "ceiling", c)
                    )
            # The Finished (0) and 3 span answers: past three ranges without a gap, so each
            # next range was claimed in time.
            sent_seqs = [seq_of(d) for d in heard if d[0] == CT_TLS12_CID]
            assert sent_seqs == list(range(3 * span + 1))
            assert a.stats.seq_exhausted == a.stats.taken_over == 0
            # Another replica claims the session: A notices at its next claim and lets go.
            other = dtls_sessions_for(redis_server.url, PREFIX, span=span)
            try:
                taken = await other.claim(cid, 60.0)
            finally:
                await other.close()
            assert taken is not None
            # A's range ends at 4 span; its next claim starts at 3.5 span.
            for i in range(span // 2):
                assert await client.request(b"x%d" % i) == b"A:x%d" % i
            await eventually(lambda: a.stats.taken_over == 1)
            assert a.stats.seq_exhausted == 0
            # The device's next record: A no longer has it, claims it from Redis again and
            # continues in a fresh range above the other replica's.
            heard.clear()
            assert await client.request(b"back") == b"A:back"
            assert a.stats.imported == 1
            assert seq_of(heard[-1]) >= taken.ceiling
            assert client.stats.handshakes == 1
        finally:
            client.close()


async def test_no_record_is_sent_past_the_range_when_redis_cannot_extend_it(
    redis_server: RedisServer, heard: list[bytes]
) -> None:
    identity, psk = new_device()
    psks = MemoryPskStore({identity: psk})
    span = 8
    async with replica(redis_server.url, psks, b"A", span=span) as a:
        client = await connected(a, identity, psk, b"\x04")
        try:
            await eventually(lambda: a.stats.saved == 1)
            redis_server.stop()
            try:
                answered = 0
                with contextlib.suppress(DtlsTimeout):
                    for i in range(2 * span):
                        await client.request(b"%d" % i, timeout=1.0)
                        answered += 1
            finally:
                redis_server.start()
            assert 0 < answered < span
            assert a.stats.seq_exhausted == 1
            assert a.session_count == 0
            assert max(seq_of(d) for d in heard if d[0] == CT_TLS12_CID) < span
        finally:
            client.close()


async def test_a_client_without_cid_is_not_stored(
    redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    identity, psk = new_device()
    async with replica(redis_server.url, MemoryPskStore({identity: psk}), b"A") as a:
        client = await connected(a, identity, psk, None)
        try:
            assert await client.request(b"one") == b"A:one"
            await asyncio.sleep(0)
            assert (a.stats.saved, a.stats.save_failed) == (0, 0)
            assert await redis_client.keys(f"{PREFIX}:{{dtls*") == []
        finally:
            client.close()


# -- two whole proxies ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_proxies(
    tmp_path: Path, redis_url: str, **more: Any
) -> AsyncIterator[list[RunningProxy]]:
    async def thing(request: HttpRequest) -> HttpResponse:
        return HttpResponse(b"thing", media_type="text/plain")

    policy = tmp_path / "policy.toml"
    policy.write_text('[[route]]\npath = "/thing"\nmethods = ["GET"]\ntarget = "/thing"\n')
    settings = {
        "coap_host": "127.0.0.1",
        "coap_port": 0,
        "coaps_port": 0,
        "policy": str(policy),
        "proxy_token": "t",
        "redis_url": redis_url,
        "redis_prefix": PREFIX,
        **more,
    }
    async with serve_app(Starlette(routes=[Route("/thing", thing)])) as base_url:
        proxies: list[RunningProxy] = []
        try:
            for _ in range(2):
                proxies.append(await start_proxy(ProxySettings(upstream=base_url, **settings)))
            yield proxies
        finally:
            for proxy in proxies:
                await proxy.close()


_mids = iter(range(1, 0xFFFF))


def get_thing() -> bytes:
    return encode_parts(CON, 1, next(_mids), b"\x01", [(opt.URI_PATH, b"thing")], b"")


async def test_a_revoked_psk_ends_the_session_on_every_proxy(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    identity, psk = new_device()
    await redis_client.sadd(device_set_key(PREFIX), identity)
    await redis_client.hset(device_key(identity, PREFIX), "psk", psk)
    async with two_proxies(tmp_path, redis_server.url) as (first, second):
        assert first.dtls is not None
        assert second.dtls is not None
        await eventually(lambda: first.psk_store is not None and first.psk_store.lookup(identity))
        await eventually(lambda: second.psk_store is not None and second.psk_store.lookup(identity))
        client = await connected(first.dtls, identity, psk, b"\x05")
        try:
            assert decode(await client.request(get_thing())).code == CONTENT
            await eventually(lambda: first.dtls is not None and first.dtls.stats.saved == 1)
            await client.rebind(server=("127.0.0.1", port_of(second.dtls)))
            assert decode(await client.request(get_thing())).code == CONTENT
            assert (second.dtls.stats.handshakes, second.dtls.stats.imported) == (0, 1)
            assert first.dtls.session_count == second.dtls.session_count == 1
            assert client.negotiated_cid is not None
            stored = session_key(client.negotiated_cid)

            await redis_client.hdel(device_key(identity, PREFIX), "psk")
            await redis_client.publish(psk_channel(PREFIX), identity)
            # docs/CONTRACT.md §6: within a second, on every proxy.
            await eventually(
                lambda: (
                    first.dtls is not None
                    and second.dtls is not None
                    and first.dtls.session_count == second.dtls.session_count == 0
                ),
                timeout=1.0,
            )
            await eventually_async(lambda: _gone(redis_client, stored), timeout=1.0)
            with pytest.raises((DtlsTimeout, DtlsAlert)):
                await client.request(get_thing(), timeout=0.5)
        finally:
            client.close()
        # The store is closed with the proxy.
        assert isinstance(first.dtls_sessions, RedisDtlsSessionStore)


def test_the_connection_id_switch_is_a_setting_and_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from launcher.cli import build_parser

    args = build_parser().parse_args(["proxy", "--dtls-connection-id", "off"])
    assert ProxySettings(dtls_connection_id=args.dtls_connection_id).dtls_connection_id is False
    monkeypatch.setenv("COAP_BRIDGE_DTLS_CONNECTION_ID", "off")
    assert ProxySettings().dtls_connection_id is False
    monkeypatch.setenv("COAP_BRIDGE_DTLS_CONNECTION_ID", "on")
    assert ProxySettings().dtls_connection_id is True
    with pytest.raises(ValidationError, match="dtls_connection_id"):
        ProxySettings(dtls_connection_id="sometimes")


async def test_with_connection_id_off_no_cid_is_negotiated_and_nothing_stored(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    identity, psk = new_device()
    await redis_client.sadd(device_set_key(PREFIX), identity)
    await redis_client.hset(device_key(identity, PREFIX), "psk", psk)
    async with two_proxies(tmp_path, redis_server.url, dtls_connection_id=False) as (first, _):
        assert first.dtls is not None
        assert first.dtls_sessions is None
        await eventually(lambda: first.psk_store is not None and first.psk_store.lookup(identity))
        client = await connected(first.dtls, identity, psk, b"\x06")
        try:
            assert client.negotiated_cid is None
            assert decode(await client.request(get_thing())).code == CONTENT
            assert await redis_client.keys(f"{PREFIX}:{{dtls*") == []
        finally:
            client.close()
