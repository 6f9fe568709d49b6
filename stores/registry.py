"""The signed-session profile's state (docs/PROFILES.md, "signed_session"): the registry of
products and their devices, and each device's session.

A product has a productKey and a productSecret; a device is named by (productKey, deviceKey)
and holds the deviceSecret its auth messages are signed with. Its device id, for presence and
MQTT topics, is ``<productKey>:<deviceKey>`` (:func:`device_id`): a productKey has no ':', so
the id names one pair; a deviceKey may (an IMEI, a MAC address).

A session is opened by a valid auth message and bound to the address it came from; a message
from that address inside the session keeps it alive for its lifetime (sliding). The sign of an
auth message is deterministic (secure mode 2 carries no nonce), so a captured one can be sent
again by anybody: the rules that bound what a replay achieves live here, in one atomic step per
message (see :meth:`Registry.open_session`).

Redis layout (stores/keys.py): the registry under one ``{reg}`` hash tag (a hash of products,
a hash of devices per product); each device's session under its own ``{ss:<device id>}`` tag
(the session hash, which Redis expires with the session, and the set of unused signs). Every
step is one script on one slot, so replicas never race each other.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol

from stores.keys import DEFAULT_PREFIX, registry_keys, session_keys
from stores.redis import REDIS_ERRORS, RedisConnection, connect

# A productKey has no ':' and starts with a letter or digit, and is at most 63 characters: then
# "<productKey>:<deviceKey>" is one device id of api/store/base.py's pattern (at most 128
# characters, no '/'), and splits back into one pair at its first ':'.
PRODUCT_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
DEVICE_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
_PRODUCT_KEY_RE = re.compile(PRODUCT_KEY_PATTERN)
_DEVICE_KEY_RE = re.compile(DEVICE_KEY_PATTERN)


def valid_product_key(key: str) -> bool:
    return _PRODUCT_KEY_RE.fullmatch(key) is not None


def valid_device_key(key: str) -> bool:
    return _DEVICE_KEY_RE.fullmatch(key) is not None


def device_id(product_key: str, device_key: str) -> str:
    """The id of a registered device in presence and MQTT topics."""
    return f"{product_key}:{device_key}"


@dataclass(frozen=True)
class Product:
    product_key: str
    product_secret: str
    name: str | None
    created_at: float


@dataclass(frozen=True)
class RegisteredDevice:
    product_key: str
    device_key: str
    device_secret: str
    created_at: float

    @property
    def id(self) -> str:
        return device_id(self.product_key, self.device_key)


class RegistryError(Exception):
    """A registry operation that cannot be done; the API maps each kind to a status."""


class ProductNotFound(RegistryError):
    pass


class ProductExists(RegistryError):
    pass


class ProductHasDevices(RegistryError):
    pass


class DeviceNotRegistered(RegistryError):
    pass


class DeviceKeyTaken(RegistryError):
    pass


class RegistryUnavailable(RegistryError):
    """Redis could not be reached; the caller may retry."""


class AuthOutcome(StrEnum):
    OPENED = "opened"  # a new session, bound to the address the auth came from
    SAME = "same"  # the auth that opened the live session, again, from its address: nothing
    MOVED = "moved"  # the auth that opened the live session, from another address: rebound
    UNUSED = "unused"  # a sign whose session was never used: a replay, refused


class Registry(Protocol):
    async def create_product(self, product: Product) -> None:
        """Raises ProductExists."""
        ...

    async def get_product(self, product_key: str) -> Product | None: ...

    async def list_products(self) -> list[Product]: ...

    async def delete_product(self, product_key: str) -> None:
        """Raises ProductNotFound, ProductHasDevices (its devices are deleted first)."""
        ...

    async def create_device(self, device: RegisteredDevice) -> None:
        """Raises ProductNotFound, DeviceKeyTaken."""
        ...

    async def get_device(self, product_key: str, device_key: str) -> RegisteredDevice | None: ...

    async def list_devices(self, product_key: str) -> list[RegisteredDevice]:
        """Raises ProductNotFound."""
        ...

    async def delete_device(self, product_key: str, device_key: str) -> None:
        """Raises DeviceNotRegistered. Its session and unused signs go with it."""
        ...

    async def open_session(
        self, device: str, sign: str, ip: str, lifetime: int, now: float | None = None
    ) -> AuthOutcome:
        """A valid auth message (sign checked by the caller) from ``ip``.

        - The sign that opened the live session, from the session's address: SAME (a
          retransmission or a repeat; nothing changes). From another address: MOVED, the
          session is bound to that address from now on, its expiry unchanged (a device whose
          address changed goes on at once; a replayer gains no time, and over plain UDP could
          as well send from the session's address: the bound is on time, not on who).
        - Otherwise a sign that opened a session which saw no other message since: UNUSED,
          refused. A captured auth replayed after its session ended opens nothing, unless the
          device itself spoke in between (then the capture opens at most one session, which
          nobody uses, and the sign is refused again after it).
        - Otherwise: OPENED, replacing any live session; the sign is recorded as unused.
        """
        ...

    async def use_session(self, device: str, ip: str, now: float | None = None) -> int | None:
        """A message other than auth from ``ip``: when it is inside the device's live session
        from the session's address, the session lives ``lifetime`` seconds from now, every
        unused sign is forgotten (the device spoke), and the lifetime is returned; else None."""
        ...

    async def close(self) -> None: ...


def _product_from(raw: str | bytes) -> Product:
    return Product(**json.loads(raw))


def _device_from(raw: str | bytes) -> RegisteredDevice:
    return RegisteredDevice(**json.loads(raw))


@dataclass
class _Session:
    sign: str
    ip: str
    lifetime: int
    expires: float


class MemoryRegistry:
    """One process (``coap-bridge up`` without Redis); no method awaits, so each is atomic."""

    def __init__(self) -> None:
        self._products: dict[str, Product] = {}
        self._devices: dict[str, dict[str, RegisteredDevice]] = {}
        self._sessions: dict[str, _Session] = {}
        self._unused: dict[str, set[str]] = {}

    async def create_product(self, product: Product) -> None:
        if product.product_key in self._products:
            raise ProductExists(product.product_key)
        self._products[product.product_key] = product
        self._devices[product.product_key] = {}

    async def get_product(self, product_key: str) -> Product | None:
        return self._products.get(product_key)

    async def list_products(self) -> list[Product]:
        return sorted(self._products.values(), key=lambda p: p.product_key)

    async def delete_product(self, product_key: str) -> None:
        if product_key not in self._products:
            raise ProductNotFound(product_key)
        if self._devices.get(product_key):
            raise ProductHasDevices(product_key)
        del self._products[product_key]
        self._devices.pop(product_key, None)

    async def create_device(self, device: RegisteredDevice) -> None:
        devices = self._devices.get(device.product_key)
        if device.product_key not in self._products or devices is None:
            raise ProductNotFound(device.product_key)
        if device.device_key in devices:
            raise DeviceKeyTaken(device.device_key)
        devices[device.device_key] = device

    async def get_device(self, product_key: str, device_key: str) -> RegisteredDevice | None:
        return self._devices.get(product_key, {}).get(device_key)

    async def list_devices(self, product_key: str) -> list[RegisteredDevice]:
        if product_key not in self._products:
            raise ProductNotFound(product_key)
        return sorted(self._devices[product_key].values(), key=lambda d: d.device_key)

    async def delete_device(self, product_key: str, device_key: str) -> None:
        devices = self._devices.get(product_key, {})
        if devices.pop(device_key, None) is None:
            raise DeviceNotRegistered(device_key)
        self._sessions.pop(device_id(product_key, device_key), None)
        self._unused.pop(device_id(product_key, device_key), None)

    async def open_session(
        self, device: str, sign: str, ip: str, lifetime: int, now: float | None = None
    ) -> AuthOutcome:
        at = time.time() if now is None else now
        session = self._sessions.get(device)
        if session is not None and session.expires > at and session.sign == sign:
            if session.ip == ip:
                return AuthOutcome.SAME
            session.ip = ip
            return AuthOutcome.MOVED
        unused = self._unused.setdefault(device, set())
        if sign in unused:
            return AuthOutcome.UNUSED
        self._sessions[device] = _Session(sign, ip, lifetime, at + lifetime)
        unused.add(sign)
        return AuthOutcome.OPENED

    async def use_session(self, device: str, ip: str, now: float | None = None) -> int | None:
        at = time.time() if now is None else now
        session = self._sessions.get(device)
        if session is None or session.expires <= at or session.ip != ip:
            return None
        session.expires = at + session.lifetime
        self._unused.pop(device, None)
        return session.lifetime

    async def close(self) -> None:
        pass


# KEYS[1] products hash, KEYS[2] this product's devices hash. ARGV[1] productKey,
# ARGV[2] deviceKey, ARGV[3] the device record.
CREATE_DEVICE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 'no-product' end
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 'taken' end
return 'ok'
"""

# KEYS[1] products hash, KEYS[2] this product's devices hash. ARGV[1] productKey.
DELETE_PRODUCT_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 'no-product' end
if redis.call('HLEN', KEYS[2]) > 0 then return 'has-devices' end
redis.call('HDEL', KEYS[1], ARGV[1])
return 'ok'
"""

# KEYS[1] session hash, KEYS[2] unused signs. ARGV: sign, ip, lifetime (s), now (s). The
# session hash expires with the session (a relative PEXPIRE: Redis's clock need not be ours).
OPEN_SESSION_LUA = """
local now = tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'sign', 'ip', 'expires')
if s[1] and s[3] and tonumber(s[3]) > now and s[1] == ARGV[1] then
  if s[2] == ARGV[2] then return 'same' end
  redis.call('HSET', KEYS[1], 'ip', ARGV[2])
  return 'moved'
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'unused' end
local lifetime = tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'sign', ARGV[1], 'ip', ARGV[2], 'lifetime', ARGV[3],
  'expires', tostring(now + lifetime))
redis.call('PEXPIRE', KEYS[1], lifetime * 1000)
redis.call('SADD', KEYS[2], ARGV[1])
return 'opened'
"""

# KEYS[1] session hash, KEYS[2] unused signs. ARGV: ip, now. The lifetime, or 0.
USE_SESSION_LUA = """
local now = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'ip', 'expires', 'lifetime')
if not s[1] or not s[2] or tonumber(s[2]) <= now or s[1] ~= ARGV[1] then return 0 end
local lifetime = tonumber(s[3])
redis.call('HSET', KEYS[1], 'expires', tostring(now + lifetime))
redis.call('PEXPIRE', KEYS[1], lifetime * 1000)
redis.call('DEL', KEYS[2])
return lifetime
"""


class RedisRegistry:
    """Shared by every API replica: one server, Sentinel or Cluster. Redis failures become
    :class:`RegistryUnavailable`."""

    def __init__(self, connection: RedisConnection, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._connection = connection
        self._prefix = prefix
        self._client: Any = connection.client
        self._products, self._devices = registry_keys(prefix)
        self._create_device = self._client.register_script(CREATE_DEVICE_LUA)
        self._delete_product = self._client.register_script(DELETE_PRODUCT_LUA)
        self._open = self._client.register_script(OPEN_SESSION_LUA)
        self._use = self._client.register_script(USE_SESSION_LUA)

    @property
    def cluster(self) -> bool:
        return self._connection.cluster

    async def _call(self, command: Any) -> Any:
        try:
            return await command
        except REDIS_ERRORS as exc:
            raise RegistryUnavailable(f"registry unavailable: {exc}") from exc

    async def create_product(self, product: Product) -> None:
        record = json.dumps(asdict(product))
        created = await self._call(self._client.hsetnx(self._products, product.product_key, record))
        if not created:
            raise ProductExists(product.product_key)

    async def get_product(self, product_key: str) -> Product | None:
        raw = await self._call(self._client.hget(self._products, product_key))
        return None if raw is None else _product_from(raw)

    async def list_products(self) -> list[Product]:
        raw: dict[Any, Any] = await self._call(self._client.hgetall(self._products))
        return sorted((_product_from(v) for v in raw.values()), key=lambda p: p.product_key)

    async def delete_product(self, product_key: str) -> None:
        keys = [self._products, self._devices + product_key]
        outcome = await self._call(self._delete_product(keys=keys, args=[product_key]))
        if outcome == b"no-product":
            raise ProductNotFound(product_key)
        if outcome == b"has-devices":
            raise ProductHasDevices(product_key)

    async def create_device(self, device: RegisteredDevice) -> None:
        keys = [self._products, self._devices + device.product_key]
        args = [device.product_key, device.device_key, json.dumps(asdict(device))]
        outcome = await self._call(self._create_device(keys=keys, args=args))
        if outcome == b"no-product":
            raise ProductNotFound(device.product_key)
        if outcome == b"taken":
            raise DeviceKeyTaken(device.device_key)

    async def get_device(self, product_key: str, device_key: str) -> RegisteredDevice | None:
        raw = await self._call(self._client.hget(self._devices + product_key, device_key))
        return None if raw is None else _device_from(raw)

    async def list_devices(self, product_key: str) -> list[RegisteredDevice]:
        if await self.get_product(product_key) is None:
            raise ProductNotFound(product_key)
        raw: dict[Any, Any] = await self._call(self._client.hgetall(self._devices + product_key))
        return sorted((_device_from(v) for v in raw.values()), key=lambda d: d.device_key)

    async def delete_device(self, product_key: str, device_key: str) -> None:
        removed = await self._call(self._client.hdel(self._devices + product_key, device_key))
        if not removed:
            raise DeviceNotRegistered(device_key)
        # Another slot: a second call. A device created again under the same keys must not
        # inherit the old session.
        await self._call(
            self._client.delete(*session_keys(device_id(product_key, device_key), self._prefix))
        )

    async def open_session(
        self, device: str, sign: str, ip: str, lifetime: int, now: float | None = None
    ) -> AuthOutcome:
        at = time.time() if now is None else now
        keys = list(session_keys(device, self._prefix))
        outcome = await self._call(self._open(keys=keys, args=[sign, ip, lifetime, repr(at)]))
        return AuthOutcome(outcome.decode())

    async def use_session(self, device: str, ip: str, now: float | None = None) -> int | None:
        at = time.time() if now is None else now
        keys = list(session_keys(device, self._prefix))
        lifetime = await self._call(self._use(keys=keys, args=[ip, repr(at)]))
        return int(lifetime) or None

    async def close(self) -> None:
        await self._connection.aclose()


def registry_for(
    redis_url: str | None, prefix: str = DEFAULT_PREFIX, *, timeout: float = 2.0
) -> Registry:
    """The registry a deployment's Redis URL names (None: this process's memory)."""
    if redis_url is None:
        return MemoryRegistry()
    return RedisRegistry(connect(redis_url, timeout=timeout, retries=1), prefix=prefix)
