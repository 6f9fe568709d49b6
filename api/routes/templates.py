"""Payload templates (issue 17; docs/API.md, "Payload templates"): operators upload templates
that turn a device's compact binary payload into JSON, assign one to a device
(``PATCH /devices/{id}`` ``{"template": id}``), and try one on a payload before they do.

A template is data: the translation itself is pure and lives in policies/templates.py, which
compiles a template once into precomputed ``struct`` readers. Templates are immutable — no
PUT: a changed template is uploaded as a new id — so :class:`TemplateBook` keeps what it
compiled, by id, in a bounded LRU without ever asking whether it is still current, on every
replica. The ingest routes (api/routes/ingest.py) ask it for the compiled template of each
device that has one.

Assignment is per device only: a fleet is assigned by a loop over ``PATCH /devices/{id}``
(device groups, when they come, can carry a template the same way).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.deps import NowDep, StoreDep, require_api_key
from api.errors import (
    BODY_TOO_LARGE,
    MALFORMED_BODY,
    ApiError,
    InvalidTemplate,
    NotAuthenticated,
    NotConfigured,
    PayloadNotTranslated,
    StoreUnavailable,
    TemplateInUse,
    TemplateNotFound,
    TemplateStoreUnavailable,
    clip,
    error_responses,
)
from api.safe_json import SafeJsonRoute
from api.store.base import Device, DeviceStore
from policies.templates import PayloadError, Template, TemplateError, compile_template
from stores.templates import StoredTemplate, TemplateExists, TemplateStore, TemplatesUnavailable

log = logging.getLogger(__name__)

TEMPLATE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_TEMPLATE_ID_RE = re.compile(TEMPLATE_ID_PATTERN)
CACHE_SIZE = 1024
"""Compiled templates a replica keeps (least recently used goes first): a deployment has a
handful of templates, so every message finds its template here after the first."""
_ID_BYTES = 9
"""An id is 9 random bytes, 12 url-safe characters: short enough for a topic or a log line,
72 bits so that two uploads never draw the same id in practice (a clash is drawn again)."""
LISTED_DEVICES = 10
"""Device ids a 409 on delete names."""
LOCATION_SOURCE = "template"
"""The ``source`` of a position a template's location fields set."""


def valid_template_id(value: str) -> bool:
    return _TEMPLATE_ID_RE.fullmatch(value) is not None


class TemplateBook:
    """The template store and what this replica compiled from it, by id."""

    def __init__(self, store: TemplateStore, *, cache_size: int = CACHE_SIZE) -> None:
        self.store = store
        self._compiled: OrderedDict[str, Template] = OrderedDict()
        self._cache_size = cache_size

    def _keep(self, template_id: str, template: Template) -> None:
        self._compiled[template_id] = template
        self._compiled.move_to_end(template_id)
        while len(self._compiled) > self._cache_size:
            self._compiled.popitem(last=False)

    async def compiled(self, template_id: str) -> Template | None:
        """The compiled template, or None when no template has this id. Raises
        :class:`TemplateStoreUnavailable` when it has to be read and the store cannot be."""
        template = self._compiled.get(template_id)
        if template is not None:
            self._compiled.move_to_end(template_id)
            return template
        record = await self.get(template_id)
        if record is None:
            return None
        try:
            template = compile_template(json.loads(record.text))
        except TemplateError as exc:  # stored by a release whose rules were looser
            log.error("template %s no longer compiles: %s", template_id, exc)
            return None
        self._keep(template_id, template)
        return template

    async def get(self, template_id: str) -> StoredTemplate | None:
        if not valid_template_id(template_id):
            return None  # no id of ours looks like that
        try:
            return await self.store.get(template_id)
        except TemplatesUnavailable as exc:
            log.warning("%s", exc)
            raise TemplateStoreUnavailable() from exc

    async def create(
        self, raw: dict[str, Any], name: str | None, now: float
    ) -> tuple[StoredTemplate, Template]:
        try:
            template = compile_template(raw)
        except TemplateError as exc:
            raise InvalidTemplate(exc.message, exc.where) from exc
        text = json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
        while True:
            record = StoredTemplate(
                id=secrets.token_urlsafe(_ID_BYTES), text=text, name=name, created_at=now
            )
            try:
                await self.store.create(record)
            except TemplateExists:
                continue
            except TemplatesUnavailable as exc:
                log.warning("%s", exc)
                raise TemplateStoreUnavailable() from exc
            self._keep(record.id, template)
            return record, template

    async def list(self) -> list[StoredTemplate]:
        try:
            return await self.store.list()
        except TemplatesUnavailable as exc:
            log.warning("%s", exc)
            raise TemplateStoreUnavailable() from exc

    async def delete(self, template_id: str) -> bool:
        if not valid_template_id(template_id):
            return False
        try:
            deleted = await self.store.delete(template_id)
        except TemplatesUnavailable as exc:
            log.warning("%s", exc)
            raise TemplateStoreUnavailable() from exc
        self._compiled.pop(template_id, None)
        return deleted

    async def close(self) -> None:
        await self.store.close()


async def get_templates(request: Request) -> TemplateBook:
    book: TemplateBook = request.app.state.templates
    return book


TemplatesDep = Annotated[TemplateBook, Depends(get_templates)]


# --- what a translation means for the device's location ------------------------------------


def _degrees(value: float | None, bound: int) -> str | None:
    """Decimal degrees as the location API keeps them (positional text, api/routes/
    location.py), or None for a value no position can have."""
    if value is None or not -bound <= value <= bound:  # NaN fails the comparison too
        return None
    return format(Decimal(repr(value)), "f")


def location_changes(
    latitude: float | None, longitude: float | None, sample_time: int
) -> dict[str, Any] | None:
    """The device fields a translation's position sets, or None when it has none (or only
    one of the two, or a value out of range: logged by the caller)."""
    latitude_text = _degrees(latitude, 90)
    longitude_text = _degrees(longitude, 180)
    if latitude_text is None or longitude_text is None:
        return None
    return {
        "location_longitude": longitude_text,
        "location_latitude": latitude_text,
        "location_source": LOCATION_SOURCE,
        "location_sample_time": sample_time,
    }


async def store_location(store: DeviceStore, device_id: str, changes: Mapping[str, Any]) -> None:
    """Write a translated position: the newest sample wins, as for ``PUT
    /devices/{id}/location`` (an older one is ignored, an equal time replaces). Called after
    the message was published; a failure is logged and the message stays acknowledged."""
    sample_time: int = changes["location_sample_time"]

    def change(current: Device) -> Mapping[str, Any]:
        stored = current.location
        if stored is not None and sample_time < stored.sample_time:
            return {}
        return changes

    try:
        await store.modify(device_id, change)
    except ApiError as exc:  # the store is down, or the device was deleted meanwhile
        log.warning("location of device %s from its template not stored: %s", device_id, exc)


# --- management -----------------------------------------------------------------------------

management = APIRouter(
    prefix="/templates",
    tags=["templates"],
    dependencies=[Depends(require_api_key)],
    route_class=SafeJsonRoute,
)

_EXAMPLE_TEMPLATE: dict[str, Any] = {
    "sense": [
        {
            "asset": "temperature",
            "value": {"byte": 0, "bytelength": 2, "type": "int", "scale": 0.01},
        },
        {"asset": "battery.level", "value": {"byte": 2, "bytelength": 1, "type": "uint"}},
        {
            "asset": "lat",
            "value": {"byte": 3, "bytelength": 4, "type": "float"},
            "custom_type": "location_lat",
        },
        {
            "asset": "lng",
            "value": {"byte": 7, "bytelength": 4, "type": "float"},
            "custom_type": "location_long",
        },
        {"asset": "ok", "value": {"byte": 11, "bytelength": 1, "type": "boolean"}},
    ]
}
_MANAGEMENT_ERRORS: tuple[type[ApiError], ...] = (
    NotAuthenticated,
    NotConfigured,
    TemplateStoreUnavailable,
)
# A 422 is either FastAPI's validation error (``detail`` a list) or one of ours (``detail`` a
# message; ``where`` for a template that does not compile): one schema for both.
_UNPROCESSABLE: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "the body is invalid; or: the template does not compile (`where` names "
        "the place); or: the payload does not fit the template",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["detail"],
                    "properties": {
                        "detail": {
                            "anyOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "object"}},
                            ]
                        },
                        "where": {"type": "string"},
                    },
                }
            }
        },
    }
}
TemplateIdPath = Annotated[str, Path(description="the template's id, as POST /templates chose it")]


class TemplateIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "tracker v2", "template": _EXAMPLE_TEMPLATE}]},
    )

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="for people: any text without control characters",
    )
    template: dict[str, Any] = Field(
        description='{"sense": [{"asset", "value": {"byte", "bytelength", "type", ...}}, ...]}'
        ' (docs/API.md, "Payload templates")'
    )


class TemplateOut(BaseModel):
    id: str
    name: str | None
    template: dict[str, Any] = Field(description="the template as uploaded")
    min_length: int = Field(description="bytes a payload needs; a shorter one is refused")
    created_at: float = Field(description="unix seconds")

    @classmethod
    def of(cls, record: StoredTemplate, template: Template) -> TemplateOut:
        return cls(
            id=record.id,
            name=record.name,
            template=json.loads(record.text),
            min_length=template.min_length,
            created_at=record.created_at,
        )


class TemplateList(BaseModel):
    templates: list[TemplateOut]


class TemplateTestIn(BaseModel):
    """Exactly one of the two payload fields."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"payload_hex": "09c4 5a 42520a3d 41567ae1 01"}],
            "oneOf": [{"required": ["payload_hex"]}, {"required": ["payload_base64"]}],
        },
    )

    payload_hex: str | None = Field(
        default=None, description="the payload in hex; spaces between bytes are allowed"
    )
    payload_base64: str | None = Field(default=None, description="the payload in base64")

    @field_validator("payload_hex")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                bytes.fromhex(value)
            except ValueError:
                raise ValueError(
                    "payload_hex is not hex (pairs of 0-9 a-f, spaces between)"
                ) from None
        return value

    @field_validator("payload_base64")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("payload_base64 is not base64 (RFC 4648 §4)") from None
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> TemplateTestIn:
        if (self.payload_hex is None) == (self.payload_base64 is None):
            raise ValueError("give exactly one of payload_hex and payload_base64")
        return self

    def payload(self) -> bytes:
        if self.payload_hex is not None:
            return bytes.fromhex(self.payload_hex)
        return base64.b64decode(self.payload_base64 or "", validate=True)


class TemplateTestOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    document: dict[str, Any] = Field(alias="json", description="what would be published")
    latitude: float | None = Field(description="from the location_lat field, if any")
    longitude: float | None = Field(description="from the location_long field, if any")


async def _compiled(book: TemplateBook, template_id: str) -> tuple[StoredTemplate, Template]:
    record = await book.get(template_id)
    if record is None:
        raise TemplateNotFound(f"no template {clip(template_id)}")
    template = await book.compiled(template_id)
    if template is None:  # deleted between the two reads
        raise TemplateNotFound(f"no template {clip(template_id)}")
    return record, template


@management.post(
    "",
    status_code=201,
    summary="Upload a payload template (the server chooses its id)",
    description=(
        "The template is compiled on upload: a template that does not compile is refused "
        'with 422 `{"detail", "where"}`, `where` naming the place '
        "(`sense[1].value.type`). Templates cannot be changed: upload a new one and assign it."
    ),
    responses=error_responses(*_MANAGEMENT_ERRORS)
    | _UNPROCESSABLE
    | MALFORMED_BODY
    | BODY_TOO_LARGE,
)
async def create_template(body: TemplateIn, book: TemplatesDep, now: NowDep) -> TemplateOut:
    record, template = await book.create(body.template, body.name, now.timestamp())
    log.info("template %s stored (%d bytes at least)", record.id, template.min_length)
    return TemplateOut.of(record, template)


@management.get(
    "",
    summary="Every payload template",
    responses=error_responses(*_MANAGEMENT_ERRORS),
)
async def list_templates(book: TemplatesDep) -> TemplateList:
    out: list[TemplateOut] = []
    for record in await book.list():
        template = await book.compiled(record.id)
        if template is not None:  # deleted meanwhile
            out.append(TemplateOut.of(record, template))
    return TemplateList(templates=out)


@management.get(
    "/{template_id}",
    summary="One payload template",
    responses=error_responses(TemplateNotFound, *_MANAGEMENT_ERRORS),
)
async def get_template(template_id: TemplateIdPath, book: TemplatesDep) -> TemplateOut:
    record, template = await _compiled(book, template_id)
    return TemplateOut.of(record, template)


@management.delete(
    "/{template_id}",
    status_code=204,
    summary="Delete a payload template no device uses",
    description="409 while devices are assigned the template (the answer names up to "
    f"{LISTED_DEVICES} of them in `devices`).",
    responses=error_responses(TemplateNotFound, TemplateInUse, StoreUnavailable)
    | error_responses(*_MANAGEMENT_ERRORS),
)
async def delete_template(
    template_id: TemplateIdPath, book: TemplatesDep, store: StoreDep
) -> Response:
    if await book.get(template_id) is None:
        raise TemplateNotFound(f"no template {clip(template_id)}")
    # A listing of the devices: a delete is rare and a template is held by few devices.
    users = [device.id for device in await store.list() if device.template == template_id]
    if users:
        named = ", ".join(users[:LISTED_DEVICES]) + (", …" if len(users) > LISTED_DEVICES else "")
        raise TemplateInUse(
            f"template {template_id} is assigned to {len(users)} device(s): {named}",
            users[:LISTED_DEVICES],
        )
    if not await book.delete(template_id):
        raise TemplateNotFound(f"no template {clip(template_id)}")
    log.info("template %s deleted", template_id)
    return Response(status_code=204)


@management.post(
    "/{template_id}/test",
    summary="Translate a payload with a template, as a device's message would be",
    description=(
        "Nothing is published or stored. 422 with the reason when the payload does not fit "
        "the template (shorter than its `min_length`, a string field that is not UTF-8)."
    ),
    response_model=TemplateTestOut,
    responses=error_responses(TemplateNotFound, *_MANAGEMENT_ERRORS)
    | _UNPROCESSABLE
    | MALFORMED_BODY
    | BODY_TOO_LARGE,
)
async def try_template(
    template_id: TemplateIdPath, body: TemplateTestIn, book: TemplatesDep
) -> TemplateTestOut:
    _, template = await _compiled(book, template_id)
    try:
        translation = template.translate(body.payload())
    except PayloadError as exc:
        raise PayloadNotTranslated(str(exc)) from exc
    return TemplateTestOut.model_validate(
        {
            "json": translation.document,
            "latitude": translation.latitude,
            "longitude": translation.longitude,
        }
    )
