"""DTLS 1.2 PSK sessions with Connection ID (RFC 9146) for scenario RB (rebinding), many in one
event loop.

The load generator of D and H (:mod:`bench.dtls_loadgen`) is tinydtls, whose client side does
not offer a Connection ID, so this is a lean client of the bench's own, written from the RFCs
on the primitives of :mod:`bench.dtls12` (shared with the tests' client): one suite,
TLS_PSK_WITH_AES_128_CCM_8 (RFC 6655, the one the proxy offers: docs/CONTRACT.md §6), the
cookie exchange (RFC 6347 §4.2.1), the PSK key exchange (RFC 4279 §2), no fragmented
handshake messages, no extended master secret (the proxy lets clients without it in:
docs/ARCHITECTURE.md "DTLS"). A session offers a zero-length CID, as a device behind a NAT
does (RFC 9146 §3): it sends the server's CID in every protected record and receives records
without one. ``cid=False``: no ``connection_id`` extension, a client as today.

:class:`Fleet` drives the scenario in phases, so the harness can read the proxy's memory and
metrics between them: :meth:`Fleet.establish` (N sessions, up to ``concurrency`` handshakes at
once), :meth:`Fleet.rebind` (every session a new UDP socket, a new source port: a NAT
rebinding), :meth:`Fleet.request_all` (one CON request each, all sent at once, retransmitted
as RFC 7252 §4.2 says until answered), :meth:`Fleet.close` (close_notify each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import dtls12
from bench.dtls12 import (
    CT_ALERT,
    CT_CHANGE_CIPHER_SPEC,
    CT_HANDSHAKE,
    CT_TLS12_CID,
    EXT_CONNECTION_ID,
    HT_FINISHED,
    HT_HELLO_VERIFY_REQUEST,
    HT_SERVER_HELLO,
    HT_SERVER_HELLO_DONE,
    RECORD_HEADER,
    HandshakeMessage,
    RecordAuthError,
    RecordKeys,
    ServerHelloRefused,
)
from bench.dtls12 import CT_APPLICATION_DATA as CT_DATA
from bench.loadgen import RequestSpec, build_template, patch
from proxy.coap.codec import ACK, CON, RST

ACK_TIMEOUT = 2.0  # RFC 7252 §4.8
ACK_RANDOM_FACTOR = 1.5


class CidError(Exception):
    """A handshake that did not complete, or a server record this client refuses."""


class Session(asyncio.DatagramProtocol):
    """One DTLS session to the server over one UDP socket (replaced by :meth:`rebind`)."""

    def __init__(self, identity: str, psk: bytes, cid: bool) -> None:
        self.identity, self.psk, self.offer_cid = identity.encode(), psk, cid
        self.server_cid: bytes | None = None  # what the server asked us to send (RFC 9146 §3)
        self.transport: asyncio.DatagramTransport | None = None
        self.on_data: Callable[[Session, bytes], None] | None = None
        self.write_seq = [0, 0]  # next record sequence number, per epoch
        self.write: RecordKeys | None = None  # client_write
        self.read: RecordKeys | None = None  # server_write
        self.peer_seq = 0  # the server's next handshake message_seq
        self.wanted: set[int] = set()  # handshake types that end the awaited server flight
        self.messages: dict[int, HandshakeMessage] = {}
        self.flight: asyncio.Future[None] | None = None
        self.dropped = 0  # records that failed to parse or authenticate
        self.alerts = 0
        self.mid = random.randrange(65536)
        self.pending: tuple[int, float, float] | None = None  # (MID, sent at, answer due)
        self.sends = 0  # transmissions of the pending request

    # -- socket ---------------------------------------------------------------------------

    async def open(self, host: str, port: int) -> None:
        # The kernel's choice of source port: DTLS requests are deduplicated by identity, not
        # by address (docs/ARCHITECTURE.md), so these ports need none of bench.loadgen's care.
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, remote_addr=(host, port))

    async def rebind(self, host: str, port: int) -> asyncio.DatagramTransport | None:
        """A new socket, the same session: what a NAT rebinding shows the server. Returns the
        old socket, for the caller to close: while it is open, no new one gets its port."""
        old = self.transport
        await self.open(host, port)
        return old

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        self.dropped += 1

    def send_raw(self, datagram: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(datagram)

    # -- records --------------------------------------------------------------------------

    def record(self, content_type: int, data: bytes, epoch: int = 1) -> bytes:
        seq = self.write_seq[epoch]
        self.write_seq[epoch] += 1
        if epoch == 0:
            return dtls12.seal(content_type, data, 0, seq)
        assert self.write is not None
        # With the server's CID: a tls12_cid record (RFC 9146 §4).
        return dtls12.seal(content_type, data, epoch, seq, self.write, self.server_cid or b"")

    def datagram_received(self, data: bytes, addr: object) -> None:
        while len(data) >= RECORD_HEADER:
            # A zero-length CID was offered, so a tls12_cid record to us has no CID in it.
            length = int.from_bytes(data[11:13], "big")
            end = RECORD_HEADER + length
            record, data = data[:end], data[end:]
            opened = self.open_record(record) if len(record) == end else None
            if opened is None:
                self.dropped += 1
                continue
            content_type, plain = opened
            if content_type == CT_HANDSHAKE:
                self.handshake_received(plain)
            elif content_type == CT_DATA and self.on_data is not None:
                self.on_data(self, plain)
            elif content_type == CT_ALERT:
                self.alerts += 1

    def open_record(self, record: bytes) -> tuple[int, bytes] | None:
        content_type, epoch = record[0], int.from_bytes(record[3:5], "big")
        if epoch == 0:
            return None if content_type == CT_TLS12_CID else (content_type, record[RECORD_HEADER:])
        if self.read is None or epoch != 1:
            return None
        try:
            return dtls12.open_record(record, self.read)
        except RecordAuthError:
            return None

    # -- handshake ------------------------------------------------------------------------

    def handshake_received(self, payload: bytes) -> None:
        message = dtls12.read_handshake(payload)
        if message is None:
            self.dropped += 1  # short or fragmented: the proxy's flights fit a datagram
            return
        msg_type, seq = message[0], dtls12.seq_of(message[2])
        if msg_type == HT_HELLO_VERIFY_REQUEST and HT_HELLO_VERIFY_REQUEST not in self.wanted:
            return  # a late duplicate
        if seq < self.peer_seq:
            return  # a retransmission of a flight already taken
        self.messages[seq] = message
        if msg_type in self.wanted and self.flight is not None and not self.flight.done():
            self.flight.set_result(None)

    async def exchange(
        self, flight: list[tuple[int, bytes]], wanted: set[int], deadline: float
    ) -> list[HandshakeMessage]:
        """Send ``flight`` (again on a doubling timer, RFC 6347 §4.2.4) until the server's
        next flight holds a message of a ``wanted`` type: its messages in order."""
        loop = asyncio.get_running_loop()
        self.wanted, self.messages = wanted, {}
        self.flight = loop.create_future()
        timer = 1.0
        while not self.flight.done():
            epoch = 0
            for content_type, data in flight:
                self.send_raw(self.record(content_type, data, epoch))
                epoch = 1 if content_type == CT_CHANGE_CIPHER_SPEC else epoch  # RFC 5246 §7.1
            wait = min(timer, deadline - loop.time())
            if wait <= 0:
                raise CidError(f"no answer to a flight of {len(flight)} record(s) in time")
            await asyncio.wait([self.flight], timeout=wait)
            timer *= 2
        await asyncio.sleep(0)  # the rest of the flight may be in the same read
        got = [self.messages[seq] for seq in sorted(self.messages)]
        if got[-1][0] != HT_HELLO_VERIFY_REQUEST:
            self.peer_seq = max(self.messages) + 1
        return got

    def client_hello(self, client_random: bytes, cookie: bytes, seq: int) -> bytes:
        # A zero-length CID: the server's records to us carry none.
        extensions = dtls12.connection_id_extension(b"") if self.offer_cid else b""
        return dtls12.client_hello(client_random, cookie, seq, extensions)

    def server_hello(self, body: bytes) -> bytes:
        try:
            hello = dtls12.server_hello(body)
        except ServerHelloRefused as exc:
            raise CidError(str(exc)) from None
        for ext_type, data in hello.extensions:
            if ext_type == EXT_CONNECTION_ID:
                if not self.offer_cid or not data or data[0] != len(data) - 1:
                    raise CidError(f"connection_id not offered or malformed: {data.hex()}")
                self.server_cid = data[1:]
        return hello.random

    async def handshake(self, within: float) -> None:
        """The full handshake, done within ``within`` seconds or CidError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        client_random = os.urandom(32)
        hello = self.client_hello(client_random, b"", 0)
        first = {HT_HELLO_VERIFY_REQUEST, HT_SERVER_HELLO_DONE}
        got = await self.exchange([(CT_HANDSHAKE, hello)], first, deadline)
        if got[0][0] == HT_HELLO_VERIFY_REQUEST:
            cookie = dtls12.hello_verify_cookie(got[0][1])
            hello = self.client_hello(client_random, cookie, 1)
            got = await self.exchange([(CT_HANDSHAKE, hello)], {HT_SERVER_HELLO_DONE}, deadline)
        transcript = [hello]
        server_random = b""
        for msg_type, body, raw in got:
            if msg_type == HT_SERVER_HELLO:
                server_random = self.server_hello(body)
            transcript.append(raw)
        if not server_random:
            raise CidError("the server's flight has no ServerHello")
        final = dtls12.final_flight(
            self.identity, self.psk, transcript, client_random, server_random,
            dtls12.seq_of(hello) + 1, extended_master_secret=False,
        )  # fmt: skip
        self.write, self.read = final.write, final.read
        got = await self.exchange(final.records, {HT_FINISHED}, deadline)
        if got[-1][1] != final.expected:
            raise CidError("the server's Finished does not verify (RFC 5246 §7.4.9)")
        if self.offer_cid and self.server_cid is None:
            raise CidError("the server did not take the connection_id extension")

    def close(self) -> None:
        """close_notify (RFC 5246 §7.2.1), then the socket."""
        if self.write is not None:
            self.send_raw(self.record(CT_ALERT, b"\x01\x00"))
            self.write = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None


@dataclass
class RequestResult:
    requests: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0
    retransmissions: int = 0
    first_try: int = 0  # answered without a retransmission
    first_try_seconds: float = 0.0  # first request sent → last of those answered
    seconds: float = 0.0  # first request sent → last one answered (or given up)
    latencies_ms: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0  # this process, over the phase


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Fleet:
    """N sessions to ``host:port`` in one event loop of its own, driven phase by phase from
    synchronous code (the harness measures between the phases)."""

    def __init__(
        self, host: str, port: int, credentials: Sequence[tuple[str, bytes]], *, cid: bool,
        concurrency: int = 32,
    ) -> None:  # fmt: skip
        self.host, self.port, self.cid, self.concurrency = host, port, cid, concurrency
        self.credentials = list(credentials)
        self.loop = asyncio.new_event_loop()
        self.sessions: list[Session] = []
        self.handshake_failures = 0
        self.errors: Counter[str] = Counter()
        self.started = 0  # credentials used so far

    def establish(self, timeout: float = 10.0, count: int | None = None) -> float:
        """One session for each of the next ``count`` credentials (None: all the others); the
        seconds it took. Failures are counted."""
        chosen = self.credentials[self.started : None if count is None else self.started + count]
        self.started += len(chosen)

        async def one(identity: str, psk: bytes, gate: asyncio.Semaphore) -> None:
            async with gate:
                for _attempt in range(3):  # as a device would, and as D's sessions do
                    session = Session(identity, psk, self.cid)
                    try:
                        await session.open(self.host, self.port)
                        await session.handshake(timeout)
                    except (CidError, OSError) as exc:
                        session.close()
                        self.handshake_failures += 1
                        self.errors[str(exc)[:120]] += 1
                        continue
                    self.sessions.append(session)
                    return

        async def run() -> None:
            gate = asyncio.Semaphore(self.concurrency)
            await asyncio.gather(*(one(i, k, gate) for i, k in chosen))

        t0 = time.monotonic()
        self.loop.run_until_complete(run())
        return time.monotonic() - t0

    def rebind(self) -> None:
        """Every session onto a new socket. The old sockets close only after all new ones are
        bound, so no session's new port is one another session used: each device gets a port
        the proxy has not seen (a NAT that hands a recently used port to another device is a
        case of its own, which the proxy meets by parking the CID session it held at that
        address)."""

        async def run() -> None:
            old = [await session.rebind(self.host, self.port) for session in self.sessions]
            for transport in old:
                if transport is not None:
                    transport.close()

        self.loop.run_until_complete(run())

    def request_all(self, spec: RequestSpec, seq_base: int, timeout: float = 30.0) -> RequestResult:
        """One CON request per session, all sent at once, each retransmitted on RFC 7252
        §4.2's doubling timer (a new record each time, the same MID) until answered or
        ``timeout`` passes. A separate response (empty ACK first) is waited for and ACKed."""
        result = RequestResult(requests=len(self.sessions))
        template = build_template(spec)
        buffer = bytearray(template.data)

        def on_data(session: Session, data: bytes) -> None:
            pending = session.pending
            if pending is None or len(data) < 4:
                return
            kind, code, mid = (data[0] >> 4) & 3, data[1], (data[2] << 8) | data[3]
            if kind == CON:  # a separate response: ACK it (RFC 7252 §5.2.2)
                session.send_raw(session.record(CT_DATA, bytes([0x60, 0, data[2], data[3]])))
            elif mid != pending[0] or kind not in (ACK, RST):
                return
            elif kind == ACK and code == 0:
                session.pending = (pending[0], pending[1], time.monotonic() + timeout)
                return
            session.pending, now = None, time.monotonic()
            if session.sends == 1:
                result.first_try += 1
                result.first_try_seconds = max(result.first_try_seconds, now - pending[1])
            result.latencies_ms.append((now - pending[1]) * 1e3)
            result.codes["RST" if kind == RST else f"{code >> 5}.{code & 31:02d}"] += 1
            left[0] -= 1
            last[0] = now
            if left[0] == 0 and not finished.done():
                finished.set_result(None)

        async def run() -> None:
            t0 = time.monotonic()
            for n, session in enumerate(self.sessions):
                session.on_data = on_data
                session.mid = (session.mid + 1) & 0xFFFF
                data = patch(buffer, template.seq_offset, session.mid, n, seq_base + n)
                session.pending, session.sends = (session.mid, t0, 0.0), 1
                session.send_raw(session.record(CT_DATA, data))
                timers[n] = (data, ACK_TIMEOUT * random.uniform(1.0, ACK_RANDOM_FACTOR))
            due = {n: t0 + timer for n, (_, timer) in timers.items()}
            while left[0] and time.monotonic() - t0 < timeout:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(finished), 0.05)
                now = time.monotonic()
                for n, at in list(due.items()):
                    session = self.sessions[n]
                    if session.pending is None:
                        del due[n]
                    elif now >= at and session.pending[2] == 0.0:
                        data, timer = timers[n]
                        session.send_raw(session.record(CT_DATA, data))
                        session.sends += 1
                        result.retransmissions += 1
                        timers[n] = (data, timer * 2)
                        due[n] = now + timer * 2
            # All answered: until the last answer; else until this gave up.
            result.seconds = (last[0] if not left[0] else time.monotonic()) - t0

        left, last = [len(self.sessions)], [0.0]
        timers: dict[int, tuple[bytes, float]] = {}
        finished: asyncio.Future[None] = self.loop.create_future()
        if not self.sessions:
            finished.set_result(None)
        cpu = _cpu()
        self.loop.run_until_complete(run())
        result.cpu_seconds = _cpu() - cpu
        result.unanswered = left[0]
        for session in self.sessions:
            session.on_data, session.pending = None, None
        return result

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions), "handshake_failures": self.handshake_failures,
            "handshake_errors": dict(self.errors.most_common(3)),
            "records_dropped": sum(s.dropped for s in self.sessions),
            "alerts": sum(s.alerts for s in self.sessions),
            "cid_length": len(self.sessions[0].server_cid or b"") if self.sessions else None,
        }  # fmt: skip

    def close(self) -> None:
        for session in self.sessions:
            session.close()
        self.sessions = []

        async def settle() -> None:
            await asyncio.sleep(0.05)  # the transports' close callbacks

        self.loop.run_until_complete(settle())
        self.loop.close()
