"""Per batch, the two questions asked before publishing: who sent each message, and has it been
handled before (its Idempotency-Key claim).

:class:`SeparateAdmission` asks the device store and the idempotency store, concurrently: any
two implementations, any Redis topology. :class:`RedisAdmission` asks both in one script call
when both live on one Redis server (not a Cluster: the keys span slots), which is what the API
builds for itself from ``redis_url``; why one call rather than two: docs/ARCHITECTURE.md,
"One admission call per batch".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from api.errors import ApiError
from api.idempotency import Claimed, IdempotencyStore, RedisIdempotencyStore
from api.store.base import Device, DeviceStore, normalise_ip
from api.store.redis_store import device_from_hash
from policies import dedup
from policies.keys import device_ip_key, device_key


@dataclass(frozen=True, slots=True)
class Admitted:
    """``by_identity`` and ``by_ip`` follow the order asked; a lookup that failed as a whole is
    ``lookup_error`` (every item then answers its status) with both lists empty."""

    by_identity: list[Device | None]
    by_ip: list[Device | None]
    claims: list[Claimed]
    lookup_error: ApiError | None = None


class Admission(Protocol):
    async def admit(
        self, identities: Sequence[str], ips: Sequence[str], keys: Sequence[str]
    ) -> Admitted:
        """Devices by PSK identity and by address, and a claim on each Idempotency-Key.
        Raises StoreUnavailable when the claims cannot be made."""
        ...


class SeparateAdmission:
    def __init__(self, store: DeviceStore, idempotency: IdempotencyStore) -> None:
        self._store = store
        self._idempotency = idempotency

    async def admit(
        self, identities: Sequence[str], ips: Sequence[str], keys: Sequence[str]
    ) -> Admitted:
        claiming = asyncio.ensure_future(self._idempotency.claim(list(keys))) if keys else None
        try:
            try:
                by_identity, by_ip = await asyncio.gather(
                    self._store.get_many(identities), self._store.get_many_by_ip(ips)
                )
            except ApiError as exc:
                claims = await claiming if claiming is not None else []
                return Admitted([], [], claims, lookup_error=exc)
            claims = await claiming if claiming is not None else []
        finally:
            if claiming is not None and not claiming.done():
                claiming.cancel()
        return Admitted(by_identity, by_ip, claims)


# KEYS: ip index keys, then device hashes (by identity), then Idempotency-Key records.
# ARGV[1], ARGV[2]: how many of each of the first two; ARGV[3]: the device key prefix
# (device_key("")); then (op, value, ttl) per record, as in policies.dedup.BATCH_SCRIPT.
# Replies in KEYS order: a device as a flat field/value list ({} if none), then each record's.
_ADMIT_SCRIPT = (
    dedup.RECORD_OP_LUA
    + """
local n_ip, n_id, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local out = {}
for i = 1, n_ip do
  local iccid = redis.call('GET', KEYS[i])
  if iccid then out[i] = redis.call('HGETALL', prefix .. iccid) else out[i] = {} end
end
for i = n_ip + 1, n_ip + n_id do
  out[i] = redis.call('HGETALL', KEYS[i])
end
for i = n_ip + n_id + 1, #KEYS do
  local j = 3 * (i - n_ip - n_id - 1) + 3
  out[i] = record_op(KEYS[i], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3])
end
return out
"""
)


class RedisAdmission:
    """Both questions in one script call, on the idempotency store's connection (the device
    store being on the same server, under the same prefix). Answers recorded since the last
    call (``RedisIdempotencyStore.settle``) travel in it too, ahead of the claims."""

    def __init__(self, idempotency: RedisIdempotencyStore, *, prefix: str) -> None:
        if idempotency.cluster:
            raise ValueError("one script cannot span a Cluster's slots: use SeparateAdmission")
        self._idempotency = idempotency
        self._prefix = prefix

    async def admit(
        self, identities: Sequence[str], ips: Sequence[str], keys: Sequence[str]
    ) -> Admitted:
        wanted: list[str | None] = []
        for ip in ips:
            try:
                wanted.append(normalise_ip(ip))
            except ValueError:
                wanted.append(None)
        asked = [ip for ip in wanted if ip is not None]
        lookups = [device_ip_key(ip, self._prefix) for ip in asked]
        lookups += [device_key(identity, self._prefix) for identity in identities]
        counts: list[bytes | int | str] = [
            len(asked),
            len(identities),
            device_key("", self._prefix),
        ]
        devices, claims = await self._idempotency.claim_alongside(
            keys, _ADMIT_SCRIPT, lookups, counts
        )
        found = [_device(flat) for flat in devices]
        by_ip_found = dict(zip(asked, found[: len(asked)], strict=True))
        by_ip: list[Device | None] = []
        for maybe in wanted:
            device = by_ip_found.get(maybe) if maybe is not None else None
            by_ip.append(device if device is not None and device.ip == maybe else None)
        return Admitted(found[len(asked) :], by_ip, claims)


def _device(flat: Any) -> Device | None:
    if not flat:
        return None
    return device_from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))


def admission_for(
    store: DeviceStore, idempotency: IdempotencyStore, *, same_server: bool, prefix: str
) -> Admission:
    """One script when both stores are Redis on one server (``same_server``: the caller built
    both from one URL), else the two stores asked side by side."""
    if (
        same_server
        and isinstance(idempotency, RedisIdempotencyStore)
        and not idempotency.cluster
        and store.kind == "redis"
    ):
        return RedisAdmission(idempotency, prefix=prefix)
    return SeparateAdmission(store, idempotency)
