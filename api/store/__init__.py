"""Device registry: the :class:`DeviceStore` seam and its memory and Redis implementations."""

from __future__ import annotations

from api.store.base import Device, DeviceStatus, DeviceStore, normalise_ip
from api.store.memory import MemoryDeviceStore

__all__ = ["Device", "DeviceStatus", "DeviceStore", "MemoryDeviceStore", "normalise_ip"]
