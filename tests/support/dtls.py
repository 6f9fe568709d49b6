"""DTLS test tools: raw records, a recording relay, and a small PSK client on tinydtls.

``client_hello(random, cookie)`` / ``hello_verify_cookie(datagram)``
    Hand-built DTLS 1.2 ClientHello offering TLS_PSK_WITH_AES_128_CCM_8, and the cookie of a
    HelloVerifyRequest: enough to make a server create handshake state (a cookie-verified
    ClientHello) without finishing the handshake.
``records(datagram)``
    ``(content type, epoch, handshake type or None, length)`` per record: what a passive
    observer sees of the server's answers.
``WireRecorder``
    A UDP relay in front of a server that records every datagram in both directions; point a
    real client at ``recorder.port``.
``DtlsClient``
    A PSK client (DTLSSocket's tinydtls in client mode) that keeps its session open, sends CoAP
    requests through it and notices the server's close_notify.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from proxy.coap import options as opt
from proxy.coap.codec import CON, Message, decode, encode_parts

CT_ALERT = 21
CT_HANDSHAKE = 22
HT_CLIENT_HELLO = 1
HT_HELLO_VERIFY_REQUEST = 3
TLS_PSK_WITH_AES_128_CCM_8 = 0xC0A8
EVENT_CONNECTED = 0x01DE


def client_hello(random: bytes, cookie: bytes = b"", *, seq: int = 0) -> bytes:
    """One DTLS 1.2 ClientHello record (RFC 6347 §4.2.1), no extensions."""
    assert len(random) == 32
    body = (
        b"\xfe\xfd"  # client_version DTLS 1.2
        + random
        + b"\x00"  # session_id
        + bytes([len(cookie)])
        + cookie
        + struct.pack("!HH", 2, TLS_PSK_WITH_AES_128_CCM_8)
        + b"\x01\x00"  # compression: null
    )
    length = len(body).to_bytes(3, "big")
    handshake = bytes([HT_CLIENT_HELLO]) + length + struct.pack("!H", seq) + b"\x00\x00\x00"
    handshake += length + body
    header = bytes([CT_HANDSHAKE]) + b"\xfe\xfd" + b"\x00\x00" + seq.to_bytes(6, "big")
    return header + struct.pack("!H", len(handshake)) + handshake


def hello_verify_cookie(datagram: bytes) -> bytes | None:
    if len(datagram) < 28 or datagram[0] != CT_HANDSHAKE or datagram[13] != HT_HELLO_VERIFY_REQUEST:
        return None
    size = datagram[27]
    return datagram[28 : 28 + size]


def records(datagram: bytes) -> list[tuple[int, int, int | None, int]]:
    out: list[tuple[int, int, int | None, int]] = []
    rest = datagram
    while len(rest) >= 13:
        content_type = rest[0]
        epoch = int.from_bytes(rest[3:5], "big")
        length = int.from_bytes(rest[11:13], "big")
        handshake_type = rest[13] if content_type == CT_HANDSHAKE and epoch == 0 else None
        out.append((content_type, epoch, handshake_type, length))
        rest = rest[13 + length :]
    return out


class _Relay(asyncio.DatagramProtocol):
    def __init__(self, recorder: WireRecorder) -> None:
        self._recorder = recorder

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._recorder._from_client(data, addr)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, recorder: WireRecorder, client: tuple[str, int]) -> None:
        self._recorder = recorder
        self._client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._recorder._from_server(data, self._client)


@dataclass
class WireRecorder:
    """Relay ``port`` → ``server``; ``to_client`` / ``to_server`` hold (time, datagram)."""

    server: tuple[str, int]
    port: int = 0
    to_client: list[tuple[float, bytes]] = field(default_factory=list)
    to_server: list[tuple[float, bytes]] = field(default_factory=list)
    _front: asyncio.DatagramTransport | None = None
    _upstreams: dict[tuple[str, int], asyncio.DatagramTransport] = field(default_factory=dict)
    _opening: set[asyncio.Task[None]] = field(default_factory=set)

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        self.to_server.append((loop.time(), data))
        upstream = self._upstreams.get(addr)
        if upstream is None:
            task = loop.create_task(self._open(addr, data))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        else:
            upstream.sendto(data)

    async def _open(self, addr: tuple[str, int], first: bytes) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(self, addr), remote_addr=self.server
        )
        self._upstreams[addr] = transport
        transport.sendto(first)

    def _from_server(self, data: bytes, client: tuple[str, int]) -> None:
        self.to_client.append((asyncio.get_running_loop().time(), data))
        if self._front is not None:
            self._front.sendto(data, client)

    def server_records(self) -> list[tuple[int, int, int | None, int]]:
        return [record for _, data in self.to_client for record in records(data)]

    def clear(self) -> None:
        self.to_client.clear()
        self.to_server.clear()


@contextlib.asynccontextmanager
async def recording_relay(server: tuple[str, int]) -> AsyncIterator[WireRecorder]:
    recorder = WireRecorder(server)
    loop = asyncio.get_running_loop()
    front, _ = await loop.create_datagram_endpoint(
        lambda: _Relay(recorder), local_addr=("127.0.0.1", 0)
    )
    recorder._front = front
    recorder.port = front.get_extra_info("sockname")[1]
    try:
        yield recorder
    finally:
        front.close()
        for upstream in recorder._upstreams.values():
            upstream.close()


class _ClientSocket(asyncio.DatagramProtocol):
    def __init__(self, client: DtlsClient) -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._client._received(data)


class DtlsClient:
    """A PSK client that holds one session to one server (tinydtls via DTLSSocket)."""

    def __init__(self, identity: str, psk: bytes) -> None:
        from DTLSSocket import dtls

        self._dtls_module = dtls
        key = identity.encode()
        self._dtls = dtls.DTLS(
            read=self._read,
            write=self._write,
            event=self._event,
            pskId=key,
            pskStore={key: psk},
        )
        self._transport: asyncio.DatagramTransport | None = None
        self._server: tuple[str, int] = ("127.0.0.1", 0)
        self._connection: Any = None
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.closed_at: float | None = None
        self._plaintext: asyncio.Queue[bytes] = asyncio.Queue()
        self._ticker: asyncio.Task[None] | None = None
        self._mid = int.from_bytes(os.urandom(2), "big")

    async def connect(self, host: str, port: int, timeout: float = 2.0) -> bool:
        """True once the handshake completed; False if it did not within ``timeout``."""
        loop = asyncio.get_running_loop()
        self._server = (host, port)
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _ClientSocket(self), remote_addr=(host, port)
        )
        self._ticker = loop.create_task(self._tick())
        self._connection = self._dtls.connect("::ffff:" + host, port)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout)
        return self.connected.is_set()

    async def get(self, *segments: str, timeout: float = 2.0) -> Message:
        self._mid = (self._mid + 1) & 0xFFFF
        request = encode_parts(
            CON, 1, self._mid, b"\x01", [(opt.URI_PATH, s.encode()) for s in segments], b""
        )
        self._dtls.write(self._connection, request)
        return decode(await asyncio.wait_for(self._plaintext.get(), timeout))

    def send(self, datagram: bytes) -> None:
        """One CoAP datagram through the session (the caller chose its MID)."""
        self._dtls.write(self._connection, datagram)

    async def recv(self, timeout: float = 2.0) -> bytes:
        """The next CoAP datagram the server sent through the session."""
        return await asyncio.wait_for(self._plaintext.get(), timeout)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self._connection = None  # its __dealloc__ resets the peer (close_notify)
        if self._transport is not None:
            self._transport.close()

    # tinydtls callbacks
    def _write(self, addr: tuple[str, int], data: bytes) -> int:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data)
        return len(data)

    def _read(self, addr: tuple[str, int], data: bytes) -> int:
        self._plaintext.put_nowait(data)
        return len(data)

    def _event(self, level: int, code: int) -> None:
        if code == EVENT_CONNECTED:
            self.connected.set()
        elif level == 2 or code == 0:  # fatal alert or close_notify
            self.closed_at = asyncio.get_running_loop().time()
            self.closed.set()

    def _received(self, data: bytes) -> None:
        self._dtls.handleMessageAddr("::ffff:" + self._server[0], self._server[1], data)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self._dtls.checkRetransmit()


async def dtls_ready(port: int, timeout: float = 15.0) -> None:
    """A cookie-less ClientHello is answered with a HelloVerifyRequest once DTLS listens."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while loop.time() < deadline:
            sock.sendto(client_hello(os.urandom(32)), ("127.0.0.1", port))
            await asyncio.sleep(0.1)
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                if hello_verify_cookie(sock.recv(2048)):
                    return
    raise AssertionError(f"DTLS port {port} never answered a ClientHello")
