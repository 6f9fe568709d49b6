"""Per batch, the two questions asked before publishing: who sent each message, and has it been
handled before (its Idempotency-Key claim in the ledger, stores/ledger.py).

:class:`SeparateAdmission` asks the device store and the ledger, concurrently: any two
implementations, any Redis topology. :class:`RedisAdmission` asks both in one script call
when both live on one Redis server (not a Cluster: the keys span slots): the device store says
what to read (``RedisDeviceStore.reads``), the ledger makes those reads before its claims
(``RedisLedger.claim_after``). That is what the API builds for itself from ``redis_url``; why one
call rather than two: docs/ARCHITECTURE.md, "One admission call per batch".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from api.errors import ApiError, StoreUnavailable
from api.idempotency import LEASE, claim_keys
from api.store.base import Device, DeviceStore
from api.store.redis_store import RedisDeviceStore
from stores.ledger import Ledger, LedgerUnavailable, Outcome, RedisLedger


@dataclass(frozen=True, slots=True)
class Admitted:
    """``by_identity`` and ``by_ip`` follow the order asked; a lookup that failed as a whole is
    ``lookup_error`` (every item then answers its status) with both lists empty."""

    by_identity: list[Device | None]
    by_ip: list[Device | None]
    claims: list[Outcome]
    lookup_error: ApiError | None = None


class Admission(Protocol):
    async def admit(
        self, identities: Sequence[str], ips: Sequence[str], keys: Sequence[str]
    ) -> Admitted:
        """Devices by PSK identity and by address, and a claim on each Idempotency-Key.
        Raises StoreUnavailable when the claims cannot be made."""
        ...


class SeparateAdmission:
    def __init__(self, store: DeviceStore, ledger: Ledger) -> None:
        self._store = store
        self._ledger = ledger

    async def admit(
        self, identities: Sequence[str], ips: Sequence[str], keys: Sequence[str]
    ) -> Admitted:
        claiming = asyncio.ensure_future(claim_keys(self._ledger, keys)) if keys else None
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


class RedisAdmission:
    """Both questions in one script call, on the ledger's connection (the device store being on
    the same server). Records settled since the last call travel in it too, ahead of the
    claims."""

    def __init__(self, store: RedisDeviceStore, ledger: RedisLedger) -> None:
        if ledger.spans_slots:
            raise ValueError("one script cannot span a Cluster's slots: use SeparateAdmission")
        self._store = store
        self._ledger = ledger

    async def admit(
        self, identities: Sequence[str], ips: Sequence[str], keys: Sequence[str]
    ) -> Admitted:
        reads = self._store.reads(identities, ips)
        try:
            replies, claims = await self._ledger.claim_after(reads.script, keys, LEASE)
        except LedgerUnavailable as exc:
            raise StoreUnavailable(f"store unavailable: {exc}") from exc
        by_identity, by_ip = reads.devices(replies)
        return Admitted(by_identity, by_ip, claims)


def admission_for(store: DeviceStore, ledger: Ledger, *, same_server: bool) -> Admission:
    """One script when both are Redis on one server (``same_server``: the caller built both
    from one URL), else the two asked side by side."""
    if (
        same_server
        and isinstance(ledger, RedisLedger)
        and not ledger.spans_slots
        and isinstance(store, RedisDeviceStore)
    ):
        return RedisAdmission(store, ledger)
    return SeparateAdmission(store, ledger)
