"""Load over coaps:// (DTLS 1.2, PSK): telemetry through established sessions, and the rate of
full handshakes. The client side is tinydtls through DTLSSocket, the library the proxy uses.

Unlike :mod:`bench.loadgen` this client cannot be made cheap: every request is encrypted and
every answer decrypted in tinydtls, behind a Python callback each way, so a worker process
manages a few thousand requests/s at most. The harness therefore reports the CPU each worker
process used (``worker_cpu``): a worker near 100% of a core means the row measures the client.

- :func:`run_sessions` (E over DTLS): every client is one PSK identity with its own UDP socket
  and tinydtls context. All sessions are established first (not measured); then each client
  keeps one CON request in flight, as :mod:`bench.loadgen`'s closed loop does, with the same
  request template, MID rules, timeouts, separate-response handling and result type. Dedup
  keys on (identity, MID) over DTLS, so distinct identities keep exchanges distinct.
- :func:`run_handshakes`: ``concurrency`` handshake loops per worker, each one a fresh socket
  (new source port) and a fresh tinydtls context per handshake — ClientHello, cookie
  (HelloVerifyRequest), ClientHello again, the PSK key exchange and both Finished — then
  close_notify, so the server frees the peer at once. Counts completed handshakes per second
  and their latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import (
    BUCKETS,
    LatencyFigures,
    LoadResult,
    LoopWorker,
    RequestSpec,
    _Client,
    _port_slice,
    _run_loop,
    _Stats,
    build_template,
    run_forked,
)

EVENT_CONNECTED = 0x01DE  # tinydtls: handshake finished
ALERT_FATAL = 2
CLOSE_NOTIFY = 0

Credential = tuple[str, bytes]  # (PSK identity, key)


def _tinydtls() -> Any:
    from DTLSSocket import dtls

    return dtls


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


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
        self, host: str, port: int, within: float, ports: PortCycle | None = None
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

    def send(self, data: bytes) -> None:
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


class PortCycle:
    """Source ports taken in turn from ``[low, high)``, wrapping around: a port comes back only
    after every other one was used (the kernel's choice may hand out a port again at once)."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, max(high, low + 1)
        self.next = low

    def open(self, host: str, port: int) -> socket.socket:
        for _ in range(self.high - self.low):
            local = self.next
            self.next = self.next + 1 if self.next + 1 < self.high else self.low
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.bind(("127.0.0.1", local))
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            sock.connect((host, port))
            return sock
        raise OSError(errno.EADDRINUSE, f"no free source port in {self.low}-{self.high}")


class _Pipe:
    """What :class:`bench.loadgen._Client` sees as its transport: ``sendto`` encrypts."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def sendto(self, data: bytes, addr: object = None) -> None:
        self.endpoint.send(data)

    def close(self) -> None:
        self.endpoint.close()


# --- configuration and results -----------------------------------------------------------------


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
    port_range: tuple[int, int] | None = None  # source ports (split between workers), cycled
    concurrency: int = 8  # handshakes: loops in flight per worker; sessions: handshakes at once


@dataclass
class HandshakeResult(LatencyFigures):
    completed: int = 0  # handshakes finished, warm-up included
    in_window: int = 0
    window: float = 0.0
    failed: int = 0  # not finished within the timeout, or refused
    hist: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    overflow: list[float] = field(default_factory=list)
    worker_cpu: list[float] = field(default_factory=list)  # CPU seconds per worker process
    workers: int = 1
    concurrency: int = 0  # handshakes in flight, all workers

    def merge(self, other: HandshakeResult) -> None:
        self.completed += other.completed
        self.in_window += other.in_window
        self.window = max(self.window, other.window)
        self.failed += other.failed
        self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)]
        self.overflow += other.overflow
        self.worker_cpu += other.worker_cpu
        self.concurrency += other.concurrency

    def summary(self) -> str:
        cpu = ", ".join(f"{c:.1f}" for c in self.worker_cpu)
        return (
            f"{self.rate:,.0f} handshakes/s  p50 {self.p50_ms:.2f} ms  p99 {self.p99_ms:.2f} ms  "
            f"completed {self.completed}  failed {self.failed}  in flight {self.concurrency}  "
            f"client CPU s per worker [{cpu}]"
        )


# --- E over DTLS: requests through established sessions ----------------------------------------


class _SessionWorker(LoopWorker):
    """Duck-types what :class:`bench.loadgen._Client` expects of its worker."""

    def __init__(self, config: DtlsLoadConfig, index: int) -> None:
        super().__init__(config, _Stats())
        self.template = build_template(config.spec)
        self.next_seq = config.seq_base + (index << 40)
        self.endpoints: list[Endpoint] = []
        self.handshake_failures = 0

    def on_done(self, client: _Client) -> None:
        if self.sending and not client.mids.exhausted:
            client.send(time.perf_counter())

    async def _establish(self, credentials: Sequence[Credential]) -> None:
        config = self.config
        gate = asyncio.Semaphore(max(1, config.concurrency))

        async def one(identity: str, psk: bytes) -> None:
            async with gate:
                for _attempt in range(3):
                    client = _Client(self)  # type: ignore[arg-type]
                    endpoint = Endpoint(identity, psk, client.datagram_received_plain)
                    if await endpoint.connect(config.host, config.port, config.handshake_timeout):
                        client.transport = _Pipe(endpoint)  # type: ignore[assignment]
                        self.clients.append(client)
                        self.endpoints.append(endpoint)
                        return
                    endpoint.close()
                    self.handshake_failures += 1

        await asyncio.gather(*(one(identity, psk) for identity, psk in credentials))

    def _sweep(self) -> None:
        now = time.perf_counter()
        for client in self.clients:
            expired = [c for c, entry in client.outstanding.items() if entry[2] < now]
            for counter in expired:
                del client.outstanding[counter]
                self.stats.timeouts += 1
                if self.sending:
                    self.on_done(client)

    async def run(self, credentials: Sequence[Credential], barrier: Any) -> LoadResult:
        try:
            await self._establish(credentials)
            if barrier is not None:
                # Every worker's sessions are up before anyone starts the clock.
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 120)
            cpu = await self._window(time.time(), self._closed_loop)
            self._sweep()
        finally:
            for endpoint in self.endpoints:
                endpoint.close()
        return self.stats.result(
            time.perf_counter(),
            send_errors=sum(e.errors for e in self.endpoints),
            sockets=len(self.endpoints),
            worker_cpu=[cpu],
            handshake_failures=self.handshake_failures,
        )


def _sessions_main(config: DtlsLoadConfig, index: int, barrier: Any) -> LoadResult:
    credentials = list(config.credentials)[index :: config.workers]
    return _run_loop(_SessionWorker(config, index).run(credentials, barrier))


# --- handshake rate ------------------------------------------------------------------------


async def _handshakes(config: DtlsLoadConfig, index: int, start_at: float) -> HandshakeResult:
    credentials = list(config.credentials)[index :: config.workers] or list(config.credentials)
    pick = itertools.cycle(credentials)
    ports = None
    if config.port_range is not None:
        ports = PortCycle(*_port_slice(config.port_range, config.workers, index))
    result = HandshakeResult(concurrency=config.concurrency)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0 = _process_cpu()
    t0 = time.perf_counter()
    window_start = t0 + config.warmup
    window_end = window_start + config.duration

    async def loop() -> None:
        while (started := time.perf_counter()) < window_end:
            identity, psk = next(pick)
            endpoint = Endpoint(identity, psk)
            try:
                ok = await endpoint.connect(
                    config.host, config.port, config.handshake_timeout, ports
                )
            finally:
                endpoint.close()
            if not ok:
                result.failed += 1
                continue
            now = time.perf_counter()
            result.completed += 1
            if window_start <= now < window_end:
                result.in_window += 1
                latency = now - started
                bucket = int(latency * 100_000)
                if bucket < BUCKETS:
                    result.hist[bucket] += 1
                else:
                    result.overflow.append(latency)

    await asyncio.gather(*(loop() for _ in range(config.concurrency)))
    result.window = max(0.0, min(time.perf_counter(), window_end) - window_start)
    result.worker_cpu = [_process_cpu() - cpu0]
    return result


def _handshakes_main(config: DtlsLoadConfig, index: int, start_at: float) -> HandshakeResult:
    return _run_loop(_handshakes(config, index, start_at))  # type: ignore[return-value]


# --- running workers ---------------------------------------------------------------------------


def run_sessions(config: DtlsLoadConfig) -> LoadResult:
    """Establish one session per credential, then load them in closed loop (blocking)."""
    if config.workers < 1 or len(config.credentials) < config.workers:
        raise ValueError("need at least one credential (client) per worker")
    limit = 120 + config.warmup + config.duration + config.timeout + 30
    if config.workers == 1:
        result = _sessions_main(config, 0, None)
    else:
        barrier = multiprocessing.get_context("fork").Barrier(config.workers)
        result = run_forked(config.workers, _sessions_main, lambda i: (config, i, barrier), limit)
    result.workers = config.workers
    return result


def run_handshakes(config: DtlsLoadConfig) -> HandshakeResult:
    """Full handshakes with fresh sessions for ``warmup + duration`` seconds (blocking)."""
    if config.workers < 1 or not config.credentials:
        raise ValueError("need a credential and a worker")
    start_at = time.time() + 0.3 + 0.05 * config.workers
    if config.workers == 1:
        result = _handshakes_main(config, 0, start_at)
    else:
        limit = 10 + config.warmup + config.duration + config.handshake_timeout + 30
        result = run_forked(
            config.workers, _handshakes_main, lambda i: (config, i, start_at), limit
        )
    result.workers = config.workers
    return result


__all__ = [
    "DtlsLoadConfig",
    "Endpoint",
    "HandshakeResult",
    "run_handshakes",
    "run_sessions",
]
