"""Device store in Redis, shared by every API replica and read by the proxy.

Redis is where replicas share state (docs/CONTRACT.md §1, §12).

Key schema from :mod:`stores.keys`: a hash per device (named by its id; a SIM's id is its
ICCID), the strings ``ip → id`` (the SIM-as-an-identity index) and ``imei → id`` for the
devices that have one, and a set of all ids. Writes run as optimistic transactions
(WATCH/MULTI/EXEC) that watch the device hash and the index keys they claim or give up, so two
concurrent writers can never both take one ip or imei nor leave an index entry pointing at the
wrong device.

Every write that changes a device's ``psk`` (or deletes the device) also PUBLISHes the device id on
:func:`stores.keys.psk_channel`, inside the same MULTI/EXEC: a proxy that receives the message
and re-reads the hash always sees the new value, and a write that failed announces nothing.

Every key carries the ``{dev}`` hash tag, so on a Redis Cluster they all live in one slot: the
store then talks to the master that owns that slot with a plain client (stores/redis.py
``SlotClient``), and the transactions and announcements work as on one server. A ``MOVED``
reply (the slot went elsewhere) makes it look the owner up again and retry once; a lost
connection makes it look the owner up again for the next call and answers StoreUnavailable.

Redis exceptions never leave this module: they become :class:`api.errors.StoreUnavailable`.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.errors import (
    ApiError,
    DeviceExists,
    DeviceNotFound,
    ImeiInUse,
    IpInUse,
    StoreUnavailable,
)
from api.store.base import Change, Device, normalise_ip
from stores.keys import (
    DEFAULT_PREFIX,
    device_imei_key,
    device_ip_key,
    device_key,
    device_set_key,
    psk_channel,
)
from stores.ledger import ScriptReads
from stores.redis import REDIS_ERRORS, SlotClient

# Contention on one device is rare (a management call racing another); a handful of retries
# settles it, and a hot loop against a misbehaving server must end.
_MAX_TRANSACTION_ATTEMPTS = 16

_T = TypeVar("_T")

# Devices by address and by PSK identity, in one script call (stores/ledger.py ScriptReads):
# ``keys`` are ip index keys, then device hashes; args[1] says how many ip keys come first,
# args[2] is the device key prefix (``device_key("")``). One reply per key: the device's hash as
# a flat field/value list, or an empty list. Every key it touches carries the {dev} tag: one
# slot, so it runs on a Cluster's slot owner as on one server.
DEVICE_READ_LUA = """
local function read(keys, args)
  local n_ip, prefix = tonumber(args[1]), args[2]
  local out = {}
  for i = 1, #keys do
    if i <= n_ip then
      local iccid = redis.call('GET', keys[i])
      if iccid then out[i] = redis.call('HGETALL', prefix .. iccid) else out[i] = {} end
    else
      out[i] = redis.call('HGETALL', keys[i])
    end
  end
  return out
end
"""
_READ_SCRIPT = DEVICE_READ_LUA + "return read(KEYS, ARGV)"


@dataclass(frozen=True, slots=True)
class DeviceReads:
    """The reads of :data:`DEVICE_READ_LUA` for some identities and addresses, and how to turn
    their replies into devices (:meth:`devices`)."""

    script: ScriptReads
    identities: int
    ips: list[str | None]  # as asked, normalised; None: not an address
    asked: list[str]  # the distinct addresses read, in key order

    def devices(self, replies: Sequence[Any]) -> tuple[list[Device | None], list[Device | None]]:
        """Devices by identity and by address, in the order asked. A device found through an
        index entry that no longer names its address is nobody's (it moved between writes)."""
        found = [_device(flat) for flat in replies]
        by_ip_found = dict(zip(self.asked, found[: len(self.asked)], strict=True))
        by_ip: list[Device | None] = []
        for ip in self.ips:
            device = by_ip_found.get(ip) if ip is not None else None
            by_ip.append(device if device is not None and device.ip == ip else None)
        return found[len(self.asked) :], by_ip


def _device(flat: Any) -> Device | None:
    if not flat:
        return None
    return device_from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))


def _to_hash(device: Device) -> tuple[dict[str, str], builtins.list[str]]:
    """Fields to HSET and the names of unset optional fields to HDEL."""
    values: dict[str, str] = {}
    absent: builtins.list[str] = []
    for name, value in device.model_dump().items():
        if value is None:
            absent.append(name)
        elif isinstance(value, bool):
            values[name] = "1" if value else "0"
        elif isinstance(value, datetime):
            values[name] = value.isoformat()
        else:
            values[name] = str(value)
    return values, absent


def _text(value: bytes | str) -> str:
    # The client is built with decode_responses=True; redis-py's types cannot express that.
    return value.decode() if isinstance(value, bytes) else value


def device_from_hash(raw: Mapping[bytes | str, bytes | str]) -> Device:
    # Fields this version does not model (docs/CONTRACT.md §2 lists more) are skipped so a
    # hash written by a newer replica still loads. pydantic's lax mode turns "1"/"0" into
    # booleans and ISO strings into datetimes.
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return Device.model_validate({k: v for k, v in fields.items() if k in Device.model_fields})


def _unindexed(device: Device) -> Device:
    """``device`` holding no index entry: what a deleted device leaves behind."""
    return device.model_copy(update={"ip": None, "imei": None})


def _begin(pipe: Pipeline) -> None:
    """MULTI after the WATCHed reads (redis-py leaves ``multi`` unannotated)."""
    pipe.multi()  # type: ignore[no-untyped-call]


class RedisDeviceStore:
    """:class:`api.store.base.DeviceStore` on Redis."""

    def __init__(self, redis: SlotClient, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._redis = redis
        self._prefix = prefix

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> RedisDeviceStore:
        """A store with its own connection pool; nothing connects until the first command.
        ``url``: one server, ``redis+sentinel://…`` or a Cluster (``…?cluster=1``)."""
        redis = SlotClient(
            url,
            device_set_key(prefix),  # any key of the schema: they share the {dev} slot
            decode_responses=True,
            connect_timeout=2.0,
            timeout=5.0,
            # One immediate retry heals a pooled connection that a Redis restart closed; the
            # library default (10 retries with backoff) would hold a request for seconds when
            # Redis is really down, where a quick 503 lets the device retry instead.
            retries=1,
        )
        return cls(redis, prefix=prefix)

    @property
    def kind(self) -> str:
        return "redis"

    @asynccontextmanager
    async def _translated(self) -> AsyncIterator[None]:
        try:
            yield
        except REDIS_ERRORS as exc:  # OSError: e.g. a socket error that redis-py did not wrap
            raise StoreUnavailable(f"device store unavailable: {exc}") from exc

    async def _run(self, work: Callable[[Redis], Awaitable[_T]]) -> _T:
        """``work(client)``, translated; on a Cluster, follows the {dev} slot to its master."""
        async with self._translated():
            for attempt in range(2):
                redis = await self._redis.client()
                try:
                    return await work(redis)
                except MovedError:
                    # Refused before anything ran: safe to send again, to the new owner.
                    await self._redis.relocate(redis)
                    if attempt:
                        raise
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    await self._redis.relocate(redis)  # for the next call (a failover?)
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _dkey(self, iccid: str) -> str:
        return device_key(iccid, self._prefix)

    def _ipkey(self, ip: str) -> str:
        return device_ip_key(ip, self._prefix)

    def _imeikey(self, imei: str) -> str:
        return device_imei_key(imei, self._prefix)

    async def get(self, iccid: str) -> Device | None:
        async def work(redis: Redis) -> dict[Any, Any]:
            raw: dict[Any, Any] = await redis.hgetall(self._dkey(iccid))
            return raw

        raw = await self._run(work)
        return device_from_hash(raw) if raw else None

    async def get_by_ip(self, ip: str) -> Device | None:
        """One script call (:data:`DEVICE_READ_LUA`, as :meth:`get_many_by_ip`): the index and
        the device's hash read together, so a device that moved between the two reads is
        nobody's, and every single-device lookup by address (/location, /bootstrap, commands,
        firmware blocks) costs one round trip instead of two."""
        [device] = await self.get_many_by_ip([ip])
        return device

    async def get_by_imei(self, imei: str) -> Device | None:
        """The IMEI index and the device's hash in one script call (the index keys of
        :data:`DEVICE_READ_LUA` may be any ``index → id`` string, not only addresses)."""
        key = self._imeikey(imei)

        async def work(redis: Redis) -> builtins.list[Any]:
            found: builtins.list[Any] = await redis.eval(_READ_SCRIPT, 1, key, 1, self._dkey(""))
            return found

        device = _device((await self._run(work))[0])
        # An entry left by a write this read raced names nobody unless the device agrees.
        return device if device is not None and device.imei == imei else None

    async def get_many(self, iccids: Sequence[str]) -> builtins.list[Device | None]:
        if not iccids:
            return []

        async def work(redis: Redis) -> builtins.list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for iccid in iccids:
                    pipe.hgetall(self._dkey(iccid))
                raws: builtins.list[Any] = await pipe.execute()
            return raws

        return [device_from_hash(raw) if raw else None for raw in await self._run(work)]

    def reads(self, identities: Sequence[str], ips: Sequence[str]) -> DeviceReads:
        """The devices of ``identities`` and ``ips`` as reads for one script call (here in
        :meth:`get_many_by_ip`; with the Idempotency-Key claims in api/admission.py)."""
        wanted: builtins.list[str | None] = []
        for ip in ips:
            try:
                wanted.append(normalise_ip(ip))
            except ValueError:
                wanted.append(None)
        asked = sorted({ip for ip in wanted if ip is not None})
        keys = [self._ipkey(ip) for ip in asked] + [self._dkey(iccid) for iccid in identities]
        script = ScriptReads(DEVICE_READ_LUA, keys, [len(asked), self._dkey("")])
        return DeviceReads(script, len(identities), wanted, asked)

    async def get_many_by_ip(self, ips: Sequence[str]) -> builtins.list[Device | None]:
        """One round trip whatever the number of ips: :data:`DEVICE_READ_LUA` follows each
        index entry to its device inside Redis (two pipelined reads measured 0.76 ms per batch
        of one device in the API, most of it redis-py's work per call; the script, one call).
        Being one script, it also cannot see an ip that moved between the two reads."""
        reads = self.reads((), ips)
        if not reads.asked:
            return [None] * len(ips)

        async def work(redis: Redis) -> builtins.list[Any]:
            found: builtins.list[Any] = await redis.eval(
                _READ_SCRIPT, len(reads.script.keys), *reads.script.keys, *reads.script.args
            )
            return found

        return reads.devices(await self._run(work))[1]

    async def list(self) -> builtins.list[Device]:
        async def work(redis: Redis) -> builtins.list[dict[bytes | str, bytes | str]]:
            members = await redis.smembers(device_set_key(self._prefix))
            iccids = sorted(_text(member) for member in members)
            async with redis.pipeline(transaction=False) as pipe:
                for iccid in iccids:
                    pipe.hgetall(self._dkey(iccid))
                raws: builtins.list[dict[bytes | str, bytes | str]] = await pipe.execute()
            return raws

        return [device_from_hash(raw) for raw in await self._run(work) if raw]

    async def _transaction(self, body: Any) -> Any:
        """Run ``body(pipe)`` until EXEC succeeds; ``body`` WATCHes, reads, then MULTI."""

        async def attempts(redis: Redis) -> Any:
            for _ in range(_MAX_TRANSACTION_ATTEMPTS):
                async with redis.pipeline(transaction=True) as pipe:
                    try:
                        return await body(pipe)
                    except WatchError:
                        continue
            raise StoreUnavailable("device store too busy: transaction kept conflicting")

        return await self._run(attempts)

    def _index_keys(self, device: Device) -> builtins.list[tuple[str, str, type[ApiError]]]:
        """The index entries ``device`` holds: (key, value it is indexed by, conflict error)."""
        entries: builtins.list[tuple[str, str, type[ApiError]]] = []
        if device.ip is not None:
            entries.append((self._ipkey(device.ip), f"ip {device.ip}", IpInUse))
        if device.imei is not None:
            entries.append((self._imeikey(device.imei), f"imei {device.imei}", ImeiInUse))
        return entries

    async def _claim_indexes(
        self, pipe: Pipeline, device: Device, current: Device | None
    ) -> tuple[builtins.list[str], builtins.list[str]]:
        """WATCH and check the index entries ``device`` needs; returns the keys to SET to its id
        and the keys of ``current`` to DELETE (entries it gives up and still owns)."""
        wanted = self._index_keys(device)
        held = {key for key, _, _ in self._index_keys(current)} if current is not None else set()
        claim = [entry for entry in wanted if entry[0] not in held]
        release = sorted(held - {key for key, _, _ in wanted})
        if claim or release:
            await pipe.watch(*[key for key, _, _ in claim], *release)
        for key, what, error in claim:
            owner = await pipe.get(key)
            if owner is not None and _text(owner) != device.id:
                raise error(f"{what} is already used by device {_text(owner)}")
        owned = []
        for key in release:
            owner = await pipe.get(key)
            if owner is not None and current is not None and _text(owner) == current.id:
                owned.append(key)
        return [key for key, _, _ in claim], owned

    async def create(self, device: Device) -> Device:
        dkey = self._dkey(device.id)
        values, _ = _to_hash(device)

        async def body(pipe: Pipeline) -> Device:
            await pipe.watch(dkey)
            if await pipe.exists(dkey):
                raise DeviceExists(f"device {device.id} already exists")
            claim, _ = await self._claim_indexes(pipe, device, None)
            _begin(pipe)
            pipe.hset(dkey, mapping=values)  # type: ignore[arg-type]
            for key in claim:
                pipe.set(key, device.id)
            pipe.sadd(device_set_key(self._prefix), device.id)
            if device.psk is not None:
                pipe.publish(psk_channel(self._prefix), device.id)
            await pipe.execute()
            return device

        result: Device = await self._transaction(body)
        return result

    async def update(self, iccid: str, **changes: Any) -> Device:
        return await self.modify(iccid, lambda _: changes)

    async def modify(self, iccid: str, change: Change) -> Device:
        dkey = self._dkey(iccid)

        async def body(pipe: Pipeline) -> Device:
            await pipe.watch(dkey)
            raw = await pipe.hgetall(dkey)
            if not raw:
                raise DeviceNotFound(f"device {iccid} not found")
            current = device_from_hash(raw)
            updated = current.with_changes(**change(current))
            if updated.id != iccid:
                raise ValueError("the id of a device cannot change")
            claim, release = await self._claim_indexes(pipe, updated, current)
            values, absent = _to_hash(updated)
            _begin(pipe)
            pipe.hset(dkey, mapping=values)  # type: ignore[arg-type]
            if absent:
                pipe.hdel(dkey, *absent)
            for key in release:
                pipe.delete(key)
            for key in claim:
                pipe.set(key, iccid)
            if updated.psk != current.psk:
                pipe.publish(psk_channel(self._prefix), iccid)
            await pipe.execute()
            return updated

        result: Device = await self._transaction(body)
        return result

    async def delete(self, iccid: str) -> None:
        dkey = self._dkey(iccid)

        async def body(pipe: Pipeline) -> None:
            await pipe.watch(dkey)
            raw = await pipe.hgetall(dkey)
            if not raw:
                raise DeviceNotFound(f"device {iccid} not found")
            current = device_from_hash(raw)
            _, release = await self._claim_indexes(pipe, _unindexed(current), current)
            _begin(pipe)
            pipe.delete(dkey)
            pipe.srem(device_set_key(self._prefix), iccid)
            for key in release:
                pipe.delete(key)
            # Announced even when the device had no PSK: a mirror may hold a negative entry.
            pipe.publish(psk_channel(self._prefix), iccid)
            await pipe.execute()

        await self._transaction(body)

    async def close(self) -> None:
        async with self._translated():
            await self._redis.aclose()
