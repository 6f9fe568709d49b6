"""In-process device store: the default when no Redis is configured (one API process only)."""

from __future__ import annotations

import builtins
from typing import Any

from api.errors import DeviceExists, DeviceNotFound, IpInUse
from api.store.base import Device, normalise_ip


class MemoryDeviceStore:
    """Dicts keyed by iccid and by ip.

    No lock is needed: every method checks and mutates without awaiting in between, so on one
    event loop each call is atomic.
    """

    def __init__(self) -> None:
        self._devices: dict[str, Device] = {}
        self._by_ip: dict[str, str] = {}

    @property
    def kind(self) -> str:
        return "memory"

    async def get(self, iccid: str) -> Device | None:
        return self._devices.get(iccid)

    async def get_by_ip(self, ip: str) -> Device | None:
        try:
            key = normalise_ip(ip)
        except ValueError:
            return None
        iccid = self._by_ip.get(key)
        return self._devices.get(iccid) if iccid is not None else None

    async def list(self) -> builtins.list[Device]:
        return [self._devices[iccid] for iccid in sorted(self._devices)]

    async def create(self, device: Device) -> Device:
        if device.iccid in self._devices:
            raise DeviceExists(f"device {device.iccid} already exists")
        if device.ip in self._by_ip:
            raise IpInUse(f"ip {device.ip} is already used by device {self._by_ip[device.ip]}")
        self._devices[device.iccid] = device
        self._by_ip[device.ip] = device.iccid
        return device

    async def update(self, iccid: str, **changes: Any) -> Device:
        current = self._devices.get(iccid)
        if current is None:
            raise DeviceNotFound(f"device {iccid} not found")
        updated = current.with_changes(**changes)
        if updated.iccid != iccid:
            raise ValueError("the iccid of a device cannot change")
        owner = self._by_ip.get(updated.ip)
        if owner is not None and owner != iccid:
            raise IpInUse(f"ip {updated.ip} is already used by device {owner}")
        if updated.ip != current.ip:
            del self._by_ip[current.ip]
            self._by_ip[updated.ip] = iccid
        self._devices[iccid] = updated
        return updated

    async def delete(self, iccid: str) -> None:
        device = self._devices.pop(iccid, None)
        if device is None:
            raise DeviceNotFound(f"device {iccid} not found")
        if self._by_ip.get(device.ip) == iccid:
            del self._by_ip[device.ip]

    async def close(self) -> None:
        return None
