"""Where Observe relations are held: a record per relation, with the replica that holds it.

A relation lives in the memory of the proxy replica that registered it (docs/ARCHITECTURE.md,
"Observe"); this record says so in the shared store, so that the API can tell whether a device
is observing (``GET /devices/{iccid}/commands``) and so that a relation whose replica is gone is
dropped: every replica refreshes a liveness key (``heartbeat``), and each heartbeat also removes
the records of replicas whose liveness key has lapsed (docs/SCALING.md).

Redis layout, every key under the ``{obs}`` hash tag (one Cluster slot, so each step is one
script): ``…:{obs}:r:<replica>`` hash relation id → origin path; ``…:{obs}:p:<origin path>`` set
of ``<replica>|<relation id>``; ``…:{obs}:alive:<replica>`` the liveness key;
``…:{obs}:replicas`` the replicas that hold records.

Records are written by a background loop (:meth:`RelationRecords.run`), never on the device's
path: a registration costs the device no Redis round trip, and the record follows within a
fraction of a second (``flush_interval``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any, Protocol

from stores.keys import DEFAULT_PREFIX
from stores.redis import REDIS_ERRORS, RedisConnection, connect

log = logging.getLogger(__name__)


class RelationRecords(Protocol):
    replica: str

    def add(self, relation: str, path: str) -> None:
        """Record that this replica holds ``relation`` on origin ``path`` (written soon)."""
        ...

    def remove(self, relation: str, path: str) -> None: ...

    async def observers(self, path: str) -> int:
        """Relations on ``path`` held by replicas that are alive."""
        ...

    async def run(self) -> None:
        """Write records and heartbeats until cancelled."""
        ...

    async def close(self) -> None:
        """Remove this replica's records and stop."""
        ...


class RelationCount(Protocol):
    """What the API asks: relations on an origin path held by live replicas."""

    async def observers(self, path: str) -> int: ...

    async def close(self) -> None: ...


class MemoryRelationRecords:
    """One process (``coap-bridge up`` without Redis): the proxy and the API share it."""

    def __init__(self) -> None:
        self.replica = "local"
        self._paths: dict[str, set[str]] = {}

    def add(self, relation: str, path: str) -> None:
        self._paths.setdefault(path, set()).add(relation)

    def remove(self, relation: str, path: str) -> None:
        held = self._paths.get(path)
        if held is not None:
            held.discard(relation)
            if not held:
                del self._paths[path]

    async def observers(self, path: str) -> int:
        return len(self._paths.get(path, ()))

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        self._paths.clear()


# KEYS[1] replicas set, KEYS[2] this replica's hash, KEYS[3] its liveness key. ARGV: prefix of
# the {obs} keys, replica, liveness ms, then (op, relation, path) triples: op "a" add, "r"
# remove. Then drops the records of every replica whose liveness key has lapsed.
_SYNC = """
local base, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('SET', KEYS[3], '1', 'PX', ttl)
redis.call('SADD', KEYS[1], me)
for i = 4, #ARGV, 3 do
  local op, rel, path = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'a' then
    redis.call('HSET', KEYS[2], rel, path)
    redis.call('SADD', base .. 'p:' .. path, me .. '|' .. rel)
  else
    redis.call('HDEL', KEYS[2], rel)
    redis.call('SREM', base .. 'p:' .. path, me .. '|' .. rel)
  end
end
local dropped = 0
for _, other in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', base .. 'alive:' .. other) == 0 then
    local held = redis.call('HGETALL', base .. 'r:' .. other)
    for j = 1, #held, 2 do
      redis.call('SREM', base .. 'p:' .. held[j + 1], other .. '|' .. held[j])
      dropped = dropped + 1
    end
    redis.call('DEL', base .. 'r:' .. other)
    redis.call('SREM', KEYS[1], other)
  end
end
return dropped
"""
# KEYS[1] the path's set; ARGV[1] prefix of the {obs} keys. Members whose replica is alive.
_COUNT = """
local n = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local replica = string.match(member, '^([^|]*)|')
  if replica and redis.call('EXISTS', ARGV[1] .. 'alive:' .. replica) == 1 then n = n + 1 end
end
return n
"""
# KEYS[1] replicas set, KEYS[2] this replica's hash, KEYS[3] its liveness key; ARGV[1] prefix,
# ARGV[2] replica: a replica that stops takes its records with it.
_LEAVE = """
local held = redis.call('HGETALL', KEYS[2])
for j = 1, #held, 2 do
  redis.call('SREM', ARGV[1] .. 'p:' .. held[j + 1], ARGV[2] .. '|' .. held[j])
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[1], ARGV[2])
return 1
"""


class RelationReader:
    """The API's side: how many relations on a path, without being a replica itself."""

    def __init__(self, connection: RedisConnection, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._connection = connection
        self._base = f"{prefix}:{{obs}}:"
        self._count: Any = connection.client.register_script(_COUNT)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> RelationReader:
        return cls(connect(url, timeout=2.0), prefix=prefix)

    async def observers(self, path: str) -> int:
        count: int = await self._count(keys=[f"{self._base}p:{path}"], args=[self._base])
        return count

    async def close(self) -> None:
        await self._connection.aclose()


class RedisRelationRecords:
    def __init__(
        self,
        connection: RedisConnection,
        *,
        prefix: str = DEFAULT_PREFIX,
        heartbeat: float = 5.0,
        flush_interval: float = 0.2,
    ) -> None:
        """``heartbeat``: seconds between liveness refreshes; a replica silent for three of them
        is taken for gone and its records are dropped by the next replica's heartbeat."""
        self.replica = secrets.token_hex(6)
        self._client: Any = connection.client
        self._connection = connection
        self._base = f"{prefix}:{{obs}}:"
        self._heartbeat = heartbeat
        self._flush_interval = flush_interval
        # relation → (op, path), the latest wish per relation, in order of arrival
        self._pending: dict[str, tuple[str, str]] = {}
        self._held: dict[str, str] = {}  # what this replica holds: written again after a loss
        self._scripts: dict[str, Any] = {}
        self._last_beat = 0.0
        self._resync = False

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = DEFAULT_PREFIX, heartbeat: float = 5.0
    ) -> RedisRelationRecords:
        return cls(connect(url, timeout=2.0), prefix=prefix, heartbeat=heartbeat)

    def add(self, relation: str, path: str) -> None:
        self._held[relation] = path
        self._pending[relation] = ("a", path)

    def remove(self, relation: str, path: str) -> None:
        self._held.pop(relation, None)
        self._pending[relation] = ("r", path)

    def _keys(self, replica: str) -> list[str]:
        return [f"{self._base}replicas", f"{self._base}r:{replica}", f"{self._base}alive:{replica}"]

    async def _script(self, text: str, keys: list[str], args: list[Any]) -> Any:
        runner = self._scripts.get(text)
        if runner is None:
            runner = self._scripts[text] = self._client.register_script(text)
        return await runner(keys=keys, args=args)

    async def sync(self) -> int:
        """Write what is pending and refresh this replica's liveness; drop dead replicas'
        records. Returns how many records of dead replicas were dropped."""
        if self._resync:
            # Redis came back (maybe empty): everything this replica holds, again, and the
            # removals asked for meanwhile (their records may have survived).
            pending = {rel: ("a", path) for rel, path in self._held.items()}
            pending.update((rel, wish) for rel, wish in self._pending.items() if wish[0] == "r")
        else:
            pending = self._pending
        self._pending = {}
        args: list[Any] = [self._base, self.replica, int(self._heartbeat * 3000)]
        for relation, (op, path) in pending.items():
            args += (op, relation, path)
        try:
            dropped: int = await self._script(_SYNC, self._keys(self.replica), args)
        except REDIS_ERRORS as exc:
            # Not written: keep the wishes (newer ones win) and write everything held next time.
            self._pending = {**pending, **self._pending}
            self._resync = True
            log.debug("observe relation records not written: %s", exc)
            return 0
        self._resync = False
        self._last_beat = time.monotonic()
        if dropped:
            log.info("dropped %d observe relation records of replicas that are gone", dropped)
        return dropped

    async def observers(self, path: str) -> int:
        count: int = await self._script(_COUNT, [f"{self._base}p:{path}"], [self._base])
        return count

    async def run(self) -> None:
        while True:
            due = time.monotonic() - self._last_beat >= self._heartbeat
            if self._pending or due or self._resync:
                await self.sync()
            await asyncio.sleep(self._flush_interval)

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self._script(_LEAVE, self._keys(self.replica), [self._base, self.replica])
        await self._connection.aclose()
