"""A CoAP load generator fast enough not to be the bottleneck (≥ 100k datagrams/s per process).

How it stays fast: every request is a pre-encoded datagram in which only the Message ID, the
4-byte token and (optionally) an 8-byte sequence id at the start of the payload are patched;
each client is one connected UDP socket (its own source port) driven by uvloop; the work can be
split over several worker processes whose results are merged.

Rules it keeps:

- a Message ID is never reused on one source port within EXCHANGE_LIFETIME (247 s): each socket
  uses its 65536 MIDs once (from a random start) and is then replaced by a fresh socket on a
  port not used before in this run (ports come from a range the caller hands out, see
  :class:`PortPool`; disjoint ranges for runs against the same server keep the rule across runs);
- an empty ACK means "the response comes later as a separate message"; a CON response is
  answered with an empty ACK; responses are matched by MID (piggybacked) or token (separate);
- a request unanswered after ``timeout`` seconds counts as a timeout and the client moves on
  with a NEW MID (no retransmission: on loopback nothing is lost, and a retransmission would
  hide slowness).

Modes: closed loop (``clients`` sockets, one request in flight each) and open loop (a fixed
offered ``rate`` spread round-robin over ``clients`` sockets; latency is measured from the
intended send time, so a stalled sender cannot hide queueing).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import multiprocessing
import os
import random
import socket
import struct
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.coap import codec
from proxy.coap.codec import ACK, CON, NON, RST
from proxy.coap.options import URI_PATH, URI_QUERY

GET, POST = 1, 2  # method codes (RFC 7252 §12.1.1)
MID_SPACE = 65536
EXCHANGE_LIFETIME = 247.0
TOKEN_LENGTH = 4
SEQ_LENGTH = 8

# Latency histogram: 10 µs buckets up to 1 s, slower samples kept raw.
BUCKET_SECONDS = 1e-5
BUCKETS = 100_000

_MID_TOKEN = struct.Struct(">HI")  # MID at offset 2, token right after it at offset 4
_SEQ = struct.Struct(">Q")


def code_name(code: int) -> str:
    """``0x45`` → ``"2.05"``."""
    return f"{code >> 5}.{code & 31:02d}"


# --- Datagram templates (pure), encoded by the product's codec --------------------------------


@dataclass(frozen=True)
class RequestSpec:
    """What every request of a run looks like. ``payload_size`` > 0 puts an 8-byte sequence id
    (big endian) at the start of the payload, padded with ``x`` to ``payload_size`` bytes."""

    method: int = GET
    path: str = "/.well-known/core"
    queries: tuple[str, ...] = ()
    payload_size: int = 0
    confirmable: bool = True

    @classmethod
    def wkc(cls) -> RequestSpec:
        return cls(GET, "/.well-known/core")

    @classmethod
    def telemetry(cls, topic: str = "bench/x", size: int = 100) -> RequestSpec:
        return cls(POST, "/", (f"t={topic}",), size)

    @property
    def carries_seq(self) -> bool:
        return self.payload_size > 0


@dataclass(frozen=True)
class Template:
    data: bytes
    seq_offset: int  # where the sequence id goes; -1: no payload


def build_template(spec: RequestSpec) -> Template:
    """The request with MID 0, token 0 and sequence id 0: only those get patched later."""
    if 0 < spec.payload_size < SEQ_LENGTH:
        raise ValueError(f"payload must hold the {SEQ_LENGTH}-byte sequence id")
    options = [(URI_PATH, s.encode()) for s in spec.path.split("/") if s]
    options += [(URI_QUERY, q.encode()) for q in spec.queries]
    payload = bytes(SEQ_LENGTH) + b"x" * (spec.payload_size - SEQ_LENGTH)
    kind = CON if spec.confirmable else NON
    data = codec.encode_parts(
        kind, spec.method, 0, bytes(TOKEN_LENGTH), options, payload if spec.carries_seq else b""
    )
    return Template(data, len(data) - spec.payload_size if spec.carries_seq else -1)


def patch(buffer: bytearray, seq_offset: int, mid: int, token: int, seq: int) -> bytes:
    """Write MID, token and (if the template has a payload) the sequence id; return a copy
    (the caller reuses ``buffer`` for the next request)."""
    _MID_TOKEN.pack_into(buffer, 2, mid, token)
    if seq_offset >= 0:
        _SEQ.pack_into(buffer, seq_offset, seq)
    return bytes(buffer)


def empty_ack(mid: int) -> bytes:
    return codec.encode_empty(ACK, mid)


# --- MID rotation (pure) ---------------------------------------------------------------------


class MidSequence:
    """The MIDs of one source port: each of the 65536 values once, from ``start`` on. The
    request counter doubles as the token, so a response maps back to its request by either."""

    __slots__ = ("count", "start")

    def __init__(self, start: int | None = None) -> None:
        self.start = random.randrange(MID_SPACE) if start is None else start % MID_SPACE
        self.count = 0

    @property
    def exhausted(self) -> bool:
        """True once every MID was used: the socket must be replaced (new source port)."""
        return self.count >= MID_SPACE

    def take(self) -> tuple[int, int]:
        """``(mid, counter)`` of the next request; ValueError when exhausted."""
        if self.count >= MID_SPACE:
            raise ValueError("all 65536 MIDs of this source port are used")
        counter = self.count
        self.count += 1
        return (self.start + counter) & 0xFFFF, counter

    def counter_of(self, mid: int) -> int:
        return (mid - self.start) & 0xFFFF


class PortPool:
    """Source ports handed out once each, from ``[low, high)``; a port already bound by someone
    else is skipped. When the range is used up it falls back to kernel-chosen ports (counted in
    ``fallbacks``: those could repeat a port freed less than 247 s ago)."""

    def __init__(self, low: int, high: int) -> None:
        self.next = low
        self.high = high
        self.fallbacks = 0
        self.used = 0

    def open(self, host: str, port: int) -> socket.socket:
        while True:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            local = 0
            if self.next < self.high:
                local = self.next
                self.next += 1
            else:
                self.fallbacks += 1
            try:
                sock.bind(("127.0.0.1" if host.startswith("127.") else "0.0.0.0", local))
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE and local:
                    continue
                raise
            sock.connect((host, port))
            self.used += 1
            return sock


# --- Percentiles (pure) ----------------------------------------------------------------------


def histogram_percentile(
    hist: Sequence[int], overflow_sorted: Sequence[float], q: float, width: float = BUCKET_SECONDS
) -> float:
    """Nearest-rank percentile over a histogram of ``width``-second buckets plus raw sorted
    samples beyond its last bucket; a bucket reports its upper edge. NaN when empty."""
    total = sum(hist) + len(overflow_sorted)
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index, count in enumerate(hist):
        if count:
            seen += count
            if seen >= rank:
                return (index + 1) * width
    return overflow_sorted[min(rank - seen, len(overflow_sorted)) - 1]


# --- Configuration and results ---------------------------------------------------------------


@dataclass
class LoadConfig:
    host: str
    port: int
    spec: RequestSpec = field(default_factory=RequestSpec.wkc)
    mode: str = "closed"  # or "open"
    clients: int = 64  # sockets (closed loop: requests in flight)
    rate: float = 0.0  # open loop: requests/s offered, over all workers
    duration: float = 10.0  # measured window
    warmup: float = 2.0  # before the window; not counted
    timeout: float = 5.0
    workers: int = 1
    port_range: tuple[int, int] = (20000, 21000)  # source ports, split between workers
    seq_base: int = 0  # sequence ids of worker w start at seq_base + w << 40


class LatencyFigures:
    """Rate and percentiles of a result holding ``in_window``, ``window``, ``hist`` and
    ``overflow`` (shared by the request and the handshake results)."""

    in_window: int
    window: float
    hist: Any
    overflow: list[float]

    @property
    def rate(self) -> float:
        return self.in_window / self.window if self.window > 0 else 0.0

    def latency(self, q: float) -> float:
        return histogram_percentile(self.hist, sorted(self.overflow), q)

    @property
    def p50_ms(self) -> float:
        return self.latency(0.5) * 1e3

    @property
    def p99_ms(self) -> float:
        return self.latency(0.99) * 1e3

    @property
    def p999_ms(self) -> float:
        return self.latency(0.999) * 1e3


@dataclass
class LoadResult(LatencyFigures):
    sent: int = 0
    completed: int = 0  # responses (any code) to requests, warm-up and drain included
    in_window: int = 0  # responses that arrived inside the measured window
    window: float = 0.0
    timeouts: int = 0
    separate: int = 0  # responses that came as separate messages after an empty ACK
    codes: dict[str, int] = field(default_factory=dict)
    hist: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    overflow: list[float] = field(default_factory=list)
    acked_seqs: bytes = b""  # array('Q') of the sequence ids answered 2.04
    send_errors: int = 0
    sockets: int = 0
    port_fallbacks: int = 0
    workers: int = 1
    offered_rate: float = 0.0
    worker_cpu: list[float] = field(default_factory=list)  # CPU seconds per worker process
    handshake_failures: int = 0  # DTLS sessions that could not be established

    def acked(self) -> array[int]:
        seqs = array("Q")
        seqs.frombytes(self.acked_seqs)
        return seqs

    def merge(self, other: LoadResult) -> None:
        self.sent += other.sent
        self.completed += other.completed
        self.in_window += other.in_window
        self.window = max(self.window, other.window)
        self.timeouts += other.timeouts
        self.separate += other.separate
        for code, count in other.codes.items():
            self.codes[code] = self.codes.get(code, 0) + count
        self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)]
        self.overflow += other.overflow
        self.acked_seqs += other.acked_seqs
        self.send_errors += other.send_errors
        self.sockets += other.sockets
        self.port_fallbacks += other.port_fallbacks
        self.worker_cpu += other.worker_cpu
        self.handshake_failures += other.handshake_failures

    def summary(self) -> str:
        codes = " ".join(f"{k}:{v}" for k, v in sorted(self.codes.items()))
        return (
            f"{self.rate:,.0f} req/s  p50 {self.p50_ms:.2f} ms  p99 {self.p99_ms:.2f} ms  "
            f"p99.9 {self.p999_ms:.2f} ms  sent {self.sent}  timeouts {self.timeouts}  "
            f"separate {self.separate}  codes {codes or '-'}  sockets {self.sockets}"
        )


# --- The event-loop side ---------------------------------------------------------------------

_now = time.perf_counter


class _Stats:
    """Counters shared by all clients of one worker (plain attributes: the hot path)."""

    def __init__(self) -> None:
        self.sent = 0
        self.completed = 0
        self.in_window = 0
        self.timeouts = 0
        self.separate = 0
        self.send_errors = 0
        self.codes: dict[int, int] = {}
        self.hist = [0] * BUCKETS
        self.overflow: list[float] = []
        self.acked = array("Q")
        self.window_start = math.inf
        self.window_end = math.inf

    def result(self, now: float, **extra: Any) -> LoadResult:
        """The counters as a result, the window closed at ``now`` (or at its planned end);
        ``extra``: the fields only the caller knows (sockets, send errors, CPU ...)."""
        window = min(now, self.window_end) - self.window_start
        return LoadResult(
            sent=self.sent,
            completed=self.completed,
            in_window=self.in_window,
            window=max(window, 0.0),
            timeouts=self.timeouts,
            separate=self.separate,
            codes={("RST" if c < 0 else code_name(c)): n for c, n in self.codes.items()},
            hist=self.hist,
            overflow=self.overflow,
            acked_seqs=self.acked.tobytes(),
            **extra,
        )


class _Client(asyncio.DatagramProtocol):
    """One socket. ``outstanding`` maps the request counter (= token) to
    ``[start time, sequence id, deadline, separate?]``."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.stats = worker.stats
        self.mids = MidSequence()
        self.buffer = bytearray(worker.template.data)
        self.seq_offset = worker.template.seq_offset
        self.outstanding: dict[int, list[float | int | bool]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        self.stats.send_errors += 1

    def send(self, started: float) -> None:
        """A new request (new MID, new token, new sequence id)."""
        mid, counter = self.mids.take()
        worker = self.worker
        seq = worker.next_seq
        worker.next_seq = seq + 1
        data = patch(self.buffer, self.seq_offset, mid, counter, seq)
        self.outstanding[counter] = [started, seq, _now() + worker.timeout, False]
        self.stats.sent += 1
        assert self.transport is not None
        self.transport.sendto(data)

    def datagram_received_plain(self, data: bytes) -> None:
        """A response that reached this client by another way (decrypted DTLS)."""
        self.datagram_received(data, None)

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 4:
            return
        first = data[0]
        kind = (first >> 4) & 3
        code = data[1]
        if kind in (ACK, RST):
            counter = (((data[2] << 8) | data[3]) - self.mids.start) & 0xFFFF
            entry = self.outstanding.get(counter)
            if entry is None:
                return  # late answer to a request that timed out
            if kind == ACK and code == 0:
                # Empty ACK: the response follows as a separate message.
                entry[2] = _now() + self.worker.timeout
                entry[3] = True
                return
            if kind == RST:
                code = -1
        else:
            if kind == CON:
                assert self.transport is not None
                self.transport.sendto(empty_ack((data[2] << 8) | data[3]))
            if code < 64:
                return  # a request to us: not expected
            tkl = first & 0x0F
            counter = int.from_bytes(data[4 : 4 + tkl], "big")
            entry = self.outstanding.get(counter)
            if entry is None:
                return  # a retransmitted separate response, or one that timed out
            self.stats.separate += 1
        del self.outstanding[counter]
        stats = self.stats
        now = _now()
        stats.completed += 1
        codes = stats.codes
        codes[code] = codes.get(code, 0) + 1
        if code == 0x44 and self.seq_offset >= 0:
            stats.acked.append(entry[1])  # type: ignore[arg-type]
        if stats.window_start <= now < stats.window_end:
            stats.in_window += 1
            latency = now - entry[0]  # type: ignore[operator]
            index = int(latency * 100_000)
            if index < BUCKETS:
                stats.hist[index] += 1
            else:
                stats.overflow.append(latency)
        self.worker.on_done(self)


class LoopWorker:
    """What every load worker process shares: its clients, the sweeper that times requests
    out, the measured window, the drain after it and the clean-up. A subclass opens the clients
    and says what :meth:`_sweep` does and when a client still waits for an answer
    (:meth:`_busy`)."""

    def __init__(self, config: Any, stats: _Stats) -> None:
        self.config = config
        self.stats = stats
        self.timeout: float = config.timeout
        self.clients: list[Any] = []
        self.retiring: list[Any] = []  # clients replaced, waiting for their last answers
        self.sending = False
        self._replacements: set[asyncio.Task[None]] = set()

    def _busy(self, client: Any) -> bool:
        return bool(client.outstanding)

    def _sweep(self) -> None:
        raise NotImplementedError

    def _spawn(self, replacement: Any) -> None:
        task = asyncio.ensure_future(replacement)
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self._sweep()

    async def _window(self, start_at: float, drive: Callable[[float], Any]) -> float:
        """At wall-clock ``start_at`` (shared by the workers) open the window, ``await
        drive(t0)`` until it ends, then drain: answers to requests still in flight (kept for
        the codes and the 2.04 list, outside the window) or their timeouts. Returns the CPU
        seconds this process spent."""
        config = self.config
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0 = sum(os.times()[:2])
        t0 = _now()
        stats = self.stats
        stats.window_start = t0 + config.warmup
        stats.window_end = stats.window_start + config.duration
        sweeper = asyncio.ensure_future(self._sweeper())
        self.sending = True
        try:
            await drive(t0)
            self.sending = False
            deadline = _now() + config.timeout + 0.2
            pending = (*self.clients, *self.retiring)
            # Polled: the state changes in datagram callbacks, no event to wait on.
            while _now() < deadline and any(self._busy(c) for c in pending):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            for task in list(self._replacements):
                task.cancel()
            for client in (*self.clients, *self.retiring):
                if client.transport is not None:
                    client.transport.close()
        return sum(os.times()[:2]) - cpu0

    async def _closed_loop(self, t0: float) -> None:
        """Every client's first request; the answers send the next ones (``on_done``)."""
        for client in self.clients:
            client.send(_now())
        await asyncio.sleep(max(0.0, self.stats.window_end - _now()))


class _Worker(LoopWorker):
    def __init__(self, config: LoadConfig, index: int, port_range: tuple[int, int]) -> None:
        super().__init__(config, _Stats())
        self.index = index
        self.template = build_template(config.spec)
        self.next_seq = config.seq_base + (index << 40)
        self.ports = PortPool(*port_range)
        self.closed_loop = config.mode == "closed"

    async def _open(self) -> _Client:
        loop = asyncio.get_running_loop()
        sock = self.ports.open(self.config.host, self.config.port)
        _, client = await loop.create_datagram_endpoint(lambda: _Client(self), sock=sock)
        return client

    def on_done(self, client: _Client) -> None:
        if self.closed_loop and self.sending and not client.retired:
            self._next(client)

    def _next(self, client: _Client) -> None:
        if client.mids.exhausted:
            self._retire(client)
        else:
            client.send(_now())

    def _retire(self, client: _Client) -> None:
        """Replace a socket whose MIDs are used up; keep the old one until its last answers."""
        client.retired = True
        self.retiring.append(client)
        self._spawn(self._replace(client))

    async def _replace(self, old: _Client) -> None:
        fresh = await self._open()
        self.clients[self.clients.index(old)] = fresh
        if self.closed_loop and self.sending:
            fresh.send(_now())

    def _sweep(self) -> None:
        now = _now()
        stats = self.stats
        for client in (*self.clients, *self.retiring):
            expired = [c for c, entry in client.outstanding.items() if entry[2] < now]  # type: ignore[operator]
            for counter in expired:
                del client.outstanding[counter]
                stats.timeouts += 1
                if self.closed_loop and self.sending and not client.retired:
                    self._next(client)
        for client in [c for c in self.retiring if not c.outstanding]:
            self.retiring.remove(client)
            if client.transport is not None:
                client.transport.close()

    async def run(self, start_at: float, clients: int, rate: float) -> LoadResult:
        self.clients = [await self._open() for _ in range(clients)]

        async def drive(t0: float) -> None:
            if self.closed_loop:
                await self._closed_loop(t0)
            elif clients and rate > 0:
                await self._open_loop(t0, self.stats.window_end, rate)

        cpu = await self._window(start_at, drive)
        stats = self.stats
        return stats.result(
            _now(),
            send_errors=stats.send_errors,
            sockets=self.ports.used,
            port_fallbacks=self.ports.fallbacks,
            worker_cpu=[cpu],
        )

    async def _open_loop(self, t0: float, end: float, rate: float) -> None:
        interval = 1.0 / rate
        k = 0
        position = 0
        while True:
            now = _now()
            if now >= end:
                return
            due = int((now - t0) * rate) + 1
            while k < due:
                client = self.clients[position]
                position = (position + 1) % len(self.clients)
                if client.retired:
                    continue  # its replacement is being opened: next socket
                if client.mids.exhausted:
                    self._retire(client)
                    continue
                client.send(t0 + k * interval)  # latency from the intended send time
                k += 1
            # Sleep until the next request is due; at least 1 ms (the loop's timer granularity),
            # so a fast rate goes out in small bursts instead of spinning the CPU.
            await asyncio.sleep(max(0.001, t0 + k * interval - _now()))


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _port_slice(port_range: tuple[int, int], parts: int, index: int) -> tuple[int, int]:
    low, high = port_range
    size = (high - low) // parts
    return low + index * size, low + (index + 1) * size


def _run_loop(coro: object) -> LoadResult:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type, no-any-return]


def _worker_main(config: LoadConfig, index: int, start_at: float) -> LoadResult:
    worker = _Worker(config, index, _port_slice(config.port_range, config.workers, index))
    clients = _share(config.clients, config.workers, index)
    rate = config.rate / config.workers
    return _run_loop(worker.run(start_at, clients, rate))


def _entry(target: Callable[..., Any], args: tuple[Any, ...], index: int, queue: Any) -> None:
    try:
        queue.put((index, target(*args), None))
    except BaseException as exc:
        queue.put((index, None, f"{type(exc).__name__}: {exc}"))
        raise


def run_forked(
    workers: int,
    target: Callable[..., Any],
    args_of: Callable[[int], tuple[Any, ...]],
    limit: float,
) -> Any:
    """``target(*args_of(i))`` in ``workers`` forked processes, at most ``limit`` seconds; their
    results merged into the first (``LoadResult`` and ``HandshakeResult`` both ``merge``)."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [
        context.Process(target=_entry, args=(target, args_of(i), i, queue), daemon=True)
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        parts: list[Any] = []
        deadline = time.time() + limit
        for _ in processes:
            _, part, error = queue.get(timeout=max(1.0, deadline - time.time()))
            if error is not None:
                raise RuntimeError(f"load worker failed: {error}")
            parts.append(part)
    finally:
        for process in processes:
            process.join(2)
            if process.is_alive():
                process.kill()
                process.join()
    result = parts[0]
    for part in parts[1:]:
        result.merge(part)
    return result


def run_workers(config: Any, worker_main: Callable[[Any, int, float], Any]) -> Any:
    """``worker_main(config, index, start_at)`` in ``config.workers`` processes (forked when
    more than one), the results merged; blocking."""
    if config.workers < 1 or config.clients < config.workers:
        raise ValueError("need at least one client per worker")
    if config.workers == 1:
        result = worker_main(config, 0, time.time() + 0.05)
    else:
        start_at = time.time() + 0.5 + 0.05 * config.workers
        limit = start_at - time.time() + config.warmup + config.duration + config.timeout + 30
        result = run_forked(config.workers, worker_main, lambda i: (config, i, start_at), limit)
    result.workers = config.workers
    return result


def run_load(config: LoadConfig) -> LoadResult:
    """Run one load and return the merged result (blocking; forks workers when > 1)."""
    result: LoadResult = run_workers(config, _worker_main)
    result.offered_rate = config.rate if config.mode == "open" else 0.0
    return result
