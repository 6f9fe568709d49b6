"""Issue 19, part 1: DTLS Connection ID (RFC 9146) on the proxy's DTLS port.

The client is tests/support/dtls_cid_client.py, written from the RFCs on ``cryptography``,
independent of tinydtls; the server is the real proxy (``start_proxy``) with our tinydtls build
(scripts/patches/dtlssocket-0.2.3-connection-id.patch) and a real HTTP upstream.

- A client that offers a CID gets one and its requests are answered; one that offers a
  zero-length CID, or none, works as well (the latter exactly as before).
- After the client's source port changes, its next request is answered with no new handshake,
  and the session now lives at the new address.
- A forged or replayed CID record from a new address moves nothing and gets no answer
  (RFC 9146 §6); an unknown CID is dropped and counted.
- The CID index follows every way a session ends (cap, idle sweep, revocation, close_notify).
- A session exported from one transport and imported into another continues there: the
  client's next record decrypts, and the answer's sequence number respects the floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import options as opt
from proxy.coap.codec import CON, decode, encode_parts
from proxy.server import start_proxy
from proxy.settings import ProxySettings
from proxy.state.psk import MemoryPskStore
from proxy.transports.dtls import CID_LENGTH, DtlsTransport, create_dtls_endpoint
from tests.support.dtls_cid_client import (
    CT_APPLICATION_DATA,
    CT_TLS12_CID,
    BoundPorts,
    CidClient,
    DtlsTimeout,
)
from tests.support.http import serve_app

CONTENT = 69  # 2.05
_mids = iter(range(1, 0xFFFF))


def get_thing() -> bytes:
    return encode_parts(CON, 1, next(_mids), b"\x01", [(opt.URI_PATH, b"thing")], b"")


def new_device() -> tuple[str, str]:
    return f"dev-{secrets.token_hex(4)}", secrets.token_hex(8)


@contextlib.asynccontextmanager
async def dtls_proxy(tmp_path: Path, psks: dict[str, str], **settings: object) -> AsyncIterator:
    async def thing(request: HttpRequest) -> HttpResponse:
        return HttpResponse(b"thing", media_type="text/plain")

    policy = tmp_path / "policy.toml"
    policy.write_text('[[route]]\npath = "/thing"\nmethods = ["GET"]\ntarget = "/thing"\n')
    store = MemoryPskStore(psks)
    async with serve_app(Starlette(routes=[Route("/thing", thing)])) as base_url:
        proxy = await start_proxy(
            ProxySettings(
                **{
                    "coap_host": "127.0.0.1",
                    "coap_port": 0,
                    "coaps_port": 0,
                    "upstream": base_url,
                    "policy": str(policy),
                    "proxy_token": "t",
                    **settings,
                }
            ),
            psk_store=store,
        )
        try:
            assert proxy.dtls is not None
            yield proxy, proxy.dtls, store
        finally:
            await proxy.close()


def port_of(transport: Any) -> int:
    return int(transport.get_extra_info("sockname")[1])


async def connected(
    dtls: DtlsTransport, identity: str, psk: str, offer_cid: bytes | None
) -> CidClient:
    client = CidClient(identity.encode(), psk.encode(), offer_cid=offer_cid)
    await client.connect("127.0.0.1", port_of(dtls))
    return client


async def answered(client: CidClient) -> int:
    return decode(await client.request(get_thing())).code


@pytest.mark.parametrize("offer", [b"\x0a\x0b\x0c", b""], ids=["client-cid", "zero-length"])
async def test_a_client_offering_a_cid_gets_one_and_is_answered(tmp_path, offer) -> None:
    identity, psk = new_device()
    async with dtls_proxy(tmp_path, {identity: psk}) as (_, dtls, _):
        client = await connected(dtls, identity, psk, offer)
        try:
            assert client.negotiated_cid is not None
            assert len(client.negotiated_cid) == CID_LENGTH
            assert dtls.cid_of(("127.0.0.1", client.local_port)) == client.negotiated_cid
            # The client drops records without its CID when it asked for one, and records
            # with a CID when it offered a zero-length one (RFC 9146 §3): an answer means the
            # server framed them right.
            assert await answered(client) == CONTENT
            assert client.stats.records_dropped == 0
            assert dtls.stats.cid_sessions == 1
        finally:
            client.close()


async def test_a_client_without_cid_works_as_before_and_needs_a_handshake_on_a_new_port(
    tmp_path,
) -> None:
    identity, psk = new_device()
    async with dtls_proxy(tmp_path, {identity: psk}) as (_, dtls, _):
        client = await connected(dtls, identity, psk, None)
        try:
            assert client.negotiated_cid is None
            assert await answered(client) == CONTENT
            assert dtls.cid_of(("127.0.0.1", client.local_port)) is None
            await client.rebind()
            with pytest.raises(DtlsTimeout):
                await client.request(get_thing(), timeout=0.5)
            assert dtls.stats.dropped_stateless >= 1
            assert dtls.stats.cid_sessions == 0
            assert dtls.stats.address_updates == 0
        finally:
            client.close()


@pytest.mark.parametrize("offer", [b"\x01\x02\x03\x04", b""], ids=["client-cid", "zero-length"])
async def test_a_new_source_port_continues_the_session_without_a_handshake(tmp_path, offer) -> None:
    identity, psk = new_device()
    async with dtls_proxy(tmp_path, {identity: psk}) as (_, dtls, _):
        client = await connected(dtls, identity, psk, offer)
        try:
            assert await answered(client) == CONTENT
            old = ("127.0.0.1", client.local_port)
            await client.rebind()
            new = ("127.0.0.1", client.local_port)
            assert new != old
            assert await answered(client) == CONTENT
            assert await answered(client) == CONTENT
            assert client.stats.handshakes == 1
            assert dtls.stats.handshakes == 1
            assert dtls.stats.address_updates == 1
            assert dtls.session_count == dtls.cid_session_count == 1
            assert dtls.identity_of(new) == identity
            assert dtls.identity_of(old) is None
            assert dtls.cid_of(new) == client.negotiated_cid
        finally:
            client.close()


class _Listener(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)


@contextlib.asynccontextmanager
async def other_socket(port: int) -> AsyncIterator[tuple[asyncio.DatagramTransport, _Listener]]:
    """A socket at another source port: an off-path attacker, or a NAT's new mapping."""
    listener = _Listener()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: listener, remote_addr=("127.0.0.1", port)
    )
    try:
        yield transport, listener
    finally:
        transport.close()


async def test_forged_replayed_and_unknown_cid_records_move_nothing_and_get_no_answer(
    tmp_path,
) -> None:
    identity, psk = new_device()
    async with dtls_proxy(tmp_path, {identity: psk}) as (_, dtls, _):
        client = await connected(dtls, identity, psk, b"\x07")
        try:
            home = ("127.0.0.1", client.local_port)
            cid = client.negotiated_cid
            assert cid
            # A genuine record, sent by the client, answered...
            genuine = client.seal(CT_APPLICATION_DATA, get_thing())
            client.send_raw(genuine)
            assert decode(await client.recv()).code == CONTENT
            async with other_socket(port_of(dtls)) as (attacker, heard):
                # ...then replayed from elsewhere: tinydtls' window refuses it (RFC 6347
                # §4.1.2.6), so the session must not follow it.
                attacker.sendto(genuine)
                # The right CID around a record that does not authenticate.
                forged = bytearray(client.seal(CT_APPLICATION_DATA, get_thing()))
                forged[-1] ^= 0x01
                attacker.sendto(bytes(forged))
                # A CID no session has.
                unknown = bytearray(forged)
                unknown[11 : 11 + CID_LENGTH] = bytes(x ^ 0xFF for x in cid)
                attacker.sendto(bytes(unknown))
                assert forged[0] == CT_TLS12_CID
                # The client's next request is handled after those three (one loop, in
                # order): its answer at the old address is the proof they were processed.
                assert await answered(client) == CONTENT
                assert heard.received == []
            assert dtls.stats.cid_not_moved == 2
            assert dtls.stats.dropped_unknown_cid == 1
            assert dtls.stats.address_updates == 0
            assert dtls.identity_of(home) == identity
            assert dtls.cid_of(home) == cid
        finally:
            client.close()


async def test_the_cid_index_follows_cap_revocation_close_and_idle_eviction(tmp_path) -> None:
    devices = dict(new_device() for _ in range(4))
    settings = {"dtls_max_sessions": 2, "dtls_idle_timeout": 0.5}
    async with dtls_proxy(tmp_path, devices, **settings) as (_, dtls, store):
        (a, key_a), (b, key_b), (c, key_c), (d, key_d) = devices.items()
        clients = [await connected(dtls, a, key_a, b"\x01")]
        try:
            clients.append(await connected(dtls, b, key_b, b""))
            assert dtls.cid_session_count == dtls.session_count == 2
            clients.append(await connected(dtls, c, key_c, b"\x03"))  # the cap evicts one
            assert dtls.stats.evicted_cap == 1
            assert dtls.cid_session_count == dtls.session_count == 2
            store.delete(c)  # revocation
            assert dtls.cid_session_count == dtls.session_count == 1
            assert dtls.stats.closed_psk_change == 1
            clients[1].close()  # close_notify from the client
            assert await _until(lambda: dtls.session_count == 0)
            assert dtls.cid_session_count == 0
            clients.append(await connected(dtls, d, key_d, b"\x04"))
            assert dtls.cid_session_count == 1
            assert await _until(lambda: dtls.stats.evicted_idle == 1, 5.0)
            assert dtls.cid_session_count == dtls.session_count == 0
        finally:
            for client in clients:
                client.close()


async def _until(condition: Any, timeout: float = 2.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# -- export / import --------------------------------------------------------------------------


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, transport: DtlsTransport, name: bytes) -> None:
        self._transport, self._name = transport, name

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._transport.sendto(self._name + b":" + data, addr)


class _Balancer(asyncio.DatagramProtocol):
    """A UDP load balancer without affinity: the client talks to it; it forwards from one
    socket of its own to whichever server ``target`` names now, and back."""

    def __init__(self) -> None:
        self.target: tuple[str, int] = ("127.0.0.1", 0)
        self.client: tuple[str, int] | None = None
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None
        self.from_servers: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.back is not None
        self.client = addr
        self.back.sendto(data, self.target)


class _Back(asyncio.DatagramProtocol):
    def __init__(self, balancer: _Balancer) -> None:
        self._balancer = balancer

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        balancer = self._balancer
        balancer.from_servers.append(data)
        if balancer.front is not None and balancer.client is not None:
            balancer.front.sendto(data, balancer.client)


@contextlib.asynccontextmanager
async def balancer() -> AsyncIterator[_Balancer]:
    loop = asyncio.get_running_loop()
    lb = _Balancer()
    lb.front, _ = await loop.create_datagram_endpoint(lambda: lb, local_addr=("127.0.0.1", 0))
    lb.back, _ = await loop.create_datagram_endpoint(lambda: _Back(lb), local_addr=("127.0.0.1", 0))
    try:
        yield lb
    finally:
        lb.front.close()
        lb.back.close()


@contextlib.asynccontextmanager
async def echo_server(psks: dict[str, str], name: bytes) -> AsyncIterator[DtlsTransport]:
    transport, _ = await create_dtls_endpoint(
        lambda t: _Echo(t, name), psk_store=MemoryPskStore(psks), host="127.0.0.1", port=0
    )
    try:
        yield transport
    finally:
        transport.close()


@pytest.mark.parametrize("offer", [b"\x05\x06", b""], ids=["client-cid", "zero-length"])
async def test_an_exported_session_continues_on_another_transport(offer) -> None:
    identity, psk = new_device()
    async with (
        echo_server({identity: psk}, b"A") as first,
        echo_server({}, b"B") as second,  # B does not even know the key: no handshake there
        balancer() as lb,
    ):
        lb.target = ("127.0.0.1", port_of(first))
        client = CidClient(identity.encode(), psk.encode(), offer_cid=offer)
        await client.connect("127.0.0.1", port_of(lb.front))
        try:
            assert await client.request(b"one") == b"A:one"
            at = ("127.0.0.1", port_of(lb.back))  # where the servers see the client
            exported = first.export_session(at)
            assert exported is not None
            assert exported[0] == identity
            # After the export, A receives one more record: B must not take it again.
            late = client.seal(CT_APPLICATION_DATA, b"late")
            client.send_raw(late)
            assert await client.recv() == b"A:late"
            numbers = first.sequence_numbers(at)
            assert numbers is not None
            received, _ = numbers
            assert received == int.from_bytes(late[3:11], "big")
            floor = 1_000
            second.import_session(
                at, exported[0], exported[1], write_seq_floor=floor, read_seq_floor=received
            )
            assert second.identity_of(at) == identity
            assert second.cid_of(at) == client.negotiated_cid
            assert second.sequence_numbers(at) == (received, 1 << 48 | floor)
            lb.target = ("127.0.0.1", port_of(second))
            lb.from_servers.clear()
            client.send_raw(late)  # a replay across the replicas: refused, not answered
            assert await client.request(b"two") == b"B:two"
            assert len(lb.from_servers) == 1
            assert client.stats.handshakes == 1
            assert second.stats.handshakes == 0
            assert second.stats.imported == 1
            [answer] = lb.from_servers
            assert answer[3:5] == b"\x00\x01"  # epoch 1
            assert int.from_bytes(answer[5:11], "big") == floor
            # And again: the floor only lifts the sequence, it does not pin it.
            lb.from_servers.clear()
            assert await client.request(b"three") == b"B:three"
            assert int.from_bytes(lb.from_servers[0][5:11], "big") == floor + 1
        finally:
            client.close()


async def test_import_refuses_a_blob_it_cannot_read() -> None:
    async with echo_server({}, b"B") as second:
        with pytest.raises(ValueError, match="not a session export of this build"):
            second.import_session(("127.0.0.1", 9), "dev", b"\x09" + bytes(40), write_seq_floor=0)
        with pytest.raises(ValueError, match="write_seq_floor 281474976710656 is not within"):
            second.import_session(("127.0.0.1", 9), "dev", b"", write_seq_floor=1 << 48)
        assert second.session_count == 0


# -- a NAT that reuses ports (fix 1 of the benchmark's findings) --------------------------------


@pytest.mark.parametrize("occupant_offer", [b"", None], ids=["cid-occupant", "no-cid-occupant"])
async def test_a_session_moving_onto_a_reused_port_parks_a_cid_session_found_there(
    occupant_offer,
) -> None:
    first, second = new_device(), new_device()
    async with echo_server(dict([first, second]), b"A") as server:
        # T: the device whose port the NAT gives away; S: the device that gets it.
        t = CidClient(first[0].encode(), first[1].encode(), offer_cid=occupant_offer)
        ports = BoundPorts()
        s = CidClient(second[0].encode(), second[1].encode(), offer_cid=b"", socket_factory=ports)
        try:
            await t.connect("127.0.0.1", port_of(server))
            await s.connect("127.0.0.1", port_of(server))
            assert await t.request(b"t1") == b"A:t1"
            assert await s.request(b"s1") == b"A:s1"
            reused = t.local_port
            await t.rebind()  # T's device moves on (silent so far); its old port is free
            await asyncio.sleep(0)  # (asyncio closes the old socket on the next loop pass)
            ports.port = reused
            await s.rebind()  # ... and S's device gets it
            assert s.local_port == reused
            assert await s.request(b"s2") == b"A:s2"
            assert server.cid_of(("127.0.0.1", reused)) == s.negotiated_cid
            if occupant_offer is None:
                # Found by its address only: stale once another session is there. Evicted.
                assert server.stats.parked == 0
                assert server.session_count == 1
                return
            assert server.stats.parked == 1
            assert server.session_count == server.cid_session_count == 2
            # T's next record, from its own new port, finds it by CID and moves it there.
            assert await t.request(b"t2") == b"A:t2"
            assert server.cid_of(("127.0.0.1", t.local_port)) == t.negotiated_cid
            assert server.identity_of(("127.0.0.1", t.local_port)) == first[0]
            assert (t.stats.handshakes, s.stats.handshakes, server.stats.handshakes) == (1, 1, 2)
            assert server.stats.address_updates == 2
            assert server.stats.unsent_parked == 0
        finally:
            t.close()
            s.close()


async def test_nothing_is_sent_to_a_parked_session_and_it_obeys_revocation_and_the_sweep() -> None:
    devices = dict(new_device() for _ in range(4))
    psks = MemoryPskStore(devices)
    transport, _ = await create_dtls_endpoint(
        lambda t: _Echo(t, b"A"), psk_store=psks, host="127.0.0.1", port=0, idle_timeout=3.0
    )
    ports = BoundPorts()
    clients = [
        CidClient(identity.encode(), key.encode(), offer_cid=b"", socket_factory=ports)
        for identity, key in devices.items()
    ]
    try:
        for client in clients:
            await client.connect("127.0.0.1", port_of(transport))
        t1, t2, s1, s2 = clients
        # S1's device gets T1's port, S2's device T2's: T1 and T2 are parked.
        for parked, mover in ((t1, s1), (t2, s2)):
            ports.port = 0
            reused = parked.local_port
            await parked.rebind()
            await asyncio.sleep(0)
            ports.port = reused
            await mover.rebind()
            assert await mover.request(b"x") == b"A:x"
        assert transport.stats.parked == 2
        assert transport.session_count == transport.cid_session_count == 4
        # Revoked while parked: closed, and its close_notify goes nowhere.
        psks.delete(t1.identity.decode())
        assert transport.stats.closed_psk_change == 1
        assert transport.stats.unsent_parked == 1
        assert transport.session_count == transport.cid_session_count == 3
        # Idle: swept like any session, again without a datagram to the parking address.
        assert await _until(lambda: transport.session_count == 0, 15.0)
        assert transport.stats.evicted_idle == 3
        assert transport.stats.unsent_parked == 2
        assert transport.cid_session_count == 0
    finally:
        for client in clients:
            client.close()
        transport.close()


async def test_a_parked_session_counts_against_the_cap() -> None:
    devices = dict(new_device() for _ in range(3))
    transport, _ = await create_dtls_endpoint(
        lambda t: _Echo(t, b"A"),
        psk_store=MemoryPskStore(devices),
        host="127.0.0.1",
        port=0,
        max_sessions=2,
    )
    ports = BoundPorts()
    t, s, newcomer = (
        CidClient(identity.encode(), key.encode(), offer_cid=b"", socket_factory=ports)
        for identity, key in devices.items()
    )
    try:
        await t.connect("127.0.0.1", port_of(transport))
        await s.connect("127.0.0.1", port_of(transport))
        reused = t.local_port
        await t.rebind()
        await asyncio.sleep(0)  # (asyncio closes the old socket on the next loop pass)
        ports.port = reused
        await s.rebind()
        assert await s.request(b"s") == b"A:s"
        assert transport.stats.parked == 1
        ports.port = 0
        # A third session: the cap (2) evicts the longest-silent, the parked one, and its
        # close_notify is not sent anywhere.
        await newcomer.connect("127.0.0.1", port_of(transport))
        assert transport.stats.evicted_cap == 1
        assert transport.stats.unsent_parked == 1
        assert transport.session_count == transport.cid_session_count == 2
        with pytest.raises(DtlsTimeout):
            await t.request(b"t", timeout=0.5)
        assert transport.stats.dropped_unknown_cid == 1
        assert await s.request(b"s") == b"A:s"
        assert await newcomer.request(b"n") == b"A:n"
    finally:
        for client in (t, s, newcomer):
            client.close()
        transport.close()
