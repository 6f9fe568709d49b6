"""Per-device command queues (issue 15; docs/API.md, "Commands and the change feed").

A device's commands wait here until the device acknowledges them, one at a time, oldest first:
the **head** is the oldest command that is still queued or sent and has not expired. Every
operation is one atomic step on one device's queue, and expiry is evaluated inside it, at read
time (no timers: a command whose time is up is marked expired by the next operation on its
queue, whichever replica makes it). A finished record (delivered or expired) is kept
``retention`` seconds for listings, without its payload.

Backends, chosen by :func:`queue_for` from the Redis URL (stores/redis_url.py):

- no URL: :class:`MemoryCommandQueue`, one process;
- any Redis URL (one server, Sentinel, Cluster): :class:`RedisCommandQueue`, one script call
  (:data:`QUEUE_LUA`) per operation through the client of stores/redis.py. A device's keys
  share the ``{cmd:<iccid>}`` hash tag (:func:`stores.keys.command_keys`), so on a Cluster the
  script runs on the one master that holds that device's slot.

Every operation takes ``now`` (unix seconds) from the caller, so one clock decides what has
expired and tests move it without sleeping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from stores.keys import DEFAULT_PREFIX, command_keys
from stores.redis import REDIS_ERRORS, RedisConnection, connect

State = Literal["queued", "sent", "delivered", "expired"]
PENDING: frozenset[str] = frozenset({"queued", "sent"})
DEFAULT_RETENTION = 86_400.0
"""Seconds a delivered or expired record stays listed (docs/API.md)."""


@dataclass(frozen=True, slots=True)
class Command:
    """One command. Times are unix seconds; ``payload`` is empty once it is finished (the
    record stays for listings, ``size`` still says how large it was)."""

    id: str
    iccid: str
    payload: bytes
    content_format: int
    state: str
    created_at: float
    expires_at: float
    sent_at: float | None = None
    delivered_at: float | None = None
    size: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one operation did.

    ``command``: the command pushed, the head, or the command delivered; ``None`` when the
    push was refused (queue full), the queue is empty, or the acknowledged id was not the head.
    ``expired``: commands this operation found expired (each is reported once, by the
    operation that marked it). ``head_changed``: the head is another command (or none) than
    before the operation: a push into an empty queue, a delivery, the head's expiry.
    """

    command: Command | None = None
    commands: tuple[Command, ...] = ()
    sent_now: bool = False
    expired: tuple[Command, ...] = ()
    head_changed: bool = False


class QueueUnavailable(Exception):
    """The shared store cannot be reached; nothing was changed, the caller may retry."""


class CommandQueue(Protocol):
    kind: str

    async def push(self, command: Command, *, limit: int, now: float) -> Outcome:
        """Queue ``command`` (state queued) behind the device's others, unless ``limit``
        commands are already pending: then ``command`` is None and nothing is queued. A push
        of an id the device already has changes nothing and answers that record (a retried
        call after a lost reply)."""
        ...

    async def head(self, iccid: str, *, now: float, mark_sent: bool) -> Outcome:
        """The head with its payload (None: nothing pending); with ``mark_sent`` a queued head
        becomes sent (``sent_now`` says it happened in this call)."""
        ...

    async def ack(self, iccid: str, command_id: str, *, now: float) -> Outcome:
        """The device has the head ``command_id``: it becomes delivered. ``command`` is None
        when ``command_id`` is not the head (delivered already, expired, unknown, or a newer
        one than the head)."""
        ...

    async def list(self, iccid: str, *, now: float) -> Outcome:
        """Every record of the device, oldest first (without payloads), in ``commands``."""
        ...

    async def close(self) -> None: ...


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


# --- memory ---------------------------------------------------------------------------------


@dataclass
class _Device:
    iccid: str
    records: dict[str, Command] = field(default_factory=dict)  # insertion order = queue order
    pending: list[str] = field(default_factory=list)
    finished: dict[str, float] = field(default_factory=dict)  # id → when it finished


class MemoryCommandQueue:
    """One process's memory: the same rules as the Redis script, in Python."""

    kind = "memory"

    def __init__(self, *, retention: float = DEFAULT_RETENTION) -> None:
        self._retention = retention
        self._devices: dict[str, _Device] = {}

    def _sweep(self, iccid: str, now: float) -> tuple[_Device, str | None, list[Command]]:
        device = self._devices.get(iccid) or self._devices.setdefault(iccid, _Device(iccid))
        before = device.pending[0] if device.pending else None
        expired: list[Command] = []
        for command_id in list(device.pending):
            command = device.records[command_id]
            if _ms(command.expires_at) <= _ms(now):
                expired.append(self._finish(device, command, "expired", command.expires_at))
        cutoff = _ms(now - self._retention)
        for command_id, at in list(device.finished.items()):
            if _ms(at) <= cutoff:
                del device.finished[command_id]
                del device.records[command_id]
        return device, before, expired

    @staticmethod
    def _finish(device: _Device, command: Command, state: str, at: float) -> Command:
        done = replace(
            command,
            state=state,
            payload=b"",
            delivered_at=at if state == "delivered" else None,
        )
        device.records[command.id] = done
        device.pending.remove(command.id)
        device.finished[command.id] = at
        return done

    def _outcome(
        self, device: _Device, before: str | None, expired: list[Command], **values: Any
    ) -> Outcome:
        after = device.pending[0] if device.pending else None
        if not device.records:
            self._devices.pop(device.iccid, None)  # nothing kept for a device with nothing
        return Outcome(expired=tuple(expired), head_changed=before != after, **values)

    async def push(self, command: Command, *, limit: int, now: float) -> Outcome:
        device, before, expired = self._sweep(command.iccid, now)
        if command.id in device.records:
            return self._outcome(device, before, expired, command=device.records[command.id])
        if len(device.pending) >= limit:
            return self._outcome(device, before, expired)
        queued = replace(
            command, state="queued", sent_at=None, delivered_at=None, size=len(command.payload)
        )
        device.records[command.id] = queued
        device.pending.append(command.id)
        return self._outcome(device, before, expired, command=queued)

    async def head(self, iccid: str, *, now: float, mark_sent: bool) -> Outcome:
        device, before, expired = self._sweep(iccid, now)
        if not device.pending:
            return self._outcome(device, before, expired)
        command = device.records[device.pending[0]]
        sent_now = mark_sent and command.state == "queued"
        if sent_now:
            command = device.records[command.id] = replace(command, state="sent", sent_at=now)
        return self._outcome(device, before, expired, command=command, sent_now=sent_now)

    async def ack(self, iccid: str, command_id: str, *, now: float) -> Outcome:
        device, before, expired = self._sweep(iccid, now)
        if not device.pending or device.pending[0] != command_id:
            return self._outcome(device, before, expired)
        done = self._finish(device, device.records[command_id], "delivered", now)
        return self._outcome(device, before, expired, command=done)

    async def list(self, iccid: str, *, now: float) -> Outcome:
        device, before, expired = self._sweep(iccid, now)
        shown = tuple(
            command if command.state not in PENDING else replace(command, payload=b"")
            for command in device.records.values()
        )
        return self._outcome(device, before, expired, commands=shown)

    async def close(self) -> None:
        self._devices.clear()


# --- Redis ----------------------------------------------------------------------------------

# KEYS: the device's records hash, pending zset (score: sequence), expiry zset (score: expires
# at, ms), done zset (score: finished at, ms). ARGV: op, now (ms), retention (ms), op's args.
# A record is the hash field <id> (JSON: s sequence, f content format, t state, c created,
# e expires, x sent, d delivered, n size; times in ms, 0 for none) and, while it is pending,
# the field <id>:p (the payload). Reply: {op reply, head changed (0/1), expired id, record,
# expired id, record, ...}.
QUEUE_LUA = """
local rec, pending, expiry, done = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, now, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local function head_id()
  return redis.call('ZRANGE', pending, 0, 0)[1]
end

local function extend()
  -- Everything goes by itself once the last pending command has expired and its record
  -- has been kept for the retention time: an abandoned device leaves nothing behind.
  local last = redis.call('ZRANGE', expiry, -1, -1, 'WITHSCORES')[2]
  local want = keep + math.max(0, (tonumber(last) or now) - now)
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < want then redis.call('PEXPIRE', key, want) end
  end
end

local function finish(id, m, state, at)
  m.t = state
  if state == 'delivered' then m.d = at end
  local encoded = cjson.encode(m)
  redis.call('HSET', rec, id, encoded)
  redis.call('HDEL', rec, id .. ':p')
  redis.call('ZREM', pending, id)
  redis.call('ZREM', expiry, id)
  redis.call('ZADD', done, at, id)
  return encoded
end

local before = head_id()
local out = {'', 0}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now)) do
  local raw = redis.call('HGET', rec, id)
  if raw then
    local m = cjson.decode(raw)
    out[#out + 1] = id
    out[#out + 1] = finish(id, m, 'expired', m.e)
  else
    redis.call('ZREM', pending, id)
    redis.call('ZREM', expiry, id)
  end
end
local gone = redis.call('ZRANGEBYSCORE', done, '-inf', now - keep)
for _, id in ipairs(gone) do redis.call('HDEL', rec, id, id .. ':p') end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', done, '-inf', now - keep) end
if #out > 2 then extend() end

if op == 'push' then
  local id, payload = ARGV[4], ARGV[5]
  local existing = redis.call('HGET', rec, id)
  if existing then
    out[1] = {id, existing}
  elseif redis.call('ZCARD', pending) >= tonumber(ARGV[8]) then
    out[1] = 'full'
  else
    local seq = redis.call('HINCRBY', rec, '#seq', 1)
    local m = {s = seq, f = tonumber(ARGV[6]), t = 'queued', c = now, e = tonumber(ARGV[7]),
               x = 0, d = 0, n = #payload}
    local encoded = cjson.encode(m)
    redis.call('HSET', rec, id, encoded, id .. ':p', payload)
    redis.call('ZADD', pending, seq, id)
    redis.call('ZADD', expiry, m.e, id)
    extend()
    out[1] = {id, encoded}
  end
elseif op == 'head' then
  local id = head_id()
  if id then
    local raw = redis.call('HGET', rec, id)
    local sent = 0
    if ARGV[4] == '1' then
      local m = cjson.decode(raw)
      if m.t == 'queued' then
        m.t, m.x, sent = 'sent', now, 1
        raw = cjson.encode(m)
        redis.call('HSET', rec, id, raw)
      end
    end
    out[1] = {id, raw, redis.call('HGET', rec, id .. ':p') or '', sent}
  end
elseif op == 'ack' then
  local id = ARGV[4]
  if head_id() == id then
    local encoded = finish(id, cjson.decode(redis.call('HGET', rec, id)), 'delivered', now)
    extend()
    out[1] = {id, encoded}
  end
elseif op == 'list' then
  local listed = {}
  for _, set in ipairs({pending, done}) do
    for _, id in ipairs(redis.call('ZRANGE', set, 0, -1)) do
      local raw = redis.call('HGET', rec, id)
      if raw then
        listed[#listed + 1] = id
        listed[#listed + 1] = raw
      end
    end
  end
  out[1] = listed
end
if head_id() ~= before then out[2] = 1 end
return out
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(iccid: str, command_id: bytes | str, raw: bytes | str, payload: bytes = b"") -> Command:
    meta = json.loads(raw)

    def at(name: str) -> float | None:
        value = meta.get(name) or 0
        return value / 1000 if value else None

    return Command(
        id=_text(command_id),
        iccid=iccid,
        payload=payload,
        content_format=int(meta["f"]),
        state=str(meta["t"]),
        created_at=meta["c"] / 1000,
        expires_at=meta["e"] / 1000,
        sent_at=at("x"),
        delivered_at=at("d"),
        size=int(meta["n"]),
    )


def _sequence(raw: bytes | str) -> int:
    return int(json.loads(raw)["s"])


class RedisCommandQueue:
    """Every replica's queues in one Redis: one script call per operation."""

    kind = "redis"

    def __init__(
        self,
        connection: RedisConnection,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention: float = DEFAULT_RETENTION,
    ) -> None:
        self._connection = connection
        self._prefix = prefix
        self._retention_ms = _ms(retention)
        client: Any = connection.client
        self._script = client.register_script(QUEUE_LUA)

    @property
    def cluster(self) -> bool:
        return self._connection.cluster

    async def _run(self, iccid: str, now: float, op: str, *args: bytes | str | int) -> Any:
        try:
            reply: Any = await self._script(
                keys=list(command_keys(iccid, self._prefix)),
                args=[op, _ms(now), self._retention_ms, *args],
            )
        except REDIS_ERRORS as exc:
            raise QueueUnavailable(f"command queue unavailable: {exc}") from exc
        return reply

    def _outcome(self, iccid: str, reply: Any, **values: Any) -> Outcome:
        flat = reply[2:]
        expired = tuple(_record(iccid, flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        return Outcome(expired=expired, head_changed=bool(reply[1]), **values)

    async def push(self, command: Command, *, limit: int, now: float) -> Outcome:
        reply = await self._run(
            command.iccid,
            now,
            "push",
            command.id,
            command.payload,
            command.content_format,
            _ms(command.expires_at),
            limit,
        )
        answer = reply[0]
        if answer == b"full":
            return self._outcome(command.iccid, reply)
        return self._outcome(
            command.iccid, reply, command=_record(command.iccid, answer[0], answer[1])
        )

    async def head(self, iccid: str, *, now: float, mark_sent: bool) -> Outcome:
        reply = await self._run(iccid, now, "head", "1" if mark_sent else "0")
        answer = reply[0]
        if not answer:
            return self._outcome(iccid, reply)
        command_id, raw, payload, sent = answer
        return self._outcome(
            iccid,
            reply,
            command=_record(iccid, command_id, raw, bytes(payload)),
            sent_now=bool(sent),
        )

    async def ack(self, iccid: str, command_id: str, *, now: float) -> Outcome:
        reply = await self._run(iccid, now, "ack", command_id)
        answer = reply[0]
        if not answer:
            return self._outcome(iccid, reply)
        return self._outcome(iccid, reply, command=_record(iccid, answer[0], answer[1]))

    async def list(self, iccid: str, *, now: float) -> Outcome:
        reply = await self._run(iccid, now, "list")
        flat = reply[0] or []
        pairs = sorted(
            ((flat[i], flat[i + 1]) for i in range(0, len(flat), 2)),
            key=lambda pair: _sequence(pair[1]),
        )
        commands = tuple(_record(iccid, command_id, raw) for command_id, raw in pairs)
        return self._outcome(iccid, reply, commands=commands)

    async def close(self) -> None:
        await self._connection.aclose()


def queue_for(
    url: str | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    retention: float = DEFAULT_RETENTION,
    timeout: float = 5.0,
) -> CommandQueue:
    """The queue a deployment's Redis URL names (None: this process's memory)."""
    if url is None:
        return MemoryCommandQueue(retention=retention)
    connection = connect(
        url,
        timeout=timeout,
        connect_timeout=min(timeout, 2.0),
        # One immediate retry heals a pooled connection a Redis restart closed; more would
        # hold the caller for seconds when Redis is really down (api/store/redis_store.py).
        retries=1,
    )
    return RedisCommandQueue(connection, prefix=prefix, retention=retention)
