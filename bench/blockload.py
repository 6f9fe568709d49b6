"""Scenario B's load generator: many clients each fetch one large resource block by block
(RFC 7959 Block2), then start over: closed loop, one block request in flight per client. It is
:mod:`bench.loadgen`'s worker and client with another request and another meaning of an answer;
requests and responses go through the product's codec.

- the MID rules of :mod:`bench.loadgen`; every block request has a new token (RFC 7959 §2.4
  matches blocks by option, not by token);
- the first request of a transfer carries Block2 (0, M=0, our SZX): early negotiation
  (RFC 7959 §2.4); a smaller SZX in the answer is followed (late negotiation), the next block
  number computed from the byte offset;
- every payload is compared with the expected bytes at its offset (:func:`resource_body`), the
  ETag must stay the same within one transfer (RFC 7959 §2.4), Size2 must be the resource's
  size; a violation counts as ``corrupt`` and the transfer starts over, as after any answer
  other than 2.05; an unanswered block counts as a timeout and is asked again with a new MID.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from typing import Any

from bench.loadgen import (
    Client,
    LoadConfig,
    LoadResult,
    MidSequence,
    Worker,
    empty_ack,
    patch,
    path_options,
    run_load,
)
from proxy.coap import codec
from proxy.coap.codec import CON
from proxy.coap.codes import CONTENT, GET, code_text
from proxy.coap.options import BLOCK2, ETAG, SIZE2

SZX_BERT = 7  # RFC 8323: not for UDP


B_SEED = b"coap-bridge bench B"


def resource_body(size: int, seed: bytes = B_SEED) -> bytes:
    """The bytes of a resource: pseudo-random (nothing on the way can compress or guess them),
    the same in every process that asks with the same ``seed`` (F: a new one per run)."""
    return hashlib.shake_256(seed).digest(size)


def szx_of(block_size: int) -> int:
    """1024 → 6 (RFC 7959 §2.2: size = 2 ** (SZX + 4), 16 … 1024)."""
    if block_size not in (16, 32, 64, 128, 256, 512, 1024):
        raise ValueError(f"block size must be a power of two from 16 to 1024, not {block_size}")
    return block_size.bit_length() - 5


def block_value(num: int, more: bool, szx: int) -> bytes:
    return codec.uint_bytes(num << 4 | int(more) << 3 | szx)


def parse_block(value: bytes) -> tuple[int, bool, int]:
    """``(num, more, szx)`` of a Block1/Block2 option value (RFC 7959 §2.2)."""
    raw = codec.parse_uint(value)
    return raw >> 4, bool(raw & 0x08), raw & 0x07


def block_request(
    mid: int, token: bytes, path: list[tuple[int, bytes]], num: int, szx: int
) -> bytes:
    """CON GET ``path`` with Block2 (num, M=0, szx)."""
    return codec.encode_parts(
        CON, GET, mid, token, [*path, (BLOCK2, block_value(num, False, szx))], b""
    )


@dataclass(kw_only=True)
class BlockConfig(LoadConfig):
    path: str = "/blob"
    size: int = 256 * 1024  # the resource's expected length
    seed: bytes = B_SEED  # its bytes: resource_body(size, seed)
    block_size: int = 1024
    clients: int = 32


BlockResult = LoadResult  # its block fields: blocks, transfers, corrupt, ETag changes


class _Transfer:
    """Where one client stands in its transfer; survives a change of socket."""

    __slots__ = ("etag", "num", "szx")

    def __init__(self, szx: int) -> None:
        self.reset(szx)

    def reset(self, szx: int) -> None:
        self.num, self.szx, self.etag = 0, szx, b""


class _BlockClient(Client):
    def __init__(self, worker: _BlockWorker, transfer: _Transfer) -> None:
        super().__init__(worker)
        self.block_worker, self.transfer, self.path = worker, transfer, worker.path

    def request(self, mid: int, counter: int) -> tuple[bytes, int]:
        # Each (block number, SZX) encoded once per worker; only MID and token get patched.
        key = self.transfer.num << 3 | self.transfer.szx
        buffer = self.block_worker.requests.get(key)
        if buffer is None:
            data = block_request(0, bytes(4), self.path, self.transfer.num, self.transfer.szx)
            buffer = self.block_worker.requests[key] = bytearray(data)
        return patch(buffer, -1, mid, counter, 0), -1


class _BlockWorker(Worker):
    def __init__(self, config: BlockConfig, index: int) -> None:
        super().__init__(config, index)
        self.szx = szx_of(config.block_size)
        self.path = path_options(config.path)
        self.body = resource_body(config.size, config.seed)
        self.requests: dict[int, bytearray] = {}

    def make_client(self, old: Any) -> Client:
        return _BlockClient(self, old.transfer if old is not None else _Transfer(self.szx))

    def answered(self, client: Any, entry: list[Any], code: int, data: bytes) -> None:
        in_window = self.count(code, entry[0])
        try:
            message = codec.decode(data) if code == CONTENT else None
        except (codec.Unreadable, codec.FormatError):
            message, self.result.corrupt = None, self.result.corrupt + 1
        if message is not None:
            self._check(client.transfer, message, in_window)
        else:
            self.result.restarts += 1
            client.transfer.reset(self.szx)
        self.on_done(client)

    def _check(self, transfer: _Transfer, message: codec.Message, in_window: bool) -> None:
        result = self.result
        options = dict(message.options)
        block, etag, size2 = options.get(BLOCK2), options.get(ETAG, b""), options.get(SIZE2)
        payload, body = message.payload, self.body
        if block is None:  # the whole representation in one message: right only if it fits
            num, more, szx = 0, False, transfer.szx
            good = transfer.num == 0 and payload == body
        else:
            num, more, szx = parse_block(block)
            offset = num * (16 << szx)
            good = not (
                szx == SZX_BERT
                or szx > transfer.szx
                or offset != transfer.num * (16 << transfer.szx)
                or (more and len(payload) != 16 << szx)
                or not payload
                or payload != body[offset : offset + len(payload)]
                or (size2 is not None and codec.parse_uint(size2) != len(body))
                or (not more and offset + len(payload) != len(body))
            )
        if not good:
            result.corrupt += 1
        elif num and etag != transfer.etag:
            result.etag_changes += 1
            good = False
        if not good:
            result.restarts += 1
            transfer.reset(self.szx)
            return
        result.blocks_in_window += in_window
        result.block_sizes[len(payload)] = result.block_sizes.get(len(payload), 0) + 1
        transfer.etag = etag
        if more:  # late negotiation: the server's smaller size from now on
            transfer.szx = szx
            transfer.num = (num * (16 << szx) + len(payload)) >> (szx + 4)
        else:
            result.transfers += 1
            result.transfers_in_window += in_window
            transfer.reset(self.szx)


def run_blocks(config: BlockConfig) -> LoadResult:
    """Run one load and return the merged result (blocking; forks workers when > 1)."""
    return run_load(config, _BlockWorker)


def fetch_once(
    host: str, port: int, path: str, block_size: int = 1024, timeout: float = 2.0
) -> tuple[bytes, list[int], bytes | None]:
    """Fetch ``path`` block by block from one socket: ``(body, payload size of each block,
    ETag of block 0)``. Raises RuntimeError on a timeout, a code other than 2.05, a block out
    of order or an ETag that changes."""
    szx, options, mids = szx_of(block_size), path_options(path), MidSequence()
    body, sizes, etag, num = bytearray(), [], None, 0
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
                if message.code != 0 and message.token == token:
                    break  # else an empty ACK (separate response follows) or a stray
            where = f"block {num} of {path}"
            if message.code != CONTENT:
                raise RuntimeError(f"{where}: {code_text(message.code)} {message.payload[:200]!r}")
            found = dict(message.options)
            block = found.get(BLOCK2)
            if num == 0:
                etag = found.get(ETAG)
            elif found.get(ETAG) != etag:
                raise RuntimeError(f"{where}: ETag changed")
            sizes.append(len(message.payload))
            if block is None:
                if num:
                    raise RuntimeError(f"{where}: answered without Block2")
                return bytes(message.payload), sizes, etag
            got, more, got_szx = parse_block(block)
            if got << got_szx != num << szx:
                raise RuntimeError(f"asked for block {num} (SZX {szx}), got {got} (SZX {got_szx})")
            body += message.payload
            if not more:
                return bytes(body), sizes, etag
            szx, num = got_szx, len(body) >> (got_szx + 4)
