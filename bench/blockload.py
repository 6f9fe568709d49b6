"""Scenario B's load generator: many clients each fetch one large resource block by block
(RFC 7959 Block2), then start over: closed loop, one block request in flight per client.

Every request and response goes through the product's codec (``proxy.coap.codec``,
``proxy.coap.options``), not a second encoder. Rules, as in :mod:`bench.loadgen`:

- a Message ID is never reused on one source port (each socket spends its 65536 MIDs once,
  then the client moves to a fresh port from the caller's range), so a server's deduplication
  (RFC 7252 §4.5, EXCHANGE_LIFETIME 247 s) never answers from its cache;
- every block request has a new token (RFC 7959 §2.4 matches blocks by option, not by token);
- the first request of a transfer carries Block2 (0, M=0, our SZX): early negotiation
  (RFC 7959 §2.4); a server that answers with a smaller SZX is followed (late negotiation), the
  next block number computed from the byte offset;
- every payload is compared with the expected bytes at its offset (:func:`resource_body`), the
  ETag must stay the same within one transfer (RFC 7959 §2.4), and Size2, when present, must
  be the resource's size; a violation counts as ``corrupt`` and the transfer starts over;
- a block unanswered after ``timeout`` counts as a timeout and is asked again with a new MID;
  any answer other than 2.05 counts by code and the transfer starts over.

Figures: block requests answered per second (any code), good blocks per second, whole
transfers per second, latency per block request (p50/p99).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import socket
import time
from dataclasses import dataclass, field

from bench.loadgen import (
    BUCKETS,
    LoadResult,
    LoopWorker,
    MidSequence,
    PortPool,
    _port_slice,
    _run_loop,
    _share,
    _Stats,
    empty_ack,
    run_workers,
)
from proxy.coap import codec
from proxy.coap.codec import ACK, CON, RST
from proxy.coap.options import BLOCK2, ETAG, SIZE2, URI_PATH

GET = 1
CONTENT = 0x45  # 2.05
SZX_BERT = 7  # RFC 8323: not for UDP


def resource_body(size: int) -> bytes:
    """The bytes of scenario B's resource: pseudo-random (nothing on the way can compress or
    guess them), the same in every process that asks."""
    return hashlib.shake_256(b"coap-bridge bench B").digest(size)


def szx_of(block_size: int) -> int:
    """1024 → 6 (RFC 7959 §2.2: size = 2 ** (SZX + 4), 16 … 1024)."""
    szx = block_size.bit_length() - 5
    if block_size not in (16, 32, 64, 128, 256, 512, 1024):
        raise ValueError(f"block size must be a power of two from 16 to 1024, not {block_size}")
    return szx


def block_value(num: int, more: bool, szx: int) -> bytes:
    return codec.uint_bytes(num << 4 | int(more) << 3 | szx)


def parse_block(value: bytes) -> tuple[int, bool, int]:
    """``(num, more, szx)`` of a Block1/Block2 option value (RFC 7959 §2.2)."""
    raw = codec.parse_uint(value)
    return raw >> 4, bool(raw & 0x08), raw & 0x07


def path_options(path: str) -> list[tuple[int, bytes]]:
    return [(URI_PATH, segment.encode()) for segment in path.split("/") if segment]


def block_request(
    mid: int, token: bytes, path: list[tuple[int, bytes]], num: int, szx: int
) -> bytes:
    """CON GET ``path`` with Block2 (num, M=0, szx)."""
    return codec.encode_parts(
        CON, GET, mid, token, [*path, (BLOCK2, block_value(num, False, szx))], b""
    )


# --- configuration and results ---------------------------------------------------------------


@dataclass
class BlockConfig:
    host: str
    port: int
    path: str = "/blob"
    size: int = 256 * 1024  # the resource's expected length
    block_size: int = 1024
    clients: int = 32
    duration: float = 10.0
    warmup: float = 2.0
    timeout: float = 5.0
    workers: int = 1
    port_range: tuple[int, int] = (20000, 21000)


@dataclass
class BlockResult(LoadResult):
    """``in_window``/``rate``/percentiles: block requests answered (any code) in the window."""

    blocks_in_window: int = 0  # 2.05 blocks with the expected bytes
    transfers_in_window: int = 0  # whole representations received, last block in the window
    transfers: int = 0  # all whole transfers, warm-up and drain included
    corrupt: int = 0  # wrong bytes, size, block number, Size2; no Block2 on a partial body
    etag_changes: int = 0  # ETag differed between blocks of one transfer
    restarts: int = 0  # transfers started over after an error code or a corrupt block
    block_sizes: dict[int, int] = field(default_factory=dict)  # payload bytes per block → count
    clients: int = 0

    @property
    def blocks_per_second(self) -> float:
        return self.blocks_in_window / self.window if self.window > 0 else 0.0

    @property
    def transfers_per_second(self) -> float:
        return self.transfers_in_window / self.window if self.window > 0 else 0.0

    def merge(self, other: LoadResult) -> None:
        super().merge(other)
        if isinstance(other, BlockResult):
            self.blocks_in_window += other.blocks_in_window
            self.transfers_in_window += other.transfers_in_window
            self.transfers += other.transfers
            self.corrupt += other.corrupt
            self.etag_changes += other.etag_changes
            self.restarts += other.restarts
            self.clients += other.clients
            for size, count in other.block_sizes.items():
                self.block_sizes[size] = self.block_sizes.get(size, 0) + count

    def summary(self) -> str:
        codes = " ".join(f"{k}:{v}" for k, v in sorted(self.codes.items()))
        return (
            f"{self.rate:,.0f} block req/s  {self.blocks_per_second:,.0f} blocks/s  "
            f"{self.transfers_per_second:,.2f} transfers/s  p50 {self.p50_ms:.2f} ms  "
            f"p99 {self.p99_ms:.2f} ms  sent {self.sent}  timeouts {self.timeouts}  "
            f"corrupt {self.corrupt}  ETag changes {self.etag_changes}  "
            f"codes {codes or '-'}  sockets {self.sockets}"
        )


class _BlockStats(_Stats):
    def __init__(self) -> None:
        super().__init__()
        self.blocks_in_window = 0
        self.transfers_in_window = 0
        self.transfers = 0
        self.corrupt = 0
        self.etag_changes = 0
        self.restarts = 0
        self.block_sizes: dict[int, int] = {}


# --- the event-loop side ---------------------------------------------------------------------

_now = time.perf_counter


class _Transfer:
    """Where one client stands in its transfer; survives a change of socket."""

    __slots__ = ("etag", "num", "szx")

    def __init__(self, szx: int) -> None:
        self.num = 0
        self.szx = szx
        self.etag: bytes | None = None


class _BlockClient(asyncio.DatagramProtocol):
    """One socket, one block request in flight."""

    def __init__(self, worker: _BlockWorker, transfer: _Transfer) -> None:
        self.worker = worker
        self.stats = worker.stats
        self.transfer = transfer
        self.mids = MidSequence()
        self.transport: asyncio.DatagramTransport | None = None
        self.pending_mid = -1  # -1: nothing in flight
        self.pending_token = b""
        self.started = 0.0
        self.deadline = math.inf
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        self.stats.send_errors += 1

    def send(self, started: float) -> None:
        mid, counter = self.mids.take()
        token = counter.to_bytes(4, "big")
        transfer = self.transfer
        data = block_request(mid, token, self.worker.path, transfer.num, transfer.szx)
        self.pending_mid = mid
        self.pending_token = token
        self.started = started
        self.deadline = started + self.worker.timeout
        self.stats.sent += 1
        assert self.transport is not None
        self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: object) -> None:
        try:
            message = codec.decode(data)
        except (codec.Unreadable, codec.FormatError):
            self.stats.corrupt += 1
            return
        kind = message.mtype
        if kind == CON:
            assert self.transport is not None
            self.transport.sendto(empty_ack(message.mid))
        if self.pending_mid < 0:
            return  # late: its request timed out
        if kind in (ACK, RST):
            if message.mid != self.pending_mid:
                return
            if kind == ACK and message.code == 0:
                # Empty ACK: the response follows as a separate message (RFC 7252 §5.2.2).
                self.deadline = _now() + self.worker.timeout
                return
        elif message.code < 64 or message.token != self.pending_token:
            return
        else:
            self.stats.separate += 1
        self.pending_mid = -1
        self._answered(-1 if kind == RST else message.code, message)
        self.worker.on_done(self)

    def _answered(self, code: int, message: codec.Message) -> None:
        stats = self.stats
        now = _now()
        stats.completed += 1
        stats.codes[code] = stats.codes.get(code, 0) + 1
        in_window = stats.window_start <= now < stats.window_end
        if in_window:
            stats.in_window += 1
            latency = now - self.started
            index = int(latency * 100_000)
            if index < BUCKETS:
                stats.hist[index] += 1
            else:
                stats.overflow.append(latency)
        transfer = self.transfer
        if code != CONTENT:
            self._restart()
            return
        block = etag = size2 = None
        for number, value in message.options:
            if number == BLOCK2:
                block = value
            elif number == ETAG:
                etag = value
            elif number == SIZE2:
                size2 = value
        payload = message.payload
        worker = self.worker
        if block is None:
            # The whole representation in one message: only right when it fits.
            if transfer.num == 0 and payload == worker.body:
                self._block_ok(len(payload), in_window)
                self._transfer_done(in_window)
            else:
                self._corrupt()
            return
        num, more, szx = parse_block(block)
        offset = num * (16 << szx)
        expected_offset = transfer.num * (16 << transfer.szx)
        if (
            szx == SZX_BERT
            or szx > transfer.szx
            or offset != expected_offset
            or (more and len(payload) != 16 << szx)
            or not payload
            or payload != worker.body[offset : offset + len(payload)]
            or (size2 is not None and codec.parse_uint(size2) != len(worker.body))
        ):
            self._corrupt()
            return
        if transfer.etag is None or num == 0:
            transfer.etag = etag
        elif etag != transfer.etag:
            stats.etag_changes += 1
            self._restart()
            return
        self._block_ok(len(payload), in_window)
        if more:
            transfer.szx = szx  # late negotiation: the server's smaller size from now on
            transfer.num = (offset + len(payload)) >> (szx + 4)
        elif offset + len(payload) == len(worker.body):
            self._transfer_done(in_window)
        else:
            self._corrupt()  # the last block ends short of the whole representation

    def _block_ok(self, size: int, in_window: bool) -> None:
        stats = self.stats
        if in_window:
            stats.blocks_in_window += 1
        stats.block_sizes[size] = stats.block_sizes.get(size, 0) + 1

    def _transfer_done(self, in_window: bool) -> None:
        stats = self.stats
        stats.transfers += 1
        if in_window:
            stats.transfers_in_window += 1
        self._reset()

    def _corrupt(self) -> None:
        self.stats.corrupt += 1
        self._restart()

    def _restart(self) -> None:
        self.stats.restarts += 1
        self._reset()

    def _reset(self) -> None:
        transfer = self.transfer
        transfer.num = 0
        transfer.szx = self.worker.szx
        transfer.etag = None


class _BlockWorker(LoopWorker):
    stats: _BlockStats

    def __init__(self, config: BlockConfig, port_range: tuple[int, int]) -> None:
        super().__init__(config, _BlockStats())
        self.szx = szx_of(config.block_size)
        self.path = path_options(config.path)
        self.body = resource_body(config.size)
        self.ports = PortPool(*port_range)

    async def _open(self, transfer: _Transfer) -> _BlockClient:
        loop = asyncio.get_running_loop()
        sock = self.ports.open(self.config.host, self.config.port)
        _, client = await loop.create_datagram_endpoint(
            lambda: _BlockClient(self, transfer), sock=sock
        )
        return client

    def _busy(self, client: _BlockClient) -> bool:
        return client.pending_mid >= 0

    def on_done(self, client: _BlockClient) -> None:
        if self.sending and not client.retired:
            self._next(client)

    def _next(self, client: _BlockClient) -> None:
        if client.mids.exhausted:
            client.retired = True
            self._spawn(self._replace(client))
        else:
            client.send(_now())

    async def _replace(self, old: _BlockClient) -> None:
        """A socket whose MIDs are used up: the transfer goes on from a fresh source port."""
        fresh = await self._open(old.transfer)
        self.clients[self.clients.index(old)] = fresh
        if old.transport is not None:
            old.transport.close()
        if self.sending:
            fresh.send(_now())

    def _sweep(self) -> None:
        now = _now()
        for client in self.clients:
            if client.pending_mid >= 0 and client.deadline < now:
                client.pending_mid = -1
                self.stats.timeouts += 1
                if self.sending and not client.retired:
                    self._next(client)  # the same block again, new MID and token

    async def run(self, start_at: float, clients: int) -> BlockResult:
        self.clients = [await self._open(_Transfer(self.szx)) for _ in range(clients)]
        cpu = await self._window(start_at, self._closed_loop)
        stats = self.stats
        base = stats.result(
            _now(),
            send_errors=stats.send_errors,
            sockets=self.ports.used,
            port_fallbacks=self.ports.fallbacks,
            worker_cpu=[cpu],
        )
        return BlockResult(
            **{name: getattr(base, name) for name in LoadResult.__dataclass_fields__},
            blocks_in_window=stats.blocks_in_window,
            transfers_in_window=stats.transfers_in_window,
            transfers=stats.transfers,
            corrupt=stats.corrupt,
            etag_changes=stats.etag_changes,
            restarts=stats.restarts,
            block_sizes=stats.block_sizes,
            clients=clients,
        )


def _worker_main(config: BlockConfig, index: int, start_at: float) -> BlockResult:
    worker = _BlockWorker(config, _port_slice(config.port_range, config.workers, index))
    clients = _share(config.clients, config.workers, index)
    return _run_loop(worker.run(start_at, clients))  # type: ignore[return-value]


def run_blocks(config: BlockConfig) -> BlockResult:
    """Run one load and return the merged result (blocking; forks workers when > 1)."""
    result: BlockResult = run_workers(config, _worker_main)
    return result


# --- one transfer, blocking (the harness's check before the load) -----------------------------


def fetch_once(
    host: str, port: int, path: str, block_size: int = 1024, timeout: float = 2.0
) -> tuple[bytes, list[int], bytes | None]:
    """Fetch ``path`` block by block from one socket: ``(body, payload size of each block,
    ETag of block 0)``. Raises RuntimeError on a timeout, a code other than 2.05, a block out
    of order or an ETag that changes."""
    szx = szx_of(block_size)
    options = path_options(path)
    body = bytearray()
    sizes: list[int] = []
    etag: bytes | None = None
    num = 0
    mids = MidSequence()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        while True:
            mid, counter = mids.take()
            token = counter.to_bytes(4, "big")
            sock.send(block_request(mid, token, options, num, szx))
            while True:
                try:
                    message = codec.decode(sock.recv(65536))
                except TimeoutError:
                    raise RuntimeError(f"block {num} of {path}: no answer in {timeout} s") from None
                if message.mtype == CON:
                    sock.send(empty_ack(message.mid))
                if message.code == 0 or message.token != token:
                    continue  # an empty ACK (separate response follows) or a stray
                break
            if message.code != CONTENT:
                raise RuntimeError(
                    f"block {num} of {path}: {message.code >> 5}.{message.code & 31:02d} "
                    f"{message.payload[:200]!r}"
                )
            options_of = dict(message.options)
            block = options_of.get(BLOCK2)
            if num == 0:
                etag = options_of.get(ETAG)
            elif options_of.get(ETAG) != etag:
                raise RuntimeError(f"block {num} of {path}: ETag changed")
            sizes.append(len(message.payload))
            if block is None:
                if num:
                    raise RuntimeError(f"block {num} of {path}: answered without Block2")
                return bytes(message.payload), sizes, etag
            got, more, got_szx = parse_block(block)
            if got << got_szx != num << szx:
                raise RuntimeError(f"asked for block {num} (SZX {szx}), got {got} (SZX {got_szx})")
            body += message.payload
            if not more:
                return bytes(body), sizes, etag
            szx = got_szx
            num = len(body) >> (szx + 4)
