"""Issue 19: an independent reading of our DTLS Connection ID records (RFC 9146) by Wireshark.

Our tinydtls patch (scripts/patches/dtlssocket-0.2.3-connection-id.patch) and our test client
(tests/support/dtls_cid_client.py) were both written by us from the same RFC text, so they could
agree on a wrong record layout or a wrong additional data and still talk to each other. Wireshark's
DTLS dissector (tshark, Debian's ``tshark`` package) is a third reading: given the PSK, it must

- find the ``connection_id`` extension (RFC 9146 §3) in both hellos, with the CIDs negotiated;
- parse every protected record as ``tls12_cid`` with the right CID (§4), in each direction that
  negotiated a non-empty one, and as a plain record in a direction that did not;
- authenticate and decrypt every protected record, which it does only if our AEAD additional data
  is the one of §5.3 (its CCM tag check fails otherwise), and show the CoAP bytes that were sent,
  both ways;
- do the same after the client's source port changed (a NAT rebinding): no handshake in that
  conversation, the session found by its CID.

A control record, a client record whose header sequence number was changed (so only its additional
data differs; the explicit nonce in its body is unchanged), must not decrypt: that shows the tag is
checked, so a decrypted record really means the additional data matched.

Debian bookworm ships Wireshark 4.0.17, which knows extension 54 and tls12_cid records and
computes the §5.3 additional data (seq_num_placeholder, tls12_cid, cid_length, tls12_cid, version,
epoch, sequence_number, cid, length_of_DTLSInnerPlaintext), as its dtls.debug_file log shows.

The capture is written by the test from what a relay in front of the proxy saw (pcap with raw IPv4
frames), so no capture privileges are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import options as opt
from proxy.coap.codec import CON, encode_parts
from proxy.server import start_proxy
from proxy.settings import ProxySettings
from proxy.state.psk import MemoryPskStore
from tests.support.dtls_cid_client import CT_APPLICATION_DATA, CT_TLS12_CID, CidClient
from tests.support.http import serve_app

pytestmark = pytest.mark.interop

Address = tuple[str, int]
EXT_CONNECTION_ID = 54  # RFC 9146 §3 (IANA)
HT_CLIENT_HELLO, HT_SERVER_HELLO, HT_FINISHED = 1, 2, 20
CT_ALERT, CT_HANDSHAKE = 21, 22
LINKTYPE_IPV4 = 228  # pcap link type: each frame is an IPv4 packet


# -- a relay that records addresses, and a pcap of what it saw --------------------------------


@dataclass
class Datagram:
    src: Address
    dst: Address
    data: bytes


@dataclass
class Relay:
    """UDP relay in front of ``server``: one upstream socket per client address, so the proxy
    sees a new source port when the client's changes. ``seen`` is the wire on the client's
    side (client address ↔ the relay's port)."""

    server: Address
    seen: list[Datagram] = field(default_factory=list)
    address: Address = ("127.0.0.1", 0)
    _front: asyncio.DatagramTransport | None = None
    _upstreams: dict[Address, asyncio.DatagramTransport] = field(default_factory=dict)
    _waiting: dict[Address, list[bytes]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def from_client(self, data: bytes, client: Address) -> None:
        self.seen.append(Datagram(client, self.address, data))
        upstream = self._upstreams.get(client)
        if upstream is not None:
            upstream.sendto(data)
        elif client in self._waiting:  # its upstream socket is still being opened
            self._waiting[client].append(data)
        else:
            self._waiting[client] = [data]
            task = asyncio.get_running_loop().create_task(self._open(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open(self, client: Address) -> None:
        relay = self

        class Upstream(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Address) -> None:
                relay.seen.append(Datagram(relay.address, client, data))
                assert relay._front is not None
                relay._front.sendto(data, client)

        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Upstream, remote_addr=self.server
        )
        self._upstreams[client] = transport
        for data in self._waiting.pop(client):
            transport.sendto(data)


@contextlib.asynccontextmanager
async def relay_to(server: Address) -> AsyncIterator[Relay]:
    relay = Relay(server)

    class Front(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Address) -> None:
            relay.from_client(data, addr)

    front, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        Front, local_addr=("127.0.0.1", 0)
    )
    relay._front = front
    relay.address = front.get_extra_info("sockname")[:2]
    try:
        yield relay
    finally:
        front.close()
        for upstream in relay._upstreams.values():
            upstream.close()


def pcap(datagrams: list[Datagram]) -> bytes:
    """A classic pcap file (microsecond timestamps, one frame per second) of IPv4/UDP frames;
    UDP checksum 0 means "none" over IPv4 (RFC 768)."""
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_IPV4)
    for number, datagram in enumerate(datagrams):
        udp = struct.pack("!HHHH", datagram.src[1], datagram.dst[1], 8 + len(datagram.data), 0)
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 28 + len(datagram.data), number & 0xFFFF, 0, 64, 17, 0,
            socket.inet_aton(datagram.src[0]), socket.inet_aton(datagram.dst[0]),
        )  # fmt: skip
        total = sum(struct.unpack("!10H", header))
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
        frame = header + udp + datagram.data
        out += struct.pack("<IIII", 1_700_000_000 + number, 0, len(frame), len(frame)) + frame
    return out


# -- what tshark made of it ---------------------------------------------------------------------


@dataclass
class Record:
    special_type: int | None  # 25 for a tls12_cid record
    content_type: int | None  # the real type: absent for a tls12_cid record not decrypted
    epoch: int
    cid: bytes | None  # the record's CID (tls12_cid only)
    handshake_types: list[int]
    hello_cid: bytes | None  # the connection_id extension's CID, if the record has one
    alert: bool


@dataclass
class Frame:
    src_port: int
    dst_port: int
    records: list[Record]
    decrypted: list[bytes]  # application data tshark decrypted, in record order


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _hex(value: str) -> bytes:
    return bytes.fromhex(value.replace(":", ""))


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _record(tree: dict[str, Any]) -> Record:
    def number(key: str) -> int | None:
        return int(tree[key]) if key in tree else None

    hello_cid = None
    for node in _walk(tree):
        if node.get("dtls.handshake.extension.type") == str(EXT_CONNECTION_ID):
            hello_cid = _hex(node.get("dtls.connection_id", ""))
    handshakes = [
        int(node["dtls.handshake.type"]) for node in _walk(tree) if "dtls.handshake.type" in node
    ]
    cid = tree.get("dtls.record.connection_id")
    return Record(
        special_type=number("dtls.record.special_type"),
        content_type=number("dtls.record.content_type"),
        epoch=int(tree["dtls.record.epoch"]),
        cid=_hex(cid) if cid is not None else None,
        handshake_types=handshakes,
        hello_cid=hello_cid,
        alert=any("dtls.alert_message.desc" in node for node in _walk(tree)),
    )


async def dissect(tshark: str, capture: Path, port: int, psk: bytes, home: Path) -> list[Frame]:
    """tshark's view of ``capture``: UDP ``port`` decoded as DTLS, decrypted with ``psk``.
    HOME points at an empty directory so no personal Wireshark preferences take part."""
    process = await asyncio.create_subprocess_exec(
        tshark, "-n", "-r", str(capture), "-d", f"udp.port=={port},dtls",
        "-o", f"dtls.psk:{psk.hex()}", "-T", "json", "--no-duplicate-keys",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home)},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"tshark failed: {stderr.decode(errors='replace')}"
    frames = []
    for packet in json.loads(stdout):
        layers = packet["_source"]["layers"]
        dtls = layers.get("dtls", {})
        frames.append(
            Frame(
                src_port=int(layers["udp"]["udp.srcport"]),
                dst_port=int(layers["udp"]["udp.dstport"]),
                records=[_record(tree) for tree in _items(dtls.get("dtls.record"))],
                decrypted=[
                    _hex(data["data.data"])
                    for data in _items(layers.get("data"))
                    if "data.data" in data
                ],
            )
        )
    return frames


def decrypted(record: Record) -> bool:
    """Whether tshark authenticated and decrypted this protected record: the real content type
    of a tls12_cid record is only known after decryption; a Finished, an alert and application
    data are only shown decrypted."""
    if record.content_type is None:
        return False
    if record.content_type == CT_HANDSHAKE:
        return record.handshake_types == [HT_FINISHED]
    if record.content_type == CT_ALERT:
        return record.alert
    return record.content_type == CT_APPLICATION_DATA


# -- the proxy ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def dtls_proxy(tmp_path: Path, identity: str, psk: str) -> AsyncIterator[Address]:
    async def thing(request: HttpRequest) -> HttpResponse:
        return HttpResponse(b"thing-body", media_type="text/plain")

    policy = tmp_path / "policy.toml"
    policy.write_text('[[route]]\npath = "/thing"\nmethods = ["GET"]\ntarget = "/thing"\n')
    async with serve_app(Starlette(routes=[Route("/thing", thing)])) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1", coap_port=0, coaps_port=0, upstream=base_url,
            policy=str(policy), proxy_token="t",
        )  # fmt: skip
        proxy = await start_proxy(settings, psk_store=MemoryPskStore({identity: psk}))
        try:
            assert proxy.dtls is not None
            yield ("127.0.0.1", int(proxy.dtls.get_extra_info("sockname")[1]))
        finally:
            await proxy.close()


def tshark_path() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.fail("tshark not found: install the Debian package tshark (Makefile TEST_DEBS)")
    return path


def forged_copy(datagram: Datagram) -> Datagram:
    """The same record with bit 6 of its header sequence number flipped: the ciphertext, tag
    and explicit nonce (RFC 6655 §3) are untouched, only the additional data (RFC 9146 §5.3,
    which carries the header's epoch and sequence number) changes."""
    data = bytearray(datagram.data)
    data[10] ^= 0x40
    return Datagram(datagram.src, datagram.dst, bytes(data))


@pytest.mark.parametrize(
    "offer", [b"\x0a\x0b\x0c", b""], ids=["cid-both-ways", "zero-length-client-cid"]
)
async def test_wireshark_reads_and_decrypts_our_cid_records_across_a_rebinding(
    tmp_path: Path, offer: bytes
) -> None:
    tshark = tshark_path()
    identity, psk = f"dev-{secrets.token_hex(4)}", secrets.token_hex(8)
    async with dtls_proxy(tmp_path, identity, psk) as server, relay_to(server) as relay:
        client = CidClient(identity.encode(), psk.encode(), offer_cid=offer)
        try:
            await client.connect(*relay.address)
            ports, requests, answers = [client.local_port], [], []
            for mid in (0x1000, 0x1001):
                request = encode_parts(CON, 1, mid, b"\x77", [(opt.URI_PATH, b"thing")], b"")
                answers.append(await client.request(request))
                requests.append(request)
                if len(ports) == 1:
                    await client.rebind()  # a NAT rebinding: a new source port, same session
                    ports.append(client.local_port)
        finally:
            client.close()
        wire = list(relay.seen)
    ours = client.negotiated_cid  # the server's CID: on every record the client sends
    assert ours
    assert client.stats.handshakes == 1
    assert ports[0] != ports[1]
    assert all(answer[1] == 69 for answer in answers), "2.05 Content expected"
    # After the rebinding, the client's first datagram is its second request.
    wire.append(forged_copy(next(d for d in wire if d.src[1] == ports[1])))

    capture = tmp_path / "cid.pcap"
    capture.write_bytes(pcap(wire))
    frames = await dissect(tshark, capture, relay.address[1], psk.encode(), tmp_path)
    assert len(frames) == len(wire)
    *frames, forged = frames
    to_server = [frame for frame in frames if frame.src_port != relay.address[1]]
    to_client = [frame for frame in frames if frame.src_port == relay.address[1]]

    # (a) the connection_id extension in both hellos (RFC 9146 §3); a flight may have been
    # retransmitted, so hellos are counted at least, not exactly.
    hellos = [r for f in to_server for r in f.records if HT_CLIENT_HELLO in r.handshake_types]
    assert len(hellos) >= 2  # before and after the HelloVerifyRequest
    assert all(hello.hello_cid == offer for hello in hellos)
    server_hellos = [
        r for f in to_client for r in f.records if HT_SERVER_HELLO in r.handshake_types
    ]
    assert server_hellos
    assert all(hello.hello_cid == ours for hello in server_hellos)

    # (b) every protected record framed per RFC 9146 §4 in each direction: tls12_cid with the
    # receiver's CID where one was negotiated, a plain record where the receiver asked for none.
    for direction, cid in ((to_server, ours), (to_client, offer)):
        protected = [r for f in direction for r in f.records if r.epoch == 1]
        assert protected
        framing = (CT_TLS12_CID, cid) if cid else (None, None)
        assert [(r.special_type, r.cid) for r in protected] == [framing] * len(protected)

    # (c) every protected record authenticated and decrypted, to the CoAP bytes sent both ways.
    undecrypted = [
        (number, record)
        for number, frame in enumerate(frames, 1)
        for record in frame.records
        if record.epoch == 1 and not decrypted(record)
    ]
    assert undecrypted == [], f"frames tshark could not authenticate (numbers as in {capture})"
    assert [d for f in to_server for d in f.decrypted] == requests
    assert [d for f in to_client for d in f.decrypted] == answers

    # (d) after the rebinding: the second exchange runs between the new port and the proxy,
    # with no handshake in that conversation, and decrypts all the same (checked above).
    new_port = [f for f in frames if ports[1] in (f.src_port, f.dst_port)]
    assert all(r.epoch == 1 and not r.handshake_types for f in new_port for r in f.records)
    assert requests[1] in [d for f in new_port for d in f.decrypted]
    assert answers[1] in [d for f in new_port for d in f.decrypted]

    # The control: a record whose additional data no longer matches is not decrypted.
    assert forged.decrypted == []
    assert not decrypted(forged.records[0])
