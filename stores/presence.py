"""Device presence: which devices are online, since when they were last heard, and when each
goes offline unless it speaks again (docs/API.md, "Presence").

A device is online from a message that counts until ``lifetime`` seconds after it; the caller
decides the lifetime (a signed session's own, a managed-PSK device's online window). Turning a
device offline is the job of :meth:`PresenceStore.expire`, called by a watcher on every API
replica (api/presence.py): each device that expired is returned by exactly one call across all
replicas, so each offline transition is published once.

Redis layout (stores/keys.py :func:`~stores.keys.presence_keys`), both keys under the
``{presence}`` hash tag, so every step is one script on one Cluster slot: a sorted set of the
online devices scored by their expiry (unix seconds), and a hash device → last seen. A device
stays in the set until ``expire`` takes it out, even when its time has passed: that is what
makes the online → offline transition happen once, and only where it is published.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from stores.keys import DEFAULT_PREFIX, presence_keys
from stores.redis import RedisConnection, connect


@dataclass(frozen=True)
class Presence:
    device: str  # device id
    online: bool
    last_seen: float | None  # unix seconds of the last message that counted
    expires_at: float | None  # when it goes offline unless another message counts


class PresenceStore(Protocol):
    async def seen(
        self, device: str, lifetime: float, *, extend: bool = True, now: float | None = None
    ) -> bool:
        """A message from ``device``: online until ``now + lifetime`` (never shortened).
        ``extend=False``: if it is already online, change nothing (a replayed auth). True when
        this call turned it online (it was offline and no offline transition is pending)."""
        ...

    async def get_many(self, devices: Sequence[str], now: float | None = None) -> list[Presence]:
        """Each device's presence, in the order asked; a device never seen is offline with
        no times."""
        ...

    async def expire(self, now: float | None = None) -> list[str]:
        """Turn offline every device whose time has passed; each such device is returned by
        exactly one caller across all replicas."""
        ...

    async def forget(self, device: str) -> None:
        """Drop everything about ``device`` (it was deleted): no offline transition follows."""
        ...

    async def close(self) -> None: ...


class MemoryPresenceStore:
    """One process (``coap-bridge up`` without Redis). Each method runs without awaiting, so
    every step is atomic within the event loop."""

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}  # online devices (until expire() takes them out)
        self._seen: dict[str, float] = {}

    async def seen(
        self, device: str, lifetime: float, *, extend: bool = True, now: float | None = None
    ) -> bool:
        at = time.time() if now is None else now
        current = self._expiry.get(device)
        if current is not None and current > at and not extend:
            return False
        self._seen[device] = at
        self._expiry[device] = max(current or 0.0, at + lifetime)
        # Still in the set (even with its time passed): online was published and offline not
        # yet, so this is no transition.
        return current is None

    async def get_many(self, devices: Sequence[str], now: float | None = None) -> list[Presence]:
        at = time.time() if now is None else now
        result = []
        for device in devices:
            expires = self._expiry.get(device)
            online = expires is not None and expires > at
            result.append(
                Presence(device, online, self._seen.get(device), expires if online else None)
            )
        return result

    async def expire(self, now: float | None = None) -> list[str]:
        at = time.time() if now is None else now
        gone = [device for device, expires in self._expiry.items() if expires <= at]
        for device in gone:
            del self._expiry[device]
        return gone

    async def forget(self, device: str) -> None:
        self._expiry.pop(device, None)
        self._seen.pop(device, None)

    async def close(self) -> None:
        pass


# KEYS[1] online set (score: expiry), KEYS[2] last-seen hash. ARGV: device, now, lifetime,
# extend ("1"/"0"). Returns 1 when this call turned the device online. One script, so two
# replicas noting the same device at once cannot both see it offline.
SEEN_LUA = """
local now = tonumber(ARGV[2])
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
if current then current = tonumber(current) end
if current and current > now and ARGV[4] == '0' then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local expires = now + tonumber(ARGV[3])
if not current then
  redis.call('ZADD', KEYS[1], expires, ARGV[1])
  return 1
end
if expires > current then redis.call('ZADD', KEYS[1], expires, ARGV[1]) end
return 0
"""

# KEYS[1] online set. ARGV[1] now, ARGV[2] batch size. The expired devices, taken out in the
# same step: a device is returned to one caller only.
EXPIRE_LUA = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return gone
"""

# KEYS[1] online set, KEYS[2] last-seen hash. ARGV: devices. Expiry and last seen, pairwise.
GET_LUA = """
local out = {}
for i = 1, #ARGV do
  out[2 * i - 1] = redis.call('ZSCORE', KEYS[1], ARGV[i])
  out[2 * i] = redis.call('HGET', KEYS[2], ARGV[i])
end
return out
"""

FORGET_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# Devices expired in one script call at most: a backlog (a replica down for hours) is worked
# off over several calls instead of one long script that blocks Redis.
EXPIRE_BATCH = 1000


def _number(raw: Any) -> float | None:
    if raw is None or raw is False:
        return None
    return float(raw.decode() if isinstance(raw, bytes) else raw)


class RedisPresenceStore:
    """Shared by every API replica: one server, Sentinel or Cluster."""

    def __init__(self, connection: RedisConnection, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._connection = connection
        self._keys = list(presence_keys(prefix))
        client: Any = connection.client
        self._seen = client.register_script(SEEN_LUA)
        self._expire = client.register_script(EXPIRE_LUA)
        self._get = client.register_script(GET_LUA)
        self._forget = client.register_script(FORGET_LUA)

    @property
    def cluster(self) -> bool:
        return self._connection.cluster

    async def seen(
        self, device: str, lifetime: float, *, extend: bool = True, now: float | None = None
    ) -> bool:
        at = time.time() if now is None else now
        turned: int = await self._seen(
            keys=self._keys, args=[device, repr(at), repr(float(lifetime)), int(extend)]
        )
        return bool(turned)

    async def get_many(self, devices: Sequence[str], now: float | None = None) -> list[Presence]:
        if not devices:
            return []
        at = time.time() if now is None else now
        raw: list[Any] = await self._get(keys=self._keys, args=list(devices))
        result = []
        for i, device in enumerate(devices):
            expires, last = _number(raw[2 * i]), _number(raw[2 * i + 1])
            online = expires is not None and expires > at
            result.append(Presence(device, online, last, expires if online else None))
        return result

    async def expire(self, now: float | None = None) -> list[str]:
        at = time.time() if now is None else now
        gone: list[str] = []
        while True:
            batch: list[bytes] = await self._expire(
                keys=self._keys[:1], args=[repr(at), EXPIRE_BATCH]
            )
            gone += [item.decode() if isinstance(item, bytes) else item for item in batch]
            if len(batch) < EXPIRE_BATCH:
                return gone

    async def forget(self, device: str) -> None:
        await self._forget(keys=self._keys, args=[device])

    async def close(self) -> None:
        await self._connection.aclose()


def presence_for(
    redis_url: str | None, prefix: str = DEFAULT_PREFIX, *, timeout: float = 2.0
) -> PresenceStore:
    """The store a deployment's Redis URL names (None: this process's memory)."""
    if redis_url is None:
        return MemoryPresenceStore()
    connection = connect(redis_url, timeout=timeout, retries=1)
    return RedisPresenceStore(connection, prefix=prefix)
