"""``/devices``: the management API of the device registry, behind a Bearer key.

A device is named by its id: a SIM's id is its ICCID (docs/CONTRACT.md §2), a device of the
managed-PSK profile has any id (docs/PROFILES.md) and maybe an IMEI.

Answers are :class:`DeviceOut`, which has no ``psk`` field: the key is a secret that only the
bootstrap flow hands out, so no listing or lookup can leak it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from api.deps import StoreDep, require_api_key
from api.errors import (
    BODY_TOO_LARGE,
    MALFORMED_BODY,
    DeviceNotFound,
    ImeiInUse,
    IpInUse,
    UnknownTemplate,
    clip,
)
from api.presence import PresenceDep
from api.routes.templates import TEMPLATE_ID_PATTERN, TemplatesDep
from api.safe_json import SafeJsonRoute
from api.store.base import (
    DEVICE_ID_PATTERN,
    ICCID_PATTERN,
    IMEI_PATTERN,
    IP_JSON_SCHEMA,
    Device,
    DeviceId,
    DeviceStatus,
    Iccid,
    Imei,
    IpAddress,
    Location,
)

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
DeviceIdPath = Annotated[
    str,
    Path(
        description="The device's id; a SIM's id is its ICCID (19 or 20 digits)",
        openapi_examples={"a device": {"value": EXAMPLE_ICCID}},
    ),
]
IccidPath = DeviceIdPath
"""The same parameter under its older name (the routes of /devices/{iccid}/...)."""


_ID_SCHEMA = {"type": "string", "pattern": DEVICE_ID_PATTERN, "example": "koru-869181072798893"}
_ICCID_SCHEMA = {"type": "string", "pattern": ICCID_PATTERN, "example": EXAMPLE_ICCID}
_IMEI_SCHEMA = {"type": "string", "pattern": IMEI_PATTERN, "example": "869181072798893"}


class DeviceCreate(BaseModel):
    """A SIM: ``iccid`` and ``ip`` (its id is its ICCID). Any other device: ``id`` and, if it
    has one, ``imei``; no address is needed (it is named by its PSK identity over DTLS)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"iccid": "8988280666000000001", "ip": "10.0.0.7", "status": "active"},
                {"id": "koru-869181072798893", "imei": "869181072798893"},
            ],
            # What the validators below enforce, so a client generated from the document
            # knows it too.
            "oneOf": [
                {"required": ["id"], "not": {"required": ["iccid"]}},
                {"required": ["iccid", "ip"], "not": {"required": ["id"]}},
            ],
        },
    )

    # "Absent" is how a field is left out; the documented schema offers no null (the
    # validator below refuses it), as for DevicePatch.
    id: Annotated[DeviceId | None, WithJsonSchema(_ID_SCHEMA)] = None
    # validate_default: the rules below must also see an absent field.
    iccid: Annotated[Iccid | None, WithJsonSchema(_ICCID_SCHEMA)] = Field(
        default=None, validate_default=True
    )
    imei: Annotated[Imei | None, WithJsonSchema(_IMEI_SCHEMA)] = None
    ip: Annotated[IpAddress | None, WithJsonSchema(IP_JSON_SCHEMA)] = Field(
        default=None, validate_default=True
    )
    status: DeviceStatus = "active"

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = sorted(name for name, value in data.items() if value is None)
            if nulls:
                raise ValueError(f"{', '.join(nulls)} may not be null: leave it out")
        return data

    @field_validator("iccid")
    @classmethod
    def _id_or_iccid(cls, value: str | None, info: ValidationInfo) -> str | None:
        # An id that broke its own rule is missing from info.data: its error is the one to read.
        if "id" not in info.data:
            return value
        if value is None and info.data["id"] is None:
            raise ValueError("give an id, or a SIM's iccid (then the id is the iccid)")
        if value is not None and info.data["id"] is not None:
            raise ValueError("give an id or an iccid, not both: a SIM's id is its iccid")
        return value

    @field_validator("ip")
    @classmethod
    def _a_sim_has_an_address(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Over plain CoAP a SIM is named by its source address (docs/CONTRACT.md §2).
        if value is None and info.data.get("iccid") is not None:
            raise ValueError("a SIM needs its ip (it is named by its address over plain CoAP)")
        return value

    def device(self) -> Device:
        # The validators above saw to it that an id or an iccid is set (a SIM's id is its iccid).
        return Device.model_validate(self.model_dump())


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
    imei: Annotated[Imei | None, WithJsonSchema({"type": "string", "pattern": IMEI_PATTERN})] = None
    template: Annotated[
        str | None,
        WithJsonSchema(
            {"anyOf": [{"type": "string", "pattern": TEMPLATE_ID_PATTERN}, {"type": "null"}]}
        ),
    ] = None
    """The id of a payload template (POST /templates): the device's messages are translated
    with it; null: published as they come. An id no template has is a 422."""

    @field_validator("ip", "status", "terms_accepted", "location_barred", "imei")
    @classmethod
    def _not_null(cls, value: str | bool | None) -> str | bool | None:
        # Defaults are not validated, so this only sees an explicit null.
        if value is None:
            raise ValueError("may not be null")
        return value


class DeviceOut(BaseModel):
    id: str = Field(description="the device's id (its PSK identity); a SIM's is its ICCID")
    iccid: str | None = None
    imei: str | None = None
    ip: str | None = None
    status: DeviceStatus
    psk_user_set: bool | None = None
    last_bootstrap_at: datetime | None = None
    terms_accepted: bool | None = None
    location_barred: bool | None = None
    location: Location | None = None
    template: str | None = Field(default=None, description="its payload template's id")

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        # Field by field: a new Device attribute (a secret, say) is never shown by accident.
        return cls(
            id=device.id,
            iccid=device.iccid,
            imei=device.imei,
            ip=device.ip,
            status=device.status,
            psk_user_set=device.psk_user_set,
            last_bootstrap_at=device.last_bootstrap_at,
            terms_accepted=device.terms_accepted,
            location_barred=device.location_barred,
            location=device.location,
            template=device.template,
        )


@router.post(
    "",
    status_code=201,
    summary="Register a device",
    responses=_BODY_RESPONSES | {409: {"description": "id exists, or ip or imei in use"}},
)
async def create_device(body: DeviceCreate, store: StoreDep) -> DeviceOut:
    device = await store.create(body.device())
    return DeviceOut.of(device)


@router.get("", summary="List devices", responses=_AUTH_RESPONSES)
async def list_devices(store: StoreDep) -> list[DeviceOut]:
    return [DeviceOut.of(device) for device in await store.list()]


@router.get(
    "/{device_id}",
    summary="Get one device",
    responses=_AUTH_RESPONSES | {404: {"description": DeviceNotFound.default_message}},
)
async def get_device(device_id: DeviceIdPath, store: StoreDep) -> DeviceOut:
    device = await store.get(device_id)
    if device is None:
        raise DeviceNotFound(f"device {clip(device_id)} not found")
    return DeviceOut.of(device)


@router.patch(
    "/{device_id}",
    summary="Change a device's ip, imei, status, terms acceptance, location access or "
    "payload template",
    responses=_BODY_RESPONSES
    | {
        404: {"description": DeviceNotFound.default_message},
        409: {"description": f"{IpInUse.default_message}; or {ImeiInUse.default_message}"},
    },
)
async def patch_device(
    device_id: DeviceIdPath, body: DevicePatch, store: StoreDep, templates: TemplatesDep
) -> DeviceOut:
    changes = body.model_dump(exclude_unset=True)
    template = changes.get("template")
    if template is not None and await templates.get(template) is None:
        raise UnknownTemplate(f"no template {clip(template)}")
    device = await store.update(device_id, **changes)
    return DeviceOut.of(device)


@router.delete(
    "/{device_id}",
    status_code=204,
    summary="Delete a device",
    responses=_AUTH_RESPONSES | {404: {"description": DeviceNotFound.default_message}},
)
async def delete_device(
    device_id: DeviceIdPath, store: StoreDep, presence: PresenceDep
) -> Response:
    await store.delete(device_id)
    # Its presence goes with it, and its retained status on the broker (api/presence.py).
    await presence.forget(device_id)
    return Response(status_code=204)
