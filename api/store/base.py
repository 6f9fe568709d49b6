"""The device model and the :class:`DeviceStore` seam.

A device has an ``id``: the store's key and, over DTLS, its PSK identity. A SIM ("SIM as an
identity", docs/CONTRACT.md §2) is the device whose id is its ICCID; a device with credentials
issued through the API (the managed-PSK profile, docs/PROFILES.md) has any id of
:data:`DEVICE_ID_PATTERN`, no ICCID, and maybe an IMEI and no address.
"""

from __future__ import annotations

import builtins
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

DeviceStatus = Literal["active", "inactive"]

ICCID_PATTERN = r"^[0-9]{19,20}$"
_ICCID_RE = re.compile(ICCID_PATTERN)


def check_iccid(value: str) -> str:
    """An ICCID is 19 or 20 decimal digits (ITU-T E.118); the message says so plainly."""
    if _ICCID_RE.fullmatch(value) is None:
        raise ValueError("iccid must be 19 or 20 digits")
    return value


DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# No '/', '+', '#' or whitespace: an id is one MQTT topic level (MQTT 5 §4.7.1) and one path
# segment of the management API; ':' and '.' are allowed (an id may name a product and a device).
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
IMEI_PATTERN = r"^[0-9]{15}$"
_IMEI_RE = re.compile(IMEI_PATTERN)


def check_device_id(value: str) -> str:
    if _DEVICE_ID_RE.fullmatch(value) is None:
        raise ValueError(
            "id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-', "
            "starting with a letter or digit"
        )
    return value


def check_imei(value: str) -> str:
    """An IMEI is 15 decimal digits (3GPP TS 23.003 §6.2.1). The Luhn check digit is not
    verified: test modules and some vendors ship numbers whose check digit is wrong."""
    if _IMEI_RE.fullmatch(value) is None:
        raise ValueError("imei must be 15 digits")
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


# The JSON schema states the rules the validators apply, so the OpenAPI document (and a client
# generated from it) knows them; the validators keep their own plain error messages.
IP_JSON_SCHEMA = {
    "type": "string",
    "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
    "example": "10.0.0.7",
}
IpAddress = Annotated[str, AfterValidator(normalise_ip), WithJsonSchema(IP_JSON_SCHEMA)]
DeviceId = Annotated[
    str,
    AfterValidator(check_device_id),
    WithJsonSchema(
        {"type": "string", "pattern": DEVICE_ID_PATTERN, "example": "koru-869181072798893"}
    ),
]
Imei = Annotated[
    str,
    AfterValidator(check_imei),
    WithJsonSchema({"type": "string", "pattern": IMEI_PATTERN, "example": "869181072798893"}),
]
Iccid = Annotated[
    str,
    AfterValidator(check_iccid),
    WithJsonSchema({"type": "string", "pattern": ICCID_PATTERN, "example": "8988280666000000001"}),
]


class Location(BaseModel):
    """A device's last known position (issue #6). Degrees are kept as the decimal text they
    were given in, so ``13.404954`` is served as ``13.404954`` and never as a float's rounding."""

    model_config = ConfigDict(frozen=True)

    longitude: str
    latitude: str
    source: str
    sample_time: int


class Device(BaseModel):
    """One device. ``psk`` is a secret: never part of an HTTP answer (see
    ``api.routes.devices``) and left out of ``repr`` so a logged device cannot leak it.

    Fields are flat scalars because each is one field of the device's Redis hash; the proxy's
    PSK mirror reads the ``psk`` field of ``stores.keys.device_key(<PSK identity>)`` directly,
    so a device is found by its DTLS identity because its id is that identity.

    ``Device(iccid=X, ip=Y)`` is a SIM whose id is X, and a stored record without an ``id``
    (written before devices had one) loads the same way.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: DeviceId
    iccid: Iccid | None = None
    imei: Imei | None = None
    ip: IpAddress | None = None
    status: DeviceStatus = "active"
    psk: str | None = Field(default=None, repr=False)
    psk_user_set: bool | None = None
    last_bootstrap_at: datetime | None = None
    terms_accepted: bool | None = None
    """The owner accepted the terms of use; HTTPS onboarding answers 401 until then
    (docs/CONTRACT.md §8)."""
    location_barred: bool | None = None
    """``True``: the device may not read its location (CoAP 4.03, issue #6)."""
    location_longitude: str | None = None
    location_latitude: str | None = None
    location_source: str | None = None
    location_sample_time: int | None = None
    # Per-device rate limit of bootstrap/onboarding calls: a fixed window and its call count,
    # kept on the device so the check and the key rotation are one atomic store update.
    bootstrap_window_start: datetime | None = None
    bootstrap_window_calls: int | None = None
    # The credential issued through the managed-PSK credentials API (one per device; its key
    # is ``psk``): its id, when it was issued and revoked, listed without the key.
    credential_id: str | None = None
    credential_created_at: datetime | None = None
    credential_revoked_at: datetime | None = None
    template: str | None = None
    """The id of the payload template its messages are translated with (api/routes/
    templates.py); None: published as they come."""

    @model_validator(mode="before")
    @classmethod
    def _id_defaults_to_iccid(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("id") is None and data.get("iccid"):
            return {**data, "id": data["iccid"]}
        return data

    @model_validator(mode="after")
    def _sim_id_is_its_iccid(self) -> Device:
        # The SIM paths name a device by its ICCID (PSK identity, the `iccid` user property):
        # one key for both, or a SIM could be stored where its identity does not find it.
        if self.iccid is not None and self.id != self.iccid:
            raise ValueError("a SIM's id is its ICCID: give the same value or leave id out")
        return self

    @property
    def is_active(self) -> bool:
        # docs/CONTRACT.md §2: anything but "active" is non-active.
        return self.status == "active"

    @property
    def location(self) -> Location | None:
        if (
            self.location_longitude is None
            or self.location_latitude is None
            or self.location_source is None
            or self.location_sample_time is None
        ):
            return None
        return Location(
            longitude=self.location_longitude,
            latitude=self.location_latitude,
            source=self.location_source,
            sample_time=self.location_sample_time,
        )

    def with_changes(self, **changes: Any) -> Device:
        """A validated copy; ``model_copy(update=...)`` would skip validation."""
        return Device.model_validate({**self.model_dump(), **changes})


Change = Callable[[Device], Mapping[str, Any]]
"""Computes the changes to apply from the device as currently stored (see ``modify``)."""

PskListener = Callable[[str], None]
"""Called with a device id (its PSK identity) after that device's PSK was set, changed,
revoked or deleted."""


class DeviceStore(Protocol):
    """Where devices live. Every implementation passes ``tests/api/test_store_contract.py``.

    Every ``iccid`` argument is the device id (a SIM's id is its ICCID). Devices are indexed by
    ``ip`` and ``imei`` when they have one; each index names at most one device.

    Errors: :class:`api.errors.DeviceExists`, :class:`api.errors.IpInUse`,
    :class:`api.errors.ImeiInUse`, :class:`api.errors.DeviceNotFound`; a backend that cannot
    be reached raises :class:`api.errors.StoreUnavailable` and nothing else.

    PSK changes are announced: whenever a write changes a device's ``psk`` (set, rotated,
    revoked) or deletes a device, the store tells the proxies — the Redis store PUBLISHes the
    device id on ``stores.keys.psk_channel(prefix)`` in the same transaction as the write, the
    memory store calls its in-process listeners (``MemoryDeviceStore.add_psk_listener``).
    """

    @property
    def kind(self) -> str:
        """Short backend name for ``/healthz`` ("memory", "redis")."""
        ...

    async def get(self, iccid: str) -> Device | None: ...

    async def get_by_ip(self, ip: str) -> Device | None: ...

    async def get_by_imei(self, imei: str) -> Device | None:
        """The device with this IMEI (the managed-PSK profile names a device by id or IMEI)."""
        ...

    async def get_many(self, iccids: Sequence[str]) -> builtins.list[Device | None]:
        """``get`` for each, in order, in one round trip: the devices of one ingest batch."""
        ...

    async def get_many_by_ip(self, ips: Sequence[str]) -> builtins.list[Device | None]:
        """``get_by_ip`` for each, in order, in a fixed number of round trips (not one per ip)."""
        ...

    async def list(self) -> builtins.list[Device]: ...

    async def create(self, device: Device) -> Device: ...

    async def update(self, iccid: str, **changes: Any) -> Device: ...

    async def modify(self, iccid: str, change: Change) -> Device:
        """Read-modify-write as one atomic step: ``change(current)`` returns the changes to
        apply. It may run more than once (an optimistic transaction retried after a conflict)
        so it must not have side effects beyond its return value; an exception it raises
        aborts the write and propagates. ``update`` is ``modify`` with constant changes."""
        ...

    async def delete(self, iccid: str) -> None: ...

    async def close(self) -> None: ...
