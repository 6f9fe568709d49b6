"""The ``BlockStore`` seam: request bodies being reassembled from Block1 blocks (RFC 7959 §2.5).

A transfer is named by the block-wise layer (``proxy/coap/blockwise.py``): the peer, the
request's method and URI and its Request-Tags (RFC 9175 §3.3). Every block is one call of
:meth:`BlockStore.append`, which decides in one step, atomically:

- the block continues the body (its offset is the body's length): stored, ``CONTINUE``;
- it repeats bytes already stored at that offset (a retransmission, possibly reaching another
  replica after the first copy was answered): nothing changes, ``CONTINUE`` again — so an
  intermediate block needs no cross-replica claim;
- it is block 0 and not such a repetition: a new transfer replaces whatever was stored;
- anything else — no transfer, a gap, a different fingerprint (Content-Format) at the end —
  is ``INCOMPLETE`` (4.08, RFC 7959 §2.9.2); a fingerprint mismatch also drops the transfer;
- the body would exceed ``max_body``: ``TOO_LARGE`` (4.13, §2.9.3), the transfer is dropped;
- the last block (M=0) completes it: ``COMPLETE`` with the whole body, the state is removed.

State is bounded: transfers per peer (the oldest of that peer makes room: a peer's junk only
costs that peer), transfers in total (a new one is refused, ``BUSY``), bytes per transfer
(``max_body``) and, in memory, bytes in total; and every transfer expires ``lifetime`` seconds
after its last block (EXCHANGE_LIFETIME, RFC 7252 §4.8.2, by default).

Two implementations, one contract (tests/proxy/test_block_store.py): in this process's memory,
and in Redis (``--redis-url``) so that a block reaching another replica continues the transfer.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from stores.keys import DEFAULT_PREFIX, block_index_key, block_peer_key, block_transfer_key
from stores.redis import REDIS_ERRORS, RedisConnection, connect

# RFC 7252 §4.8.2: how long a CoAP exchange, and so a block of a transfer, may still arrive.
EXCHANGE_LIFETIME = 247.0


class Outcome(enum.Enum):
    CONTINUE = "continue"  # stored, or a repetition of what is stored: 2.31
    COMPLETE = "complete"  # the last block: ``body`` is the whole body, state removed
    INCOMPLETE = "incomplete"  # no such transfer, a gap or a mismatch: 4.08
    TOO_LARGE = "too_large"  # beyond max_body: 4.13
    BUSY = "busy"  # too many transfers in progress: 5.03


@dataclass(frozen=True, slots=True)
class AppendResult:
    outcome: Outcome
    body: bytes = b""


class BlockStoreUnavailable(Exception):
    """The shared store cannot be reached (the layer falls back to this process's memory)."""


@dataclass(frozen=True, slots=True)
class BlockLimits:
    max_body: int = 65536
    per_peer: int = 4  # transfers in progress per peer
    total: int = 10_000  # transfers in progress in total
    total_bytes: int = 64 * 1024 * 1024  # memory store only; Redis: total × max_body
    lifetime: float = EXCHANGE_LIFETIME


class BlockStore(Protocol):
    async def append(
        self, transfer: str, peer: str, offset: int, data: bytes, fingerprint: bytes, last: bool
    ) -> AppendResult:
        """Add ``data`` at byte ``offset`` of ``transfer`` (module docstring for the rules).
        ``fingerprint``: what every block of one body must share (its Content-Format)."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Transfer:
    peer: str
    fingerprint: bytes
    body: bytearray
    expires: float


class MemoryBlockStore:
    """Transfers in this process: an ordered dict, oldest activity first, so expiry is a walk
    from the front that stops at the first live transfer."""

    def __init__(
        self, limits: BlockLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or BlockLimits()
        self._clock = clock
        self._transfers: OrderedDict[str, _Transfer] = OrderedDict()
        self._per_peer: dict[str, list[str]] = {}
        self._bytes = 0

    @property
    def transfers(self) -> int:
        return len(self._transfers)

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def _drop(self, transfer: str) -> None:
        entry = self._transfers.pop(transfer, None)
        if entry is None:
            return
        self._bytes -= len(entry.body)
        names = self._per_peer.get(entry.peer)
        if names is not None:
            names.remove(transfer)
            if not names:
                del self._per_peer[entry.peer]

    def _expire(self, now: float) -> None:
        while self._transfers:
            name, entry = next(iter(self._transfers.items()))
            if entry.expires > now:
                return
            self._drop(name)

    async def append(
        self, transfer: str, peer: str, offset: int, data: bytes, fingerprint: bytes, last: bool
    ) -> AppendResult:
        limits = self.limits
        now = self._clock()
        self._expire(now)
        entry = self._transfers.get(transfer)
        end = offset + len(data)
        if end > limits.max_body:
            self._drop(transfer)
            return AppendResult(Outcome.TOO_LARGE)
        if entry is not None and _repeats(entry.body, entry.fingerprint, offset, data, fingerprint):
            if last and end == len(entry.body):
                body = bytes(entry.body)
                self._drop(transfer)
                return AppendResult(Outcome.COMPLETE, body)
            self._touch(transfer, entry, now)
            return AppendResult(Outcome.CONTINUE)
        if offset == 0:
            self._drop(transfer)
            if last:
                return AppendResult(Outcome.COMPLETE, data)
            if len(self._transfers) >= limits.total or self._bytes + len(data) > limits.total_bytes:
                return AppendResult(Outcome.BUSY)
            names = self._per_peer.setdefault(peer, [])
            while len(names) >= limits.per_peer:
                self._drop(names[0])
                names = self._per_peer.setdefault(peer, [])
            names.append(transfer)
            self._transfers[transfer] = _Transfer(
                peer, fingerprint, bytearray(data), now + limits.lifetime
            )
            self._bytes += len(data)
            return AppendResult(Outcome.CONTINUE)
        if entry is None or offset != len(entry.body):
            return AppendResult(Outcome.INCOMPLETE)
        if entry.fingerprint != fingerprint:
            self._drop(transfer)
            return AppendResult(Outcome.INCOMPLETE)
        if last:
            body = bytes(entry.body) + data
            self._drop(transfer)
            return AppendResult(Outcome.COMPLETE, body)
        if self._bytes + len(data) > limits.total_bytes:
            return AppendResult(Outcome.BUSY)
        entry.body += data
        self._bytes += len(data)
        self._touch(transfer, entry, now)
        return AppendResult(Outcome.CONTINUE)

    def _touch(self, transfer: str, entry: _Transfer, now: float) -> None:
        entry.expires = now + self.limits.lifetime
        self._transfers.move_to_end(transfer)

    async def close(self) -> None:
        self._transfers.clear()
        self._per_peer.clear()
        self._bytes = 0


def _repeats(body: bytearray, stored: bytes, offset: int, data: bytes, fingerprint: bytes) -> bool:
    """A retransmitted block: the same bytes at the same place of the same kind of body."""
    end = offset + len(data)
    return bool(data) and end <= len(body) and stored == fingerprint and body[offset:end] == data


# One call per block, atomic: the transfer's value is <fingerprint length><fingerprint><body>,
# so APPEND grows the body in place; the per-peer and global sorted sets (score: expiry in
# ms) bound the number of transfers. Every key carries the {blk} hash tag (one Cluster slot).
# KEYS: transfer, peer set, global set. ARGV: offset, data, fingerprint, last, max_body,
# lifetime ms, now ms, per-peer cap, total cap.
APPEND_SCRIPT = """
local key, peers, all = KEYS[1], KEYS[2], KEYS[3]
local offset, data, fp = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local last, max_body, ttl = ARGV[4] == '1', tonumber(ARGV[5]), tonumber(ARGV[6])
local now, per_peer, total = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local function drop(name)
  redis.call('DEL', name)
  redis.call('ZREM', peers, name)
  redis.call('ZREM', all, name)
end
local function touch()
  redis.call('PEXPIRE', key, ttl)
  redis.call('ZADD', peers, now + ttl, key)
  redis.call('ZADD', all, now + ttl, key)
  redis.call('PEXPIRE', peers, ttl)
  redis.call('PEXPIRE', all, ttl)
end
local length, head, stored = -1, 0, nil
local first = redis.call('GETRANGE', key, 0, 0)
if first ~= '' then
  local n = string.byte(first)
  head = 1 + n
  stored = n > 0 and redis.call('GETRANGE', key, 1, n) or ''
  length = redis.call('STRLEN', key) - head
end
local stop = offset + #data
if stop > max_body then
  if length >= 0 then drop(key) end
  return {'too_large'}
end
if length >= 0 and #data > 0 and stop <= length and stored == fp
    and redis.call('GETRANGE', key, head + offset, head + stop - 1) == data then
  if last and stop == length then
    local body = redis.call('GETRANGE', key, head, -1)
    drop(key)
    return {'complete', body}
  end
  touch()
  return {'continue'}
end
if offset == 0 then
  if length >= 0 then drop(key) end
  if last then return {'complete', data} end
  redis.call('ZREMRANGEBYSCORE', all, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', peers, '-inf', now)
  if redis.call('ZCARD', all) >= total then return {'busy'} end
  while redis.call('ZCARD', peers) >= per_peer do
    drop(redis.call('ZRANGE', peers, 0, 0)[1])
  end
  redis.call('SET', key, string.char(#fp) .. fp .. data)
  touch()
  return {'continue'}
end
if length < 0 or offset ~= length then return {'incomplete'} end
if stored ~= fp then
  drop(key)
  return {'incomplete'}
end
if last then
  local body = redis.call('GETRANGE', key, head, -1) .. data
  drop(key)
  return {'complete', body}
end
redis.call('APPEND', key, data)
touch()
return {'continue'}
"""


class RedisBlockStore:
    """Transfers in Redis, shared by every replica (keys: ``stores.keys.block_*``)."""

    def __init__(
        self,
        connection: RedisConnection,
        *,
        prefix: str = DEFAULT_PREFIX,
        limits: BlockLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or BlockLimits()
        self._connection = connection
        self._prefix = prefix
        self._clock = clock  # wall clock: the sets' scores are compared across replicas
        self._script = connection.client.register_script(APPEND_SCRIPT)
        self._all = block_index_key(prefix)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = DEFAULT_PREFIX, limits: BlockLimits | None = None
    ) -> RedisBlockStore:
        return cls(connect(url, timeout=1.0, retries=0), prefix=prefix, limits=limits)

    async def append(
        self, transfer: str, peer: str, offset: int, data: bytes, fingerprint: bytes, last: bool
    ) -> AppendResult:
        limits = self.limits
        keys = [
            block_transfer_key(transfer, self._prefix),
            block_peer_key(peer, self._prefix),
            self._all,
        ]
        args: list[bytes | int] = [
            offset,
            data,
            fingerprint,
            1 if last else 0,
            limits.max_body,
            int(limits.lifetime * 1000),
            int(self._clock() * 1000),
            limits.per_peer,
            limits.total,
        ]
        try:
            reply = await self._script(keys=keys, args=args)
        except REDIS_ERRORS as exc:
            raise BlockStoreUnavailable(str(exc)) from exc
        outcome = Outcome(reply[0].decode())
        return AppendResult(outcome, reply[1] if len(reply) > 1 else b"")

    async def close(self) -> None:
        await self._connection.aclose()
