"""The exactly-once ledger: who handles a message, and what it was answered (docs/CONTRACT.md §5,
§11).

Both sides keep one. The proxy claims each CoAP exchange before forwarding it, so that a
retransmission reaching another replica is not processed twice but answered with the very same
bytes; the API claims each Idempotency-Key before publishing, so that a message the proxy
forwards twice (a proxy replica died between forwarding and recording) is published once. The
idea is the same, so it is written once: each side has its own key prefix
(:mod:`stores.keys`), its own lease and lifetime, and this module.

A key is **claimed** with a lease: if the claimer dies before answering, the claim lapses and a
retry is handled by whoever gets it. :meth:`Ledger.claim` tells each caller OWNED (go ahead),
BUSY (someone else is on it and has not answered) or the bytes **recorded** as the answer, to
replay. :meth:`Ledger.release` gives a claim back (the work failed: a retry must go ahead; an
answer is never released).

Records and releases do not make a call of their own: they ride with the next claim, in the same
call and ahead of it (so a retry claimed there finds its answer), or go alone after
``record_delay`` if no claim comes (docs/ARCHITECTURE.md, "Group commit"). The cost: for up to
``record_delay`` a retry finds the claim, not the answer, and is asked to try again.

Backends, chosen by :func:`ledger_for` from the Redis URL (stores/redis_url.py):

- no URL: :class:`MemoryLedger`, one process;
- one server without TLS: :class:`RedisLedger` over our own connection (stores/resp.py), one
  script call per batch (:data:`RECORD_OP_LUA`): one socket write, one reply;
- Sentinel or TLS: the same script through redis-py;
- Cluster (``…?cluster=1``): a pipeline of the same commands, as a script cannot span slots.

A record in Redis is one string: ``SET key "c" NX PX lease GET`` claims it, and its reply says
everything — nil: ours; ``c``: claimed by someone else; ``d…``: the answer. An answer is
``SET key "d"+bytes PX lifetime``.

A Redis caller may also have reads made in the same script call, before the claims
(:meth:`RedisLedger.claim_after`, :class:`ScriptReads`): the API asks who sent a batch and
claims its keys in one call (api/admission.py).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from stores.deferred import Deferred
from stores.redis import REDIS_ERRORS, RedisConnection, connect
from stores.redis_url import parse_redis_url
from stores.resp import RespError, ScriptLink, address_of

log = logging.getLogger(__name__)


class Claim(enum.Enum):
    OWNED = "owned"  # the caller handles it
    BUSY = "busy"  # someone else holds the claim and has not answered


# What a claim learns: OWNED, BUSY, or the recorded answer (bytes, possibly empty).
Outcome = Claim | bytes


class LedgerUnavailable(Exception):
    """The shared store cannot be reached (each side decides what that means for its caller)."""


class Ledger(Protocol):
    async def claim(self, keys: Sequence[str], lease: float) -> list[Outcome]:
        """Claim each key for ``lease`` seconds, or learn who has it / what was answered; one
        outcome per key, in order. Raises :class:`LedgerUnavailable`."""
        ...

    def record(self, key: str, answer: bytes, lifetime: float) -> None:
        """Record ``answer`` for ``lifetime`` seconds (written with the next claim)."""
        ...

    def release(self, key: str) -> None:
        """Drop ``key``'s claim, unless it has been answered (written with the next claim)."""
        ...

    async def flush(self) -> None:
        """Write every queued record and release now, and wait for them."""
        ...

    async def close(self) -> None: ...


class MemoryLedger:
    """One process's memory: ``coap-bridge up`` without Redis, several proxies in one process."""

    def __init__(self, prefix: str = "") -> None:
        self._prefix = prefix
        # key → (expires at, None while claimed, else the answer)
        self._entries: dict[str, tuple[float, bytes | None]] = {}

    async def claim(self, keys: Sequence[str], lease: float) -> list[Outcome]:
        now = time.monotonic()
        if len(self._entries) > 4096 and len(self._entries) % 1024 == 0:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
        outcomes: list[Outcome] = []
        for name in keys:
            key = self._prefix + name
            entry = self._entries.get(key)
            if entry is None or entry[0] <= now:
                self._entries[key] = (now + lease, None)
                outcomes.append(Claim.OWNED)
            else:
                outcomes.append(Claim.BUSY if entry[1] is None else entry[1])
        return outcomes

    def record(self, key: str, answer: bytes, lifetime: float) -> None:
        self._entries[self._prefix + key] = (time.monotonic() + lifetime, answer)

    def release(self, key: str) -> None:
        key = self._prefix + key
        entry = self._entries.get(key)
        if entry is not None and entry[1] is None:
            del self._entries[key]

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()


# The three record operations of a batch, as a Lua function every ledger script starts with.
# A nil reply from SET ... GET arrives in Lua as false and goes back as nil.
CLAIMED = b"c"  # the value of a claimed record, and the op code of a claim
ANSWERED = b"d"  # the prefix of an answered record
_RECORD, _RELEASE = b"a", b"r"  # op codes
RECORD_OP_LUA = """
local function record_op(key, op, value, ttl)
  if op == 'c' then
    return redis.call('SET', key, 'c', 'NX', 'PX', ttl, 'GET')
  elseif op == 'a' then
    redis.call('SET', key, value, 'PX', ttl)
    return 1
  end
  if redis.call('GET', key) == 'c' then redis.call('DEL', key) end
  return 1
end
"""
# What follows a reads function (``local function read(keys, args)``, see ScriptReads): KEYS
# are the reads' keys then one per record op; ARGV[1], ARGV[2] say how many keys and args the
# reads take, then their args, then (op, value, ttl_ms) per record op. Replies: the reads'
# (one per key), then one per record op.
_BATCH_LUA = """
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
if nk > 0 then out = read({unpack(KEYS, 1, nk)}, {unpack(ARGV, 3, 2 + na)}) end
for i = nk + 1, #KEYS do
  local j = 2 + na + 3 * (i - nk - 1)
  out[i] = record_op(KEYS[i], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3])
end
return out
"""
_NO_READS = "local function read(keys, args) return {} end\n"
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == 'c' then redis.call('DEL', KEYS[1]) end return 1"

# One record operation: (op, full key, value, ttl in ms).
RecordOp = tuple[bytes, str, bytes, int]


@dataclass(frozen=True, slots=True)
class ScriptReads:
    """Reads made in the same script call as a batch of claims, before them. ``lua`` defines
    ``local function read(keys, args)`` returning one reply per key; it gets ``keys`` and
    ``args`` as Lua tables."""

    lua: str
    keys: list[str]
    args: list[bytes | int | str]


@functools.cache  # one text per kind of reads: the link's SHA lookup finds it by its cached hash
def batch_script(reads_lua: str = _NO_READS) -> str:
    """The script that runs ``reads_lua``'s reads, then a batch of record operations."""
    return RECORD_OP_LUA + reads_lua + _BATCH_LUA


def _outcome(reply: Any) -> Outcome:
    if reply is None:
        return Claim.OWNED
    if reply == CLAIMED:
        return Claim.BUSY
    return bytes(reply[len(ANSWERED) :])


class RedisLedger:
    """Shared by every replica of one side. A batch of claims and the records queued since the
    last call is one call; how it reaches Redis is the runner's business (:func:`ledger_for`)."""

    def __init__(self, runner: Runner, *, prefix: str, record_delay: float = 0.02) -> None:
        self._runner = runner
        self._prefix = prefix
        self._queued: Deferred[RecordOp] = Deferred(record_delay, self._write_alone)
        self._writing: set[asyncio.Task[None]] = set()

    @property
    def spans_slots(self) -> bool:
        """True on a Cluster: one script cannot hold keys of several slots (no claim_after)."""
        return self._runner.cluster

    async def claim(self, keys: Sequence[str], lease: float) -> list[Outcome]:
        return (await self._claim(None, keys, lease))[1]

    async def claim_after(
        self, reads: ScriptReads, keys: Sequence[str], lease: float
    ) -> tuple[list[Any], list[Outcome]]:
        """:meth:`claim`, with ``reads`` made first in the same script call: their replies (one
        per read key) and the outcomes. Not where :attr:`spans_slots`."""
        return await self._claim(reads, keys, lease)

    async def _claim(
        self, reads: ScriptReads | None, keys: Sequence[str], lease: float
    ) -> tuple[list[Any], list[Outcome]]:
        queued = self._queued.take()
        ttl = max(1, int(lease * 1000))
        ops = queued + [(CLAIMED, self._prefix + key, b"", ttl) for key in keys]
        try:
            replies = await self._runner.run(ops, reads)
        except LedgerUnavailable:
            self._lost(queued)
            raise
        n = 0 if reads is None else len(reads.keys)
        return replies[:n], [_outcome(reply) for reply in replies[n + len(queued) :]]

    def record(self, key: str, answer: bytes, lifetime: float) -> None:
        self._queued.add((_RECORD, self._prefix + key, ANSWERED + answer, int(lifetime * 1000)))

    def release(self, key: str) -> None:
        self._queued.add((_RELEASE, self._prefix + key, b"", 0))

    def _write_alone(self, ops: list[RecordOp]) -> None:
        """No claim came to carry them: the records go on their own."""
        task = asyncio.get_running_loop().create_task(self._write(ops))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, ops: list[RecordOp]) -> None:
        try:
            await self._runner.run(ops, None)
        except LedgerUnavailable:
            self._lost(ops)

    @staticmethod
    def _lost(ops: list[RecordOp]) -> None:
        if ops:
            log.warning(
                "%d ledger records not written (their claims lapse with the lease)", len(ops)
            )

    async def flush(self) -> None:
        ops = self._queued.take()
        if ops:
            await self._write(ops)
        if self._writing:
            await asyncio.gather(*list(self._writing))

    async def close(self) -> None:
        await self.flush()
        await self._runner.close()


class Runner(Protocol):
    cluster: bool

    async def run(self, ops: list[RecordOp], reads: ScriptReads | None) -> list[Any]:
        """Run ``reads`` then ``ops`` in order: the reads' replies, then one per op. Raises
        :class:`LedgerUnavailable`."""
        ...

    async def close(self) -> None: ...


def _script_call(
    ops: list[RecordOp], reads: ScriptReads | None
) -> tuple[str, list[str], list[bytes | int | str]]:
    if reads is None:
        script, keys, args = _BATCH_SCRIPT, [], []
    else:
        script, keys, args = batch_script(reads.lua), list(reads.keys), list(reads.args)
    argv: list[bytes | int | str] = [len(keys), len(args), *args]
    for op, key, value, ttl in ops:
        keys.append(key)
        argv += (op, value, ttl)
    return script, keys, argv


_BATCH_SCRIPT = batch_script()


class LinkRunner:
    """The batch script over our own connection (stores/resp.py: ~90 µs less CPU per call than
    redis-py, docs/ARCHITECTURE.md "Own wire clients on the hot path"). It does not retry: the
    caller's retry (a device's retransmission) is the retry."""

    cluster = False

    def __init__(self, link: ScriptLink) -> None:
        self._link = link

    async def run(self, ops: list[RecordOp], reads: ScriptReads | None) -> list[Any]:
        script, keys, argv = _script_call(ops, reads)
        try:
            reply = await self._link.run(script, keys, argv)
        except (RespError, OSError) as exc:
            raise LedgerUnavailable(f"redis: {exc}") from exc
        if not isinstance(reply, list) or len(reply) != len(keys):
            raise LedgerUnavailable(f"redis: the batch script answered {reply!r:.80}")
        return reply

    async def close(self) -> None:
        self._link.close()


class ClientRunner:
    """The batch script through redis-py (Sentinel, TLS), or on a Cluster the same commands as a
    pipeline, which redis-py sends each node its share of in one write."""

    def __init__(self, connection: RedisConnection) -> None:
        self._connection = connection
        self._client: Any = connection.client
        self.cluster = connection.cluster
        self._scripts: dict[str, Any] = {}

    async def run(self, ops: list[RecordOp], reads: ScriptReads | None) -> list[Any]:
        try:
            if self.cluster:
                if reads is not None:
                    raise LedgerUnavailable("one script cannot span a Cluster's slots")
                return await self._pipelined(ops)
            script, keys, argv = _script_call(ops, reads)
            runner = self._scripts.get(script)
            if runner is None:
                runner = self._scripts[script] = self._client.register_script(script)
            replies: list[Any] = await runner(keys=keys, args=argv)
            return replies
        except REDIS_ERRORS as exc:
            raise LedgerUnavailable(f"redis: {exc}") from exc

    async def _pipelined(self, ops: list[RecordOp]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for op, key, value, ttl in ops:
                if op == CLAIMED:
                    pipe.set(key, CLAIMED, nx=True, px=ttl, get=True)
                elif op == _RECORD:
                    pipe.set(key, value, px=ttl)
                else:
                    pipe.eval(_RELEASE_LUA, 1, key)
            replies: list[Any] = await pipe.execute()
        return replies

    async def close(self) -> None:
        await self._connection.aclose()


def ledger_for(
    url: str | None,
    *,
    prefix: str,
    timeout: float = 1.0,
    retries: int | None = 0,
    record_delay: float = 0.02,
) -> Ledger:
    """The ledger a deployment's Redis URL names (None: this process's memory). ``timeout``
    bounds each call; ``retries``: redis-py's retries of a failed call (None: its default;
    our own connection never retries)."""
    if url is None:
        return MemoryLedger(prefix)
    return redis_ledger(
        url, prefix=prefix, timeout=timeout, retries=retries, record_delay=record_delay
    )


def redis_ledger(
    url: str,
    *,
    prefix: str,
    timeout: float = 1.0,
    retries: int | None = 0,
    record_delay: float = 0.02,
) -> RedisLedger:
    target = parse_redis_url(url)
    address = address_of(target.url) if target.kind == "single" else None
    runner: Runner
    if address is not None:
        runner = LinkRunner(ScriptLink(address, wait_limit=timeout))
    else:
        runner = ClientRunner(connect(target, timeout=timeout, retries=retries))
    return RedisLedger(runner, prefix=prefix, record_delay=record_delay)
