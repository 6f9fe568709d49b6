"""A DTLS 1.2 PSK client with Connection ID (RFC 9146), written from the RFCs for the tests.

No CID-capable client exists on the test machines, so this one is ours: pure Python over
``cryptography`` (AES-CCM), independent of tinydtls. It speaks exactly one suite,
TLS_PSK_WITH_AES_128_CCM_8 (RFC 6655, the one the proxy offers: docs/CONTRACT.md §6), no
fragmentation, no resumption, no renegotiation.

The protocol primitives live in bench/dtls12.py, shared with the bench's load generator
(bench/cid_loadgen.py) and written from the RFCs like this client: the PRF, key schedule and
Finished (RFC 5246, RFC 7627), the PSK key exchange (RFC 4279), AES-CCM-8 records (RFC 6655)
in the DTLS record layer (RFC 6347) and the tls12_cid record with its additional data
(RFC 9146), handshake messages and hello extensions. This module drives them: flights and
their retransmission (RFC 6347 §4.2.4), what it accepts from the server, the session's
sockets, and the hooks tests use to forge, replay or redirect records.

API::

    client = CidClient(identity, psk, offer_cid=None)   # bytes, bytes
        offer_cid None  -> no connection_id extension (a client as today)
        offer_cid b""   -> offer a zero-length CID: we send the server's CID, receive none
        offer_cid b"…"  -> the server must put this CID in every record it sends us
        keywords: extended_master_secret=True (RFC 7627), renegotiation_info=True (RFC 5746),
                  retransmit=1.0 (first flight timer, doubled per retry, RFC 6347 §4.2.4),
                  max_retransmits=3, socket_factory=None (a callable returning a bound UDP
                  socket, called for every new socket (connect, rebind): e.g. one made inside
                  a network namespace; None: asyncio makes one)
    await client.connect(host, port, timeout=5.0)
        cookie round trip, handshake; returns once the server's Finished verified. Raises
        DtlsHandshakeError (no Finished in time: says how many flights were sent and whether a
        server record failed authentication, the sign of a wrong PSK) or DtlsAlert.
    await client.request(coap, timeout=2.0) -> bytes   one application-data record out, the
        next one in (send(coap) and recv(timeout) separately, too)
    client.negotiated_cid   the CID the server asked for (we send it), b"" or None (no CID)
    await client.rebind(server=None)   new UDP socket, new source port, same session (a NAT
        rebinding); server=(host, port) sends the session's records to another address
    client.send_raw(datagram); client.seal(content_type, data) -> one protected record
        (consumes a sequence number) for tests that forge, replay or redirect records
    client.stats            records_sent, records_received, records_dropped, handshakes,
                            flights_retransmitted
    client.local_port, client.close()  (close() sends an encrypted close_notify)

Errors: DtlsClientError; DtlsHandshakeError; DtlsAlert (.level, .description, .name: an alert
from the server, close_notify included); DtlsDecryptError (a record that fails authentication
after the handshake); DtlsTimeout (also a TimeoutError).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from bench import dtls12
from bench.dtls12 import (
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_CHANGE_CIPHER_SPEC,
    CT_HANDSHAKE,
    CT_TLS12_CID,
    EXT_CONNECTION_ID,
    EXT_EMS,
    EXT_RENEGOTIATION_INFO,
    HT_FINISHED,
    HT_HELLO_VERIFY_REQUEST,
    HT_SERVER_HELLO,
    HT_SERVER_HELLO_DONE,
    HT_SERVER_KEY_EXCHANGE,
    RECORD_HEADER,
    HandshakeMessage,
    RecordAuthError,
    RecordKeys,
    ServerHelloRefused,
    prf,
)

__all__ = [  # what the tests take from here, the primitives' names among them
    "ALERTS",
    "CT_APPLICATION_DATA",
    "CT_TLS12_CID",
    "BoundPorts",
    "CidClient",
    "ClientStats",
    "DtlsAlert",
    "DtlsClientError",
    "DtlsDecryptError",
    "DtlsHandshakeError",
    "DtlsTimeout",
    "prf",
]  # fmt: skip

ALERTS = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 40: "handshake_failure",
    47: "illegal_parameter", 50: "decode_error", 51: "decrypt_error", 70: "protocol_version",
    80: "internal_error", 110: "unsupported_extension", 115: "unknown_psk_identity",
}  # fmt: skip


class BoundPorts:
    """A ``socket_factory`` binding each new socket where the test says (``port`` 0: any free
    port), so that a test can hand one device's old port to another device, as a NAT does."""

    def __init__(self) -> None:
        self.port = 0

    def __call__(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        return sock


class DtlsClientError(Exception):
    """Anything this client refuses or cannot complete."""


class DtlsHandshakeError(DtlsClientError):
    """The handshake did not complete (no verified Finished from the server)."""


class DtlsDecryptError(DtlsClientError):
    """A record from the server failed authentication (wrong keys, or forged)."""


class DtlsTimeout(DtlsClientError, TimeoutError):
    """No application data in time."""


class DtlsAlert(DtlsClientError):
    """The server sent an alert (a close_notify too)."""

    def __init__(self, level: int, description: int) -> None:
        self.level, self.description = level, description
        self.name = ALERTS.get(description, f"alert {description}")
        kind = "fatal" if level == 2 else "warning"
        super().__init__(f"server sent {kind} alert {self.name}({description})")


@dataclass
class ClientStats:
    records_sent: int = 0
    records_received: int = 0  # authenticated (or plaintext epoch 0) records from the server
    records_dropped: int = 0  # unparsable, wrong epoch / CID, or failed authentication
    handshakes: int = 0  # completed
    flights_retransmitted: int = 0


class _Socket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.queue.put_nowait(exc)


class CidClient:
    """One DTLS 1.2 session to one server; see the module docstring."""

    def __init__(
        self,
        identity: bytes,
        psk: bytes,
        *,
        offer_cid: bytes | None = None,
        extended_master_secret: bool = True,
        renegotiation_info: bool = True,
        retransmit: float = 1.0,
        max_retransmits: int = 3,
        socket_factory: Callable[[], socket.socket] | None = None,
    ) -> None:
        if offer_cid is not None and len(offer_cid) > 255:
            raise ValueError("offer_cid: at most 255 bytes (RFC 9146 §3: cid<0..2^8-1>)")
        self.identity, self.psk, self.offer_cid = identity, psk, offer_cid
        self._ems_offered, self._reneg_offered = extended_master_secret, renegotiation_info
        self._retransmit, self._max_retransmits = retransmit, max_retransmits
        self._socket_factory = socket_factory
        self.stats = ClientStats()
        self.negotiated_cid: bytes | None = None
        self.extended_master_secret = False  # whether the server agreed to it
        self._server: tuple[str, int] = ("127.0.0.1", 0)
        self._transport: asyncio.DatagramTransport | None = None
        self._socket = _Socket()
        self._reset()

    def _reset(self) -> None:
        self.negotiated_cid = None
        self.extended_master_secret = False
        self._write_seq = [0, 0]  # the next record sequence number, per epoch
        self._peer_seq = 0  # the server's next handshake message_seq
        self._cid_in: bytes = b""  # the CID on records the server sends us
        self._write: RecordKeys | None = None  # client_write
        self._read: RecordKeys | None = None  # server_write
        self._connected = False
        self._auth_failures = 0

    # -- connection --------------------------------------------------------------------

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._socket = _Socket()
        if self._socket_factory is None:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: self._socket, remote_addr=self._server
            )
            return
        sock = self._socket_factory()
        try:
            sock.connect(self._server)
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: self._socket, sock=sock
            )
        except BaseException:
            sock.close()
            raise

    @property
    def local_port(self) -> int:
        assert self._transport is not None, "not connected"
        return int(self._transport.get_extra_info("sockname")[1])

    async def rebind(self, server: tuple[str, int] | None = None) -> None:
        """Close the UDP socket and continue the session from a new one (a new source port);
        with ``server``, towards that address (another replica holding the same session)."""
        old = self._transport
        self._server = server or self._server
        await self._open()
        if old is not None:
            old.close()

    def send_raw(self, datagram: bytes) -> None:
        assert self._transport is not None, "not connected"
        self._transport.sendto(datagram)

    async def connect(self, host: str, port: int, timeout: float = 5.0) -> None:
        """Full handshake (RFC 6347 §4.2: flights 1, 3, 5 from us, with the cookie exchange)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._transport is None or self._server != (host, port):
            if self._transport is not None:
                self._transport.close()
            self._server = (host, port)
            await self._open()
        self._reset()
        client_random = os.urandom(32)
        transcript: list[bytes] = []
        hello = self._client_hello(client_random, b"", 0)
        # Flight 1 → HelloVerifyRequest (or straight to the ServerHello flight: §4.2.1 lets a
        # server skip the cookie; then the first ClientHello is part of the transcript).
        first = {HT_HELLO_VERIFY_REQUEST, HT_SERVER_HELLO_DONE}
        received = await self._flight([(CT_HANDSHAKE, hello)], deadline, first, 1)
        if received[0][0] == HT_HELLO_VERIFY_REQUEST:
            cookie = dtls12.hello_verify_cookie(received[0][1])
            hello = self._client_hello(client_random, cookie, 1)
            received = await self._flight(
                [(CT_HANDSHAKE, hello)], deadline, {HT_SERVER_HELLO_DONE}, 3
            )
        transcript.append(hello)
        server_random = b""
        for msg_type, body, raw in received:
            if msg_type == HT_SERVER_HELLO:
                server_random = self._server_hello(body)
            elif msg_type not in (HT_SERVER_KEY_EXCHANGE, HT_SERVER_HELLO_DONE):
                raise DtlsHandshakeError(f"unexpected handshake message type {msg_type}")
            transcript.append(raw)
        if not server_random:
            raise DtlsHandshakeError("the server's flight has no ServerHello")
        final = dtls12.final_flight(
            self.identity, self.psk, transcript, client_random, server_random,
            dtls12.seq_of(hello) + 1, extended_master_secret=self.extended_master_secret,
        )  # fmt: skip
        self._write, self._read = final.write, final.read
        received = await self._flight(final.records, deadline, {HT_FINISHED}, 5)
        if received[-1][1] != final.expected:
            raise DtlsHandshakeError("the server's Finished does not verify (RFC 5246 §7.4.9)")
        self._connected = True
        self.stats.handshakes += 1

    def _client_hello(self, client_random: bytes, cookie: bytes, message_seq: int) -> bytes:
        extensions = b""
        if self._ems_offered:
            extensions += dtls12.extension(EXT_EMS, b"")
        if self._reneg_offered:  # an empty renegotiated_connection: an initial handshake
            extensions += dtls12.extension(EXT_RENEGOTIATION_INFO, b"\x00")
        if self.offer_cid is not None:
            extensions += dtls12.connection_id_extension(self.offer_cid)
        return dtls12.client_hello(client_random, cookie, message_seq, extensions)

    def _server_hello(self, body: bytes) -> bytes:
        """ServerHello (RFC 5246 §7.4.1.3): the server random; the extensions decide the rest."""
        try:
            hello = dtls12.server_hello(body)
        except ServerHelloRefused as exc:
            raise DtlsHandshakeError(str(exc)) from None
        for ext_type, data in hello.extensions:
            if ext_type == EXT_EMS and self._ems_offered:
                self.extended_master_secret = True
            elif ext_type == EXT_CONNECTION_ID:
                if self.offer_cid is None:  # RFC 5246 §7.4.1.4: only what the client offered
                    raise DtlsHandshakeError("server sent connection_id, which we did not offer")
                if not data or data[0] != len(data) - 1:
                    raise DtlsHandshakeError(f"malformed connection_id extension {data.hex()}")
                self.negotiated_cid = data[1:]
                self._cid_in = self.offer_cid
            elif ext_type == EXT_RENEGOTIATION_INFO and data != b"\x00":
                raise DtlsHandshakeError("renegotiation_info not empty in an initial handshake")
        return hello.random

    async def _flight(
        self,
        flight: list[tuple[int, bytes]],
        deadline: float,
        last: set[int],
        number: int,
    ) -> list[HandshakeMessage]:
        """Send ``flight`` until the server's next flight has a message of a type in ``last``
        (RFC 6347 §4.2.4: retransmit the whole flight on a timer that doubles, in new records).
        Returns the server's new messages as (type, body, whole message), in message_seq order."""
        loop = asyncio.get_running_loop()
        timer, sent = self._retransmit, 0
        while True:
            epoch = 0
            for content_type, data in flight:
                self.send_raw(self._record(content_type, data, epoch))
                if content_type == CT_CHANGE_CIPHER_SPEC:
                    epoch = 1  # what follows ChangeCipherSpec is protected (RFC 5246 §7.1)
            self.stats.flights_retransmitted += 1 if sent else 0
            sent += 1
            messages: dict[int, HandshakeMessage] = {}
            wait_until = min(deadline, loop.time() + timer)
            while loop.time() < wait_until:
                for content_type, payload in await self._receive(wait_until):
                    if content_type == CT_ALERT:
                        raise DtlsAlert(payload[0], payload[1])
                    message = self._handshake_fragment(payload, content_type)
                    if message is None:
                        continue
                    seq = dtls12.seq_of(message[2])
                    if message[0] == HT_HELLO_VERIFY_REQUEST:
                        if HT_HELLO_VERIFY_REQUEST in last:  # else a late duplicate
                            messages[seq] = message
                    elif seq >= self._peer_seq:  # else a retransmission of an older flight
                        messages[seq] = message
                if any(message[0] in last for message in messages.values()):
                    if messages[max(messages)][0] != HT_HELLO_VERIFY_REQUEST:
                        self._peer_seq = max(messages) + 1
                    return [messages[seq] for seq in sorted(messages)]
            if loop.time() >= deadline or sent > self._max_retransmits:
                failures = (
                    f"; {self._auth_failures} record(s) from the server failed authentication "
                    "(a wrong PSK?)"
                    if self._auth_failures
                    else ""
                )
                raise DtlsHandshakeError(
                    f"no answer to flight {number} (RFC 6347 §4.2.4) from {self._server[0]}:"
                    f"{self._server[1]} after sending it {sent} time(s){failures}"
                )
            timer = min(timer * 2, 60.0)

    @staticmethod
    def _handshake_fragment(payload: bytes, content_type: int) -> HandshakeMessage | None:
        if content_type != CT_HANDSHAKE or len(payload) < dtls12.HANDSHAKE_HEADER:
            return None
        message = dtls12.read_handshake(payload)
        if message is None:
            raise DtlsClientError("fragmented handshake message: not supported by this client")
        return message

    # -- records -----------------------------------------------------------------------

    def _record(self, content_type: int, data: bytes, epoch: int = 1) -> bytes:
        seq = self._write_seq[epoch]
        self._write_seq[epoch] += 1
        self.stats.records_sent += 1
        if epoch == 0:
            return dtls12.seal(content_type, data, 0, seq)
        assert self._write is not None
        # With a CID: a tls12_cid record (RFC 9146 §4).
        return dtls12.seal(content_type, data, epoch, seq, self._write, self.negotiated_cid or b"")

    def seal(self, content_type: int, data: bytes) -> bytes:
        """One record as the session would send it now (a sequence number is used up)."""
        return self._record(content_type, data)

    async def _receive(self, deadline: float) -> list[tuple[int, bytes]]:
        """The records of the next datagram as (content type, plaintext); [] at ``deadline``."""
        loop = asyncio.get_running_loop()
        try:
            item = await asyncio.wait_for(self._socket.queue.get(), deadline - loop.time())
        except TimeoutError:
            return []
        if isinstance(item, Exception):
            raise DtlsClientError(f"{self._server[0]}:{self._server[1]}: {item}") from item
        out, rest = [], item
        while len(rest) >= RECORD_HEADER:
            content_type, epoch = rest[0], int.from_bytes(rest[3:5], "big")
            cid_len = len(self._cid_in) if content_type == CT_TLS12_CID else 0
            header = RECORD_HEADER + cid_len
            length = int.from_bytes(rest[header - 2 : header], "big")
            record, rest = rest[: header + length], rest[header + length :]
            if len(record) < header + length:
                self.stats.records_dropped += 1
                break
            plain = self._open_record(record, content_type, epoch, cid_len)
            if plain is None:
                self.stats.records_dropped += 1
            else:
                self.stats.records_received += 1
                out.append(plain)
        return out

    def _open_record(
        self, record: bytes, content_type: int, epoch: int, cid_len: int
    ) -> tuple[int, bytes] | None:
        if epoch == 0:
            return None if content_type == CT_TLS12_CID else (content_type, record[13:])
        if self._read is None or epoch != 1:
            return None
        if content_type == CT_TLS12_CID and (not self._cid_in or record[11 : 11 + cid_len]
                                             != self._cid_in):  # fmt: skip
            return None  # RFC 9146 §3: only the CID we asked for
        if content_type != CT_TLS12_CID and self._cid_in:
            return None  # RFC 9146 §3: a CID was negotiated, so plain records are dropped
        try:
            return dtls12.open_record(record, self._read, self._cid_in if cid_len else b"")
        except RecordAuthError as exc:
            self._auth_failures += 1
            if self._connected:
                raise DtlsDecryptError(str(exc)) from None
            return None

    # -- application data --------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self._connected:
            raise DtlsClientError("send before connect() completed")
        self.send_raw(self._record(CT_APPLICATION_DATA, data))

    async def recv(self, timeout: float = 2.0) -> bytes:
        """The next application-data record; an alert from the server raises DtlsAlert."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for content_type, payload in await self._receive(deadline):
                if content_type == CT_ALERT:
                    if payload[1] == 0 or payload[0] == 2:
                        self._connected = False
                    raise DtlsAlert(payload[0], payload[1])
                if content_type == CT_APPLICATION_DATA:
                    return payload
        raise DtlsTimeout(f"no application data from {self._server} within {timeout} s")

    async def request(self, coap: bytes, timeout: float = 2.0) -> bytes:
        self.send(coap)
        return await self.recv(timeout)

    def close(self) -> None:
        """Send close_notify (RFC 5246 §7.2.1) if a session is up, and close the socket."""
        if self._transport is None:
            return
        if self._connected:
            self.send_raw(self._record(CT_ALERT, b"\x01\x00"))
            self._connected = False
        self._transport.close()
        self._transport = None
