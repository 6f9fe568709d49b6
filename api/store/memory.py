"""In-process device store: the default when no Redis is configured (one API process only)."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Sequence
from typing import Any

from api.errors import DeviceExists, DeviceNotFound, IpInUse
from api.store.base import Change, Device, PskListener, normalise_ip

log = logging.getLogger(__name__)


class MemoryDeviceStore:
    """Dicts keyed by iccid and by ip.

    No lock is needed: every method checks and mutates without awaiting in between, so on one
    event loop each call is atomic.

    **PSK change hook.** Without Redis there is no pub/sub, so this store offers the same
    signal in process: :meth:`add_psk_listener` registers a plain callable that is called with
    the ICCID right after a write that set, changed, rotated or revoked that device's PSK, or
    deleted the device — the events the Redis store PUBLISHes on
    ``stores.keys.psk_channel``. Listeners run synchronously on the event loop, after the
    write is applied (so ``await store.get(iccid)`` inside one already sees the new state);
    they must be quick and must not raise (an exception is logged and swallowed). This is the
    seam for ``coap-bridge up`` without Redis to keep the proxy's PSK mirror fresh.
    """

    def __init__(self) -> None:
        self._devices: dict[str, Device] = {}
        self._by_ip: dict[str, str] = {}
        self._psk_listeners: list[PskListener] = []

    @property
    def kind(self) -> str:
        return "memory"

    def add_psk_listener(self, listener: PskListener) -> Callable[[], None]:
        """Call ``listener(iccid)`` after every PSK change; returns a function that removes it."""
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
                log.exception("psk listener failed for device %s", iccid)

    async def get(self, iccid: str) -> Device | None:
        return self._devices.get(iccid)

    async def get_by_ip(self, ip: str) -> Device | None:
        try:
            key = normalise_ip(ip)
        except ValueError:
            return None
        iccid = self._by_ip.get(key)
        return self._devices.get(iccid) if iccid is not None else None

    async def get_many(self, iccids: Sequence[str]) -> builtins.list[Device | None]:
        return [self._devices.get(iccid) for iccid in iccids]

    async def get_many_by_ip(self, ips: Sequence[str]) -> builtins.list[Device | None]:
        return [await self.get_by_ip(ip) for ip in ips]

    async def list(self) -> builtins.list[Device]:
        return [self._devices[iccid] for iccid in sorted(self._devices)]

    async def create(self, device: Device) -> Device:
        if device.iccid in self._devices:
            raise DeviceExists(f"device {device.iccid} already exists")
        if device.ip in self._by_ip:
            raise IpInUse(f"ip {device.ip} is already used by device {self._by_ip[device.ip]}")
        self._devices[device.iccid] = device
        self._by_ip[device.ip] = device.iccid
        if device.psk is not None:
            self._psk_changed(device.iccid)
        return device

    async def update(self, iccid: str, **changes: Any) -> Device:
        return await self.modify(iccid, lambda _: changes)

    async def modify(self, iccid: str, change: Change) -> Device:
        current = self._devices.get(iccid)
        if current is None:
            raise DeviceNotFound(f"device {iccid} not found")
        updated = current.with_changes(**change(current))
        if updated.iccid != iccid:
            raise ValueError("the iccid of a device cannot change")
        owner = self._by_ip.get(updated.ip)
        if owner is not None and owner != iccid:
            raise IpInUse(f"ip {updated.ip} is already used by device {owner}")
        if updated.ip != current.ip:
            del self._by_ip[current.ip]
            self._by_ip[updated.ip] = iccid
        self._devices[iccid] = updated
        if updated.psk != current.psk:
            self._psk_changed(iccid)
        return updated

    async def delete(self, iccid: str) -> None:
        device = self._devices.pop(iccid, None)
        if device is None:
            raise DeviceNotFound(f"device {iccid} not found")
        if self._by_ip.get(device.ip) == iccid:
            del self._by_ip[device.ip]
        self._psk_changed(iccid)

    async def close(self) -> None:
        return None
