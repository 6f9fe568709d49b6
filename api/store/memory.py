"""In-process device store: the default when no Redis is configured (one API process only)."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Sequence
from typing import Any

from api.errors import DeviceExists, DeviceNotFound, ImeiInUse, IpInUse
from api.store.base import Change, Device, PskListener, normalise_ip

log = logging.getLogger(__name__)


class MemoryDeviceStore:
    """Dicts keyed by device id, by ip and by imei.

    No lock is needed: every method checks and mutates without awaiting in between, so on one
    event loop each call is atomic.

    **PSK change hook.** Without Redis there is no pub/sub, so this store offers the same
    signal in process: :meth:`add_psk_listener` registers a plain callable that is called with
    the device id right after a write that set, changed, rotated or revoked that device's PSK, or
    deleted the device — the events the Redis store PUBLISHes on
    ``stores.keys.psk_channel``. Listeners run synchronously on the event loop, after the
    write is applied (so ``await store.get(iccid)`` inside one already sees the new state);
    they must be quick and must not raise (an exception is logged and swallowed). This is the
    seam for ``coap-bridge up`` without Redis to keep the proxy's PSK mirror fresh.
    """

    def __init__(self) -> None:
        self._devices: dict[str, Device] = {}
        self._by_ip: dict[str, str] = {}
        self._by_imei: dict[str, str] = {}
        self._psk_listeners: list[PskListener] = []

    @property
    def kind(self) -> str:
        return "memory"

    def add_psk_listener(self, listener: PskListener) -> Callable[[], None]:
        """Call ``listener(device_id)`` after every PSK change; returns its remover."""
        self._psk_listeners.append(listener)

        def remove() -> None:
            if listener in self._psk_listeners:
                self._psk_listeners.remove(listener)

        return remove

    def _psk_changed(self, iccid: str) -> None:
        for listener in list(self._psk_listeners):
            try:
                listener(iccid)
            except Exception:
                log.exception("psk listener failed for device %s", iccid, extra={"device": iccid})

    async def get(self, iccid: str) -> Device | None:
        return self._devices.get(iccid)

    async def get_by_ip(self, ip: str) -> Device | None:
        try:
            key = normalise_ip(ip)
        except ValueError:
            return None
        iccid = self._by_ip.get(key)
        return self._devices.get(iccid) if iccid is not None else None

    async def get_by_imei(self, imei: str) -> Device | None:
        device_id = self._by_imei.get(imei)
        return self._devices.get(device_id) if device_id is not None else None

    async def get_many(self, iccids: Sequence[str]) -> builtins.list[Device | None]:
        return [self._devices.get(iccid) for iccid in iccids]

    async def get_many_by_ip(self, ips: Sequence[str]) -> builtins.list[Device | None]:
        return [await self.get_by_ip(ip) for ip in ips]

    async def list(self) -> builtins.list[Device]:
        return [self._devices[iccid] for iccid in sorted(self._devices)]

    def _check_indexes(self, device: Device) -> None:
        """Refuse an ip or imei another device holds (checked before anything is written)."""
        if device.ip is not None:
            owner = self._by_ip.get(device.ip)
            if owner is not None and owner != device.id:
                raise IpInUse(f"ip {device.ip} is already used by device {owner}")
        if device.imei is not None:
            owner = self._by_imei.get(device.imei)
            if owner is not None and owner != device.id:
                raise ImeiInUse(f"imei {device.imei} is already used by device {owner}")

    def _index(self, before: Device | None, after: Device | None) -> None:
        """Move the index entries of ``before`` to those of ``after`` (None: none)."""
        for index, field in ((self._by_ip, "ip"), (self._by_imei, "imei")):
            old: str | None = getattr(before, field) if before is not None else None
            new: str | None = getattr(after, field) if after is not None else None
            if old == new:
                continue
            if old is not None and before is not None and index.get(old) == before.id:
                del index[old]
            if new is not None and after is not None:
                index[new] = after.id

    async def create(self, device: Device) -> Device:
        if device.id in self._devices:
            raise DeviceExists(f"device {device.id} already exists")
        self._check_indexes(device)
        self._devices[device.id] = device
        self._index(None, device)
        if device.psk is not None:
            self._psk_changed(device.id)
        return device

    async def update(self, iccid: str, **changes: Any) -> Device:
        return await self.modify(iccid, lambda _: changes)

    async def modify(self, iccid: str, change: Change) -> Device:
        current = self._devices.get(iccid)
        if current is None:
            raise DeviceNotFound(f"device {iccid} not found")
        updated = current.with_changes(**change(current))
        if updated.id != iccid:
            raise ValueError("the id of a device cannot change")
        self._check_indexes(updated)
        self._index(current, updated)
        self._devices[iccid] = updated
        if updated.psk != current.psk:
            self._psk_changed(iccid)
        return updated

    async def delete(self, iccid: str) -> None:
        device = self._devices.pop(iccid, None)
        if device is None:
            raise DeviceNotFound(f"device {iccid} not found")
        self._index(device, None)
        self._psk_changed(iccid)

    async def close(self) -> None:
        return None
