"""``/devices``: the management API of the device registry, behind a Bearer key.

A device is a SIM (docs/CONTRACT.md §2).

Answers are :class:`DeviceOut`, which has no ``psk`` field: the key is a secret that only the
bootstrap flow hands out, so no listing or lookup can leak it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, WithJsonSchema, field_validator

from api.deps import StoreDep, require_api_key
from api.errors import BODY_TOO_LARGE, MALFORMED_BODY, DeviceNotFound, IpInUse, clip
from api.safe_json import SafeJsonRoute
from api.store.base import IP_JSON_SCHEMA, Device, DeviceStatus, Iccid, IpAddress, Location

router = APIRouter(
    prefix="/devices",
    tags=["devices"],
    dependencies=[Depends(require_api_key)],
    route_class=SafeJsonRoute,
)

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or invalid bearer API key"},
    503: {"description": "no API key is configured, or the device store is unavailable"},
}
_BODY_RESPONSES = _AUTH_RESPONSES | MALFORMED_BODY | BODY_TOO_LARGE

EXAMPLE_ICCID = "8988280666000000001"
IccidPath = Annotated[
    str,
    Path(
        description="The device's ICCID (19 or 20 digits)",
        openapi_examples={"a device": {"value": EXAMPLE_ICCID}},
    ),
]


class DeviceCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"iccid": "8988280666000000001", "ip": "10.0.0.7", "status": "active"}]
        },
    )

    iccid: Iccid
    ip: IpAddress
    status: DeviceStatus = "active"


class DevicePatch(BaseModel):
    """Only the fields present change; ``null`` is refused rather than meaning "unset"."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"terms_accepted": True}, {"location_barred": True}]},
    )

    # "Absent" is the only way to leave a field alone, so the documented schema does not
    # offer null either (the validator below refuses it).
    ip: Annotated[IpAddress | None, WithJsonSchema(IP_JSON_SCHEMA)] = None
    status: Annotated[
        DeviceStatus | None, WithJsonSchema({"type": "string", "enum": ["active", "inactive"]})
    ] = None
    terms_accepted: Annotated[bool | None, WithJsonSchema({"type": "boolean"})] = None
    """The owner accepted the terms of use: HTTPS onboarding answers 401 until then."""
    location_barred: Annotated[bool | None, WithJsonSchema({"type": "boolean"})] = None
    """Bar the device from reading its location (CoAP 4.03)."""

    @field_validator("ip", "status", "terms_accepted", "location_barred")
    @classmethod
    def _not_null(cls, value: str | bool | None) -> str | bool | None:
        # Defaults are not validated, so this only sees an explicit null.
        if value is None:
            raise ValueError("may not be null")
        return value


class DeviceOut(BaseModel):
    iccid: str
    ip: str
    status: DeviceStatus
    psk_user_set: bool | None = None
    last_bootstrap_at: datetime | None = None
    terms_accepted: bool | None = None
    location_barred: bool | None = None
    location: Location | None = None

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        # Field by field: a new Device attribute (a secret, say) is never shown by accident.
        return cls(
            iccid=device.iccid,
            ip=device.ip,
            status=device.status,
            psk_user_set=device.psk_user_set,
            last_bootstrap_at=device.last_bootstrap_at,
            terms_accepted=device.terms_accepted,
            location_barred=device.location_barred,
            location=device.location,
        )


@router.post(
    "",
    status_code=201,
    summary="Register a device",
    responses=_BODY_RESPONSES | {409: {"description": "iccid exists or ip in use"}},
)
async def create_device(body: DeviceCreate, store: StoreDep) -> DeviceOut:
    device = await store.create(Device(iccid=body.iccid, ip=body.ip, status=body.status))
    return DeviceOut.of(device)


@router.get("", summary="List devices", responses=_AUTH_RESPONSES)
async def list_devices(store: StoreDep) -> list[DeviceOut]:
    return [DeviceOut.of(device) for device in await store.list()]


@router.get(
    "/{iccid}",
    summary="Get one device",
    responses=_AUTH_RESPONSES | {404: {"description": DeviceNotFound.default_message}},
)
async def get_device(iccid: IccidPath, store: StoreDep) -> DeviceOut:
    device = await store.get(iccid)
    if device is None:
        raise DeviceNotFound(f"device {clip(iccid)} not found")
    return DeviceOut.of(device)


@router.patch(
    "/{iccid}",
    summary="Change a device's ip, status, terms acceptance or location access",
    responses=_BODY_RESPONSES
    | {
        404: {"description": DeviceNotFound.default_message},
        409: {"description": IpInUse.default_message},
    },
)
async def patch_device(iccid: IccidPath, body: DevicePatch, store: StoreDep) -> DeviceOut:
    device = await store.update(iccid, **body.model_dump(exclude_unset=True))
    return DeviceOut.of(device)


@router.delete(
    "/{iccid}",
    status_code=204,
    summary="Delete a device",
    responses=_AUTH_RESPONSES | {404: {"description": DeviceNotFound.default_message}},
)
async def delete_device(iccid: IccidPath, store: StoreDep) -> Response:
    await store.delete(iccid)
    return Response(status_code=204)
