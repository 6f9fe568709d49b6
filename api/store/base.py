"""The device model (SPEC §2, "SIM as an identity") and the :class:`DeviceStore` seam."""

from __future__ import annotations

import builtins
import ipaddress
import re
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict

DeviceStatus = Literal["active", "inactive"]

ICCID_PATTERN = r"^[0-9]{19,20}$"
_ICCID_RE = re.compile(ICCID_PATTERN)


def check_iccid(value: str) -> str:
    """An ICCID is 19 or 20 decimal digits (ITU-T E.118); the message says so plainly."""
    if _ICCID_RE.fullmatch(value) is None:
        raise ValueError("iccid must be 19 or 20 digits")
    return value


def normalise_ip(value: str) -> str:
    """One spelling per address, so the ip index finds ``2001:DB8::1`` as ``2001:db8::1``.

    An IPv4-mapped IPv6 address is reduced to its IPv4 form: a dual-stack socket reports an IPv4
    SIM that way, and the SIM must still match its registered IPv4 address.
    """
    address = ipaddress.ip_address(value.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


IpAddress = Annotated[str, AfterValidator(normalise_ip)]
Iccid = Annotated[str, AfterValidator(check_iccid)]


class Device(BaseModel):
    """One SIM. ``psk`` is a secret: never part of an HTTP answer (see ``api.routes.devices``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    iccid: Iccid
    ip: IpAddress
    status: DeviceStatus = "active"
    psk: str | None = None
    psk_user_set: bool | None = None
    last_bootstrap_at: datetime | None = None
    terms_accepted: bool | None = None

    @property
    def is_active(self) -> bool:
        # SPEC §2: anything but "active" is non-active.
        return self.status == "active"

    def with_changes(self, **changes: Any) -> Device:
        """A validated copy; ``model_copy(update=...)`` would skip validation."""
        return Device.model_validate({**self.model_dump(), **changes})


class DeviceStore(Protocol):
    """Where devices live. Every implementation passes ``tests/api/test_store_contract.py``.

    Errors: :class:`api.errors.DeviceExists`, :class:`api.errors.IpInUse`,
    :class:`api.errors.DeviceNotFound`; a backend that cannot be reached raises
    :class:`api.errors.StoreUnavailable` and nothing else.
    """

    @property
    def kind(self) -> str:
        """Short backend name for ``/healthz`` ("memory", "redis")."""
        ...

    async def get(self, iccid: str) -> Device | None: ...

    async def get_by_ip(self, ip: str) -> Device | None: ...

    async def list(self) -> builtins.list[Device]: ...

    async def create(self, device: Device) -> Device: ...

    async def update(self, iccid: str, **changes: Any) -> Device: ...

    async def delete(self, iccid: str) -> None: ...

    async def close(self) -> None: ...
