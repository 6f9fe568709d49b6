"""Load over coaps:// (DTLS 1.2, PSK, RFC 6347) with tinydtls through DTLSSocket, the library
the proxy uses. Every request is encrypted and every answer decrypted behind a Python callback,
so a worker manages a few thousand requests/s at most: the rows report each worker's CPU
(``worker_cpu``), and a worker near a full core means the row measures the client.

- :func:`run_sessions` (E over DTLS): one PSK identity, socket and tinydtls context per client;
  all sessions established first (not measured), then :mod:`bench.loadgen`'s closed loop
  through them. Dedup keys on (identity, MID) over DTLS, so identities keep exchanges apart.
- :func:`run_handshakes` (H): ``concurrency`` loops per worker, each handshake on a fresh
  socket and context (ClientHello, HelloVerifyRequest cookie, ClientHello, PSK key exchange,
  both Finished), then close_notify so the server frees the peer at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import Client, LoadResult, PortPool, RequestSpec, Worker, run_loop, run_workers

EVENT_CONNECTED = 0x01DE  # tinydtls: handshake finished
ALERT_FATAL = 2
CLOSE_NOTIFY = 0

Credential = tuple[str, bytes]  # (PSK identity, key)


def _tinydtls() -> Any:
    from DTLSSocket import dtls

    return dtls


# --- one DTLS client session -----------------------------------------------------------------


class _Wire:
    """What tinydtls' callbacks touch. It holds no reference to the tinydtls context, so the
    context is freed the moment its owner drops it (no cycle for the garbage collector to
    break in an order that would let tinydtls call into half-cleared objects)."""

    __slots__ = ("closed", "connected", "plaintext", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.plaintext: list[bytes] = []
        self.connected: asyncio.Future[bool] | None = None
        self.closed = False

    def write(self, addr: object, data: bytes) -> int:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.sendto(data)
        return len(data)

    def read(self, addr: object, data: bytes) -> int:
        self.plaintext.append(data)
        return len(data)

    def event(self, level: int, code: int) -> None:
        if code == EVENT_CONNECTED:
            if self.connected is not None and not self.connected.done():
                self.connected.set_result(True)
        elif level == ALERT_FATAL or code == CLOSE_NOTIFY:
            self.closed = True
            if self.connected is not None and not self.connected.done():
                self.connected.set_result(False)


class Endpoint(asyncio.DatagramProtocol):
    """A DTLS client: one UDP socket (its own source port), one tinydtls context, one session.
    ``on_plaintext(data)`` gets each decrypted datagram, outside tinydtls' callbacks (so it
    may call :meth:`send` at once). Always :meth:`close` it: that is what frees tinydtls."""

    def __init__(
        self, identity: str, psk: bytes, on_plaintext: Callable[[bytes], None] | None = None
    ) -> None:
        key = identity.encode()
        self.wire = _Wire()
        self._dtls: Any = _tinydtls().DTLS(
            read=self.wire.read,
            write=self.wire.write,
            event=self.wire.event,
            pskId=key,
            pskStore={key: psk},
        )
        self._connection: Any = None
        self._peer: tuple[str, int] = ("", 0)
        self.on_plaintext = on_plaintext
        self.transport: asyncio.DatagramTransport | None = None
        self.errors = 0

    async def connect(
        self, host: str, port: int, within: float, ports: PortPool | None = None
    ) -> bool:
        """True once the handshake completed within ``within`` seconds. ``ports``: where the
        source port comes from (default: the kernel's choice)."""
        loop = asyncio.get_running_loop()
        if ports is None:
            await loop.create_datagram_endpoint(lambda: self, remote_addr=(host, port))
        else:
            await loop.create_datagram_endpoint(lambda: self, sock=ports.open(host, port))
        self._peer = ("::ffff:" + host, port)
        self.wire.connected = loop.create_future()
        self._connection = self._dtls.connect(*self._peer)
        deadline = loop.time() + within
        # tinydtls retransmits handshake flights from checkRetransmit(): give it a few ticks.
        while not self.wire.connected.done():
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.wire.connected), min(left, 0.5))
            if not self.wire.connected.done() and self._dtls is not None:
                self._dtls.checkRetransmit()
        return bool(self.wire.connected.result())

    def sendto(self, data: bytes, addr: object = None) -> None:
        """Encrypted to the server: an Endpoint is its :class:`bench.loadgen.Client`'s
        transport."""
        if self._connection is not None:
            self._dtls.write(self._connection, data)

    def close(self) -> None:
        """close_notify to the server, then free the socket and the tinydtls context."""
        connection, self._connection = self._connection, None
        del connection  # DTLSSocket's Connection resets its peer when freed: close_notify
        self.wire.transport = None
        self.wire.connected = None
        if self.transport is not None:
            self.transport.close()
        self._dtls = None

    # asyncio.DatagramProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.wire.transport = self.transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        if self._dtls is None:
            return
        try:
            self._dtls.handleMessageAddr(self._peer[0], self._peer[1], data)
        except Exception:
            self.errors += 1
            return
        wire = self.wire
        if wire.plaintext:
            plaintext, wire.plaintext = wire.plaintext, []
            if self.on_plaintext is not None:
                for datagram in plaintext:
                    self.on_plaintext(datagram)

    def error_received(self, exc: Exception) -> None:
        self.errors += 1


@dataclass
class DtlsLoadConfig:
    host: str
    port: int
    credentials: Sequence[Credential]  # sessions: one per client; handshakes: cycled through
    spec: RequestSpec = field(default_factory=RequestSpec.telemetry)
    duration: float = 10.0
    warmup: float = 1.0
    timeout: float = 5.0
    workers: int = 1
    seq_base: int = 0  # sequence ids of worker w start at seq_base + w << 40
    handshake_timeout: float = 10.0
    port_range: tuple[int, int] | None = None  # H: source ports (split between workers), cycled
    concurrency: int = 8  # H: handshake loops per worker; sessions: handshakes at once


class _SessionWorker(Worker):
    """E over DTLS: :class:`bench.loadgen.Client` s whose transport encrypts."""

    def next(self, client: Any) -> None:
        if not client.mids.exhausted:  # a session cannot move to a fresh source port
            client.send(time.perf_counter())

    async def sessions(self, barrier: Any) -> LoadResult:
        """One session per credential of this worker (up to ``concurrency`` handshakes at once,
        three tries each), then the closed loop through them."""
        config = self.config
        gate = asyncio.Semaphore(max(1, config.concurrency))

        async def establish(identity: str, psk: bytes) -> None:
            async with gate:
                for _attempt in range(3):
                    client = Client(self)
                    client.transport = endpoint = Endpoint(identity, psk, client.datagram_received)
                    if await endpoint.connect(config.host, config.port, config.handshake_timeout):
                        self.clients.append(client)
                        return
                    endpoint.close()
                    self.result.handshake_failures += 1

        try:
            mine = list(config.credentials)[self.index :: config.workers]
            await asyncio.gather(*(establish(identity, psk) for identity, psk in mine))
            if barrier is not None:
                # Every worker's sessions are up before anyone starts the clock.
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 120)
            errors = sum(client.transport.errors for client in self.clients)
            return await self.window(time.time(), sockets=len(self.clients), send_errors=errors)
        finally:
            for client in self.clients:
                client.transport.close()


class _HandshakeWorker(Worker):
    """``concurrency`` loops, each a fresh socket and tinydtls context per handshake."""

    async def drive(self, t0: float) -> None:
        config = self.config
        mine = list(config.credentials)[self.index :: config.workers]
        pick = itertools.cycle(mine or list(config.credentials))
        self.ports.wrap = True
        ports = self.ports if config.port_range is not None else None

        async def loop() -> None:
            while (started := time.perf_counter()) < self.window_end:
                endpoint = Endpoint(*next(pick))
                try:
                    done = await endpoint.connect(
                        config.host, config.port, config.handshake_timeout, ports
                    )
                finally:
                    endpoint.close()
                if done:
                    self.count(None, started)
                else:
                    self.result.handshake_failures += 1

        await asyncio.gather(*(loop() for _ in range(config.concurrency)))


def _sessions_main(config: DtlsLoadConfig, index: int, barrier: Any) -> LoadResult:
    return run_loop(_SessionWorker(config, index).sessions(barrier))


def _handshakes_main(config: DtlsLoadConfig, index: int, start_at: float) -> LoadResult:
    return run_loop(
        _HandshakeWorker(config, index).window(start_at, concurrency=config.concurrency, sockets=0)
    )


def run_sessions(config: DtlsLoadConfig) -> LoadResult:
    """Establish one session per credential, then load them in closed loop (blocking)."""
    if config.workers < 1 or len(config.credentials) < config.workers:
        raise ValueError("need at least one credential (client) per worker")
    barrier = (
        multiprocessing.get_context("fork").Barrier(config.workers) if config.workers > 1 else None
    )
    limit = 120 + config.warmup + config.duration + config.timeout + 30
    return run_workers(config, _sessions_main, barrier, limit)


def run_handshakes(config: DtlsLoadConfig) -> LoadResult:
    """Full handshakes with fresh sessions for ``warmup + duration`` seconds (blocking)."""
    if config.workers < 1 or not config.credentials:
        raise ValueError("need a credential and a worker")
    start_at = time.time() + 0.3 + 0.05 * config.workers
    limit = 10 + config.warmup + config.duration + config.handshake_timeout + 30
    return run_workers(config, _handshakes_main, start_at, limit)
