"""The CoAP load generator, and what the block-wise (:mod:`bench.blockload`) and DTLS
(:mod:`bench.dtls_loadgen`) ones build on: one result type, one worker loop, one client.

Every request is a datagram pre-encoded with the product's codec in which only the MID, a
4-byte token and an 8-byte sequence id (payload start) get patched; each client is a connected
UDP socket under uvloop; forked worker processes split the work. A MID is never reused on one
source port (RFC 7252 §4.8.2): a socket spends its 65536 MIDs once, then a fresh one takes an
unused port (:class:`PortPool`). An empty ACK means a separate response follows (RFC 7252
§5.2.2); a CON response gets an empty ACK. No retransmission: an unanswered request counts as a
timeout and the client moves on. Closed loop (one request in flight per socket) or open loop
(a fixed rate over the sockets, latency from the intended send time).
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
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, TypeVar

from proxy.coap import codec
from proxy.coap.codec import ACK, CON, NON, RST
from proxy.coap.codes import CHANGED, GET, POST, code_text
from proxy.coap.options import URI_PATH, URI_QUERY

MID_SPACE = 65536
TOKEN_LENGTH = 4
SEQ_LENGTH = 8
BUCKET_SECONDS = 1e-5  # latency histogram: 10 µs buckets up to 1 s, slower samples kept raw
BUCKETS = 100_000
_MID_TOKEN = struct.Struct(">HI")  # MID at offset 2, token right after it at offset 4
_SEQ = struct.Struct(">Q")
_now = time.perf_counter
_T = TypeVar("_T")


def code_name(code: int) -> str:
    """``0x45`` → ``"2.05"``; -1 (our mark for a Reset) → ``"RST"``."""
    return "RST" if code < 0 else code_text(code)


def path_options(path: str) -> list[tuple[int, bytes]]:
    return [(URI_PATH, segment.encode()) for segment in path.split("/") if segment]


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
    def telemetry(cls, topic: str = "bench/x", size: int = 100) -> RequestSpec:
        return cls(POST, "/", (f"t={topic}",), size)


class Template(NamedTuple):
    data: bytes
    seq_offset: int  # where the sequence id goes; -1: no payload


def build_template(spec: RequestSpec) -> Template:
    """The request with MID 0, token 0 and sequence id 0: only those get patched later."""
    if 0 < spec.payload_size < SEQ_LENGTH:
        raise ValueError(f"payload must hold the {SEQ_LENGTH}-byte sequence id")
    options = path_options(spec.path) + [(URI_QUERY, q.encode()) for q in spec.queries]
    payload = (bytes(SEQ_LENGTH) + b"x" * (spec.payload_size - SEQ_LENGTH))[: spec.payload_size]
    kind = CON if spec.confirmable else NON
    data = codec.encode_parts(kind, spec.method, 0, bytes(TOKEN_LENGTH), options, payload)
    return Template(data, len(data) - spec.payload_size if payload else -1)


def patch(buffer: bytearray, seq_offset: int, mid: int, token: int, seq: int) -> bytes:
    """Write MID, token and (if the template has a payload) the sequence id; return a copy
    (the caller reuses ``buffer`` for the next request)."""
    _MID_TOKEN.pack_into(buffer, 2, mid, token)
    if seq_offset >= 0:
        _SEQ.pack_into(buffer, seq_offset, seq)
    return bytes(buffer)


def empty_ack(mid: int) -> bytes:
    return codec.encode_empty(ACK, mid)


class MidSequence:
    """The MIDs of one source port, each of the 65536 once from ``start`` on; the request
    counter doubles as the token, so a response maps back to its request by either."""

    __slots__ = ("count", "start")

    def __init__(self, start: int | None = None) -> None:
        self.start = random.randrange(MID_SPACE) if start is None else start % MID_SPACE
        self.count = 0

    exhausted = property(lambda self: self.count >= MID_SPACE)  # then: a new source port

    def take(self) -> tuple[int, int]:
        if self.count >= MID_SPACE:
            raise ValueError("all 65536 MIDs of this source port are used")
        self.count += 1
        return (self.start + self.count - 1) & 0xFFFF, self.count - 1

    def counter_of(self, mid: int) -> int:
        return (mid - self.start) & 0xFFFF


class PortPool:
    """Source ports from ``[low, high)``, each once, a port bound by someone else skipped. Used
    up: kernel-chosen ports (counted in ``fallbacks``: they could repeat a port freed less than
    247 s ago) or, with ``wrap``, the range again (a port comes back only after all others)."""

    def __init__(self, low: int, high: int, wrap: bool = False) -> None:
        self.low, self.next, self.high, self.wrap = low, low, high, wrap
        self.fallbacks = self.used = 0

    def open(self, host: str, port: int) -> socket.socket:
        for _ in range(max(1, self.high - self.low)):
            local = self.next if self.next < self.high else 0
            self.next += bool(local)
            if self.wrap and self.next >= self.high:
                self.next = self.low
            self.fallbacks += not local
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
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
        raise OSError(errno.EADDRINUSE, f"every source port in [{self.low}, {self.high}) is busy")


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


# --- configuration and results ---------------------------------------------------------------


@dataclass
class LoadConfig:
    host: str
    port: int
    spec: RequestSpec = field(default_factory=RequestSpec)
    mode: str = "closed"  # or "open"
    clients: int = 64  # sockets (closed loop: requests in flight)
    rate: float = 0.0  # open loop: requests/s offered, over all workers
    duration: float = 10.0  # measured window
    warmup: float = 2.0  # before the window; not counted
    timeout: float = 5.0
    workers: int = 1
    port_range: tuple[int, int] = (20000, 21000)  # source ports, split between workers
    seq_base: int = 0  # sequence ids of worker w start at seq_base + w << 40


_MAXED = frozenset({"window", "workers", "offered_rate"})  # merged by max, not summed


@dataclass
class LoadResult:
    """One run of any of the generators (CoAP requests, blocks, DTLS handshakes)."""

    sent: int = 0
    completed: int = 0  # answers (any code) or handshakes, warm-up and drain included
    in_window: int = 0  # of those, inside the measured window
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
    handshake_failures: int = 0  # DTLS handshakes that did not complete
    concurrency: int = 0  # H: handshakes in flight, all workers
    # B (bench/blockload.py)
    clients: int = 0
    blocks_in_window: int = 0  # 2.05 blocks with the expected bytes
    transfers_in_window: int = 0  # whole representations, last block in the window
    transfers: int = 0  # all whole transfers, warm-up and drain included
    corrupt: int = 0  # wrong bytes, size, block number or Size2
    etag_changes: int = 0  # ETag differed between blocks of one transfer
    restarts: int = 0  # transfers started over after an error code or a corrupt block
    block_sizes: dict[int, int] = field(default_factory=dict)  # payload bytes → blocks

    def per_second(self, count: int) -> float:
        return count / self.window if self.window > 0 else 0.0

    @property
    def rate(self) -> float:
        return self.per_second(self.in_window)

    def latency_ms(self, q: float) -> float:
        return histogram_percentile(self.hist, sorted(self.overflow), q) * 1e3

    p50_ms = property(lambda self: self.latency_ms(0.5))
    p99_ms = property(lambda self: self.latency_ms(0.99))
    p999_ms = property(lambda self: self.latency_ms(0.999))
    blocks_per_second = property(lambda self: self.per_second(self.blocks_in_window))
    transfers_per_second = property(lambda self: self.per_second(self.transfers_in_window))

    def acked(self) -> array[int]:
        seqs = array("Q")
        seqs.frombytes(self.acked_seqs)
        return seqs

    def merge(self, other: LoadResult) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in _MAXED:
                setattr(self, f.name, max(mine, theirs))
            elif f.name == "hist":
                self.hist = [a + b for a, b in zip(mine, theirs, strict=True)]
            elif isinstance(mine, dict):
                for key, count in theirs.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(self, f.name, mine + theirs)

    def summary(self) -> str:
        codes = " ".join(f"{k}:{v}" for k, v in sorted(self.codes.items()))
        return (
            f"{self.rate:,.0f}/s  p50 {self.p50_ms:.2f} ms  p99 {self.p99_ms:.2f} ms  p99.9 "
            f"{self.p999_ms:.2f} ms  sent {self.sent}  completed {self.completed}  timeouts "
            f"{self.timeouts}  separate {self.separate}  codes {codes or '-'}  sockets "
            f"{self.sockets}  failed handshakes {self.handshake_failures}"
        )


# --- the event-loop side ---------------------------------------------------------------------


class Client(asyncio.DatagramProtocol):
    """One socket. ``outstanding`` maps the request counter (= token) to ``[start time,
    sequence id, deadline]``."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.mids = MidSequence()
        self.buffer = bytearray(worker.template.data)
        self.seq_offset = worker.template.seq_offset
        self.outstanding: dict[int, list[Any]] = {}
        self.transport: Any = None
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def error_received(self, exc: Exception) -> None:
        self.worker.result.send_errors += 1

    def request(self, mid: int, counter: int) -> tuple[bytes, int]:
        """The datagram of a new request and its sequence id (-1: none)."""
        worker = self.worker
        seq = worker.next_seq if self.seq_offset >= 0 else -1
        worker.next_seq += 1
        return patch(self.buffer, self.seq_offset, mid, counter, seq), seq

    def send(self, started: float) -> None:
        mid, counter = self.mids.take()
        data, seq = self.request(mid, counter)
        self.outstanding[counter] = [started, seq, _now() + self.worker.timeout]
        self.worker.result.sent += 1
        self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: object = None) -> None:
        if len(data) < 4:
            return
        kind, code = (data[0] >> 4) & 3, data[1]
        if kind in (ACK, RST):
            counter = (((data[2] << 8) | data[3]) - self.mids.start) & 0xFFFF
            entry = self.outstanding.get(counter)
            if entry is None:
                return  # late answer to a request that timed out
            if kind == ACK and code == 0:  # the response follows as a separate message
                entry[2] = _now() + self.worker.timeout
                return
            if kind == RST:
                code = -1
        else:
            if kind == CON:
                self.transport.sendto(empty_ack((data[2] << 8) | data[3]))
            if code < 64:
                return  # a request to us: not expected
            counter = int.from_bytes(data[4 : 4 + (data[0] & 0x0F)], "big")
            entry = self.outstanding.get(counter)
            if entry is None:
                return  # a retransmitted separate response, or one that timed out
            self.worker.result.separate += 1
        del self.outstanding[counter]
        self.worker.answered(self, entry, code, data)


class Worker:
    """One load process: its clients, the sweeper that times requests out, the measured
    window, the drain after it. :mod:`bench.blockload` and :mod:`bench.dtls_loadgen` change
    what a client sends and what an answer means (:meth:`answered`)."""

    def __init__(self, config: Any, index: int) -> None:
        self.config = config
        self.index = index
        self.timeout: float = config.timeout
        self.result = LoadResult()
        self.codes: dict[int, int] = {}
        self.acked = array("Q")
        self.window_start = self.window_end = math.inf
        self.template = build_template(getattr(config, "spec", RequestSpec()))
        self.next_seq = getattr(config, "seq_base", 0) + (index << 40)
        port_range = getattr(config, "port_range", None) or (0, 0)
        self.ports = PortPool(*_port_slice(port_range, config.workers, index))
        self.clients: list[Any] = []
        self.retiring: list[Any] = []  # clients replaced, waiting for their last answers
        self.sending = False
        self.closed_loop = getattr(config, "mode", "closed") == "closed"
        self._tasks: set[asyncio.Future[Any]] = set()

    def count(self, code: int | None, started: float) -> bool:
        """One answer (or handshake): counted by code, its latency kept when it lands in the
        window; True then."""
        result, now = self.result, _now()
        result.completed += 1
        if code is not None:
            self.codes[code] = self.codes.get(code, 0) + 1
        if not self.window_start <= now < self.window_end:
            return False
        result.in_window += 1
        latency = now - started
        index = int(latency * 100_000)
        if index < BUCKETS:
            result.hist[index] += 1
        else:
            result.overflow.append(latency)
        return True

    def answered(self, client: Any, entry: list[Any], code: int, data: bytes) -> None:
        self.count(code, entry[0])
        if code == CHANGED and entry[1] >= 0:
            self.acked.append(entry[1])
        self.on_done(client)

    def make_client(self, old: Any) -> Client:
        return Client(self)

    async def open(self, old: Any = None) -> Any:
        sock = self.ports.open(self.config.host, self.config.port)
        loop = asyncio.get_running_loop()
        _, client = await loop.create_datagram_endpoint(lambda: self.make_client(old), sock=sock)
        return client

    def on_done(self, client: Any) -> None:
        if self.closed_loop and self.sending and not client.retired:
            self.next(client)

    def next(self, client: Any) -> None:
        if not client.mids.exhausted:
            client.send(_now())
        elif not client.retired:  # new source port; the old one waits for its last answers
            client.retired = True
            self.retiring.append(client)
            task = asyncio.ensure_future(self._replace(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replace(self, old: Any) -> None:
        fresh = await self.open(old)
        self.clients[self.clients.index(old)] = fresh
        if self.closed_loop and self.sending:
            fresh.send(_now())

    def sweep(self) -> None:
        now = _now()
        for client in (*self.clients, *self.retiring):
            expired = [c for c, entry in client.outstanding.items() if entry[2] < now]
            for counter in expired:
                del client.outstanding[counter]
                self.result.timeouts += 1
                self.on_done(client)
        for client in [c for c in self.retiring if not c.outstanding]:
            self.retiring.remove(client)
            client.transport.close()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self.sweep()

    async def window(self, start_at: float, **extra: Any) -> LoadResult:
        """At wall-clock ``start_at`` (shared by the workers) open the window, run the loop
        until it ends, then drain: answers to requests still in flight (kept for the codes
        and the 2.04 list, outside the window) or their timeouts. The result, ``extra`` set."""
        config = self.config
        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0 = sum(os.times()[:2])
        t0 = _now()
        self.window_start = t0 + config.warmup
        self.window_end = self.window_start + config.duration
        sweeper = asyncio.ensure_future(self._sweeper())
        self.sending = True
        try:
            await self.drive(t0)
            self.sending = False
            deadline = _now() + config.timeout + 0.2
            pending = (*self.clients, *self.retiring)
            # Polled: the state changes in datagram callbacks, no event to wait on.
            while _now() < deadline and any(c.outstanding for c in pending):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            for task in list(self._tasks):
                task.cancel()
            for client in (*self.clients, *self.retiring):
                if client.transport is not None:
                    client.transport.close()
        result = self.result
        result.window = max(0.0, min(_now(), self.window_end) - self.window_start)
        result.codes = {code_name(c): n for c, n in self.codes.items()}
        result.acked_seqs = self.acked.tobytes()
        result.worker_cpu = [sum(os.times()[:2]) - cpu0]
        result.sockets = self.ports.used
        result.port_fallbacks = self.ports.fallbacks
        for name, value in extra.items():
            setattr(result, name, value)
        return result

    async def drive(self, t0: float) -> None:
        """Closed loop: every client's first request, the answers send the next ones. Open
        loop: ``rate`` requests/s round-robin over the clients, each timed from when it was due."""
        if self.closed_loop:
            for client in self.clients:
                client.send(_now())
            await asyncio.sleep(max(0.0, self.window_end - _now()))
            return
        rate = self.config.rate / self.config.workers
        if not self.clients or rate <= 0:
            return
        k = position = 0
        while _now() < self.window_end:
            due = int((_now() - t0) * rate) + 1
            while k < due:
                client = self.clients[position]
                position = (position + 1) % len(self.clients)
                if client.retired:
                    continue  # its replacement is being opened: next socket
                if client.mids.exhausted:
                    self.next(client)
                    continue
                client.send(t0 + k / rate)  # latency from the intended send time
                k += 1
            # At least 1 ms (the loop's timer granularity): small bursts, not a spinning CPU.
            await asyncio.sleep(max(0.001, t0 + k / rate - _now()))

    async def run(self, start_at: float) -> LoadResult:
        share = _share(self.config.clients, self.config.workers, self.index)
        self.clients = [await self.open() for _ in range(share)]
        return await self.window(start_at, clients=share)


# --- processes -------------------------------------------------------------------------------


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _port_slice(port_range: tuple[int, int], parts: int, index: int) -> tuple[int, int]:
    low, high = port_range
    size = (high - low) // parts
    return low + index * size, low + (index + 1) * size


def run_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _entry(target: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    try:
        queue.put((target(*args), None))
    except BaseException as exc:
        queue.put((None, f"{type(exc).__name__}: {exc}"))
        raise


def run_workers(
    config: Any, main: Callable[[Any, int, Any], LoadResult], start: Any, limit: float
) -> LoadResult:
    """``main(config, index, start)`` in ``config.workers`` processes (forked when more than
    one, at most ``limit`` seconds), their results merged; blocking."""
    if config.workers == 1:
        result = main(config, 0, start)
    else:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        processes = [
            context.Process(target=_entry, args=(main, (config, i, start), queue), daemon=True)
            for i in range(config.workers)
        ]
        for process in processes:
            process.start()
        try:
            deadline, result = time.time() + limit, LoadResult()
            for _ in processes:
                part, error = queue.get(timeout=max(1.0, deadline - time.time()))
                if error is not None:
                    raise RuntimeError(f"load worker failed: {error}")
                result.merge(part)
        finally:
            for process in processes:
                process.join(2)
                if process.is_alive():
                    process.kill()
                    process.join()
    result.workers = config.workers
    return result


def run_load(config: LoadConfig, worker: type[Worker] | None = None) -> LoadResult:
    """A closed or open loop of ``worker`` over ``config.clients`` sockets, split over
    ``config.workers`` processes that open their window at the same moment (blocking)."""
    if config.workers < 1 or config.clients < config.workers:
        raise ValueError("need at least one client per worker")
    start_at = time.time() + (0.05 if config.workers == 1 else 0.5 + 0.05 * config.workers)
    limit = start_at - time.time() + config.warmup + config.duration + config.timeout + 30

    def main(config: Any, index: int, start_at: float) -> LoadResult:
        return run_loop((worker or Worker)(config, index).run(start_at))

    result = run_workers(config, main, start_at, limit)
    result.offered_rate = config.rate if config.mode == "open" else 0.0
    return result
