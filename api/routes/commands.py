"""Downlink commands over HTTP (issue 15; the service is api/commands.py).

Management: ``POST /devices/{iccid}/commands`` queues one, ``GET`` lists them. Proxy-facing:
``GET /commands/{device}`` is the device's Observe resource (the head command, which becomes
sent) and ``DELETE /commands/{device}`` with ``If-Match`` confirms the device ACKed it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from api.commands import (
    BadCommand,
    Command,
    CommandDeviceNotFound,
    CommandForbidden,
    CommandNotHead,
    CommandQueueFull,
    Commands,
    CommandTooLarge,
    PreconditionRequired,
    command_path,
)
from api.deps import StoreDep, require_api_key, require_proxy
from api.errors import (
    BODY_TOO_LARGE,
    MALFORMED_BODY,
    BadForwarded,
    DeviceUnauthorized,
    NotAuthenticated,
    NotConfigured,
    ProxyForbidden,
    StoreUnavailable,
    error_responses,
)
from api.identity import calling_device
from api.routes.devices import EXAMPLE_ICCID, IccidPath
from api.safe_json import SafeJsonRoute
from api.settings import MAX_COMMAND_TTL
from policies.media import CONTENT_FORMATS, content_type_for
from stores.redis import REDIS_ERRORS
from stores.relations import RelationCount

log = logging.getLogger(__name__)

JSON_FORMAT = 50  # application/json
BYTES_FORMAT = 42  # application/octet-stream
MAX_AGE_CAP = 86_400
"""Longest Cache-Control max-age given for a command (the proxy's Max-Age, RFC 7252 §5.10.5)."""
# Canonical base64 (RFC 4648 §4) with padding, the only form b64decode(validate=True) takes.
_BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


async def get_commands(request: Request) -> Commands:
    commands: Commands | None = getattr(request.app.state, "commands", None)
    if commands is None:
        raise NotConfigured("commands are not available: the app was started without them")
    return commands


CommandsDep = Annotated[Commands, Depends(get_commands)]


class _Options(BaseModel):
    content_format: int | None = Field(
        default=None,
        description="CoAP Content-Format of the payload (default: 50 for `payload`, 42 for "
        "`payload_base64`); one the bridge can translate",
        json_schema_extra={"enum": list[JsonValue](sorted(CONTENT_FORMATS))},
    )
    ttl: int | None = Field(
        default=None,
        ge=1,
        le=MAX_COMMAND_TTL,
        description="seconds the command waits for its device (default 86400)",
    )


class JsonCommand(_Options):
    """A JSON payload, sent to the device as its compact UTF-8 encoding."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"payload": {"led": "on"}, "ttl": 3600}]},
    )

    payload: JsonValue = Field(description="any JSON value")


class BytesCommand(_Options):
    """Payload bytes, as base64 (RFC 4648 §4, padded)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"payload_base64": "AQID", "content_format": 42}]},
    )

    payload_base64: str = Field(pattern=_BASE64, description="the payload bytes in base64")


class CommandOut(BaseModel):
    id: str = Field(description="also the ETag of the device's notification")
    iccid: str
    state: str = Field(description="queued, sent, delivered or expired")
    content_format: int
    size: int = Field(description="payload bytes")
    created_at: float = Field(description="unix seconds")
    expires_at: float = Field(description="unix seconds")
    sent_at: float | None = Field(default=None, description="first sent to the device")
    delivered_at: float | None = Field(default=None, description="the device acknowledged it")

    @classmethod
    def of(cls, command: Command) -> CommandOut:
        return cls(
            id=command.id,
            iccid=command.iccid,
            state=command.state,
            content_format=command.content_format,
            size=command.size,
            created_at=round(command.created_at, 3),
            expires_at=round(command.expires_at, 3),
            sent_at=None if command.sent_at is None else round(command.sent_at, 3),
            delivered_at=None if command.delivered_at is None else round(command.delivered_at, 3),
        )


class CommandList(BaseModel):
    commands: list[CommandOut] = Field(description="oldest first")
    observers: int | None = Field(
        description="Observe relations on the device's /commands resource held by proxy "
        "replicas that are alive (docs/SCALING.md); null when that is not known here"
    )


def _payload(body: JsonCommand | BytesCommand) -> tuple[bytes, int]:
    if isinstance(body, JsonCommand):
        text = json.dumps(body.payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        default = JSON_FORMAT
        payload = text.encode()
    else:
        try:
            payload = base64.b64decode(body.payload_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadCommand(f"payload_base64 is not base64: {exc}", "payload_base64") from exc
        default = BYTES_FORMAT
    return payload, default if body.content_format is None else body.content_format


# --- management -----------------------------------------------------------------------------

management = APIRouter(
    prefix="/devices",
    tags=["commands"],
    dependencies=[Depends(require_api_key)],
    route_class=SafeJsonRoute,
)

_AUTH_ERRORS = (NotAuthenticated, NotConfigured, StoreUnavailable)


@management.post(
    "/{iccid}/commands",
    status_code=201,
    summary="Queue a command for a device",
    description="The device receives it as a CON notification while it observes "
    "`/commands/{iccid}` over CoAP (now, or when it next registers), after the commands "
    "queued before it, one at a time. Exactly one of `payload` (JSON) and `payload_base64` "
    "(bytes). At most `max_payload` bytes; at most `max_commands_per_device` (100) waiting "
    "per device (409 beyond).",
    responses=error_responses(
        CommandDeviceNotFound, CommandQueueFull, CommandTooLarge, *_AUTH_ERRORS
    )
    | MALFORMED_BODY
    | BODY_TOO_LARGE,
)
async def submit_command(
    iccid: IccidPath, body: JsonCommand | BytesCommand, commands: CommandsDep
) -> CommandOut:
    payload, content_format = _payload(body)
    command = await commands.submit(iccid, payload, content_format, body.ttl)
    return CommandOut.of(command)


@management.get(
    "/{iccid}/commands",
    summary="A device's commands and their states",
    description="Oldest first: the waiting ones (queued, sent) and those delivered or "
    "expired in the last 24 hours.",
    responses=error_responses(CommandDeviceNotFound, *_AUTH_ERRORS),
)
async def list_commands(iccid: IccidPath, commands: CommandsDep, request: Request) -> CommandList:
    listed = [CommandOut.of(c) for c in await commands.list(iccid)]
    return CommandList(commands=listed, observers=await _observers(request, iccid))


async def _observers(request: Request, iccid: str) -> int | None:
    relations: RelationCount | None = request.app.state.relations
    if relations is None:
        return None
    try:
        return await relations.observers(command_path(iccid))
    except REDIS_ERRORS as exc:  # the listing still answers; the count is unknown
        log.warning(
            "observe relation records of device %s unreadable: %s",
            iccid,
            exc,
            extra={"device": iccid},
        )
        return None


# --- proxy-facing ---------------------------------------------------------------------------

router = APIRouter(tags=["commands"], dependencies=[Depends(require_proxy)])

DevicePath = Annotated[
    str,
    Path(
        max_length=64,
        description="the device's iccid: must be the calling device",
        openapi_examples={"the calling device": {"value": EXAMPLE_ICCID}},
    ),
]
_DEVICE_ERRORS = (
    BadForwarded,
    DeviceUnauthorized,
    CommandForbidden,
    ProxyForbidden,
    StoreUnavailable,
    NotConfigured,
)


async def _own_device(request: Request, store: StoreDep, device: str) -> str:
    """The calling device, resolved as for ``/location`` (DTLS identity, else the source
    address), which must be ``device``."""
    caller, _ = await calling_device(request, store)
    if caller.id != device:
        raise CommandForbidden()
    return caller.id


def _max_age(command: Command, now: float) -> int:
    return max(0, min(MAX_AGE_CAP, math.ceil(command.expires_at - now)))


@router.get(
    "/commands/{device}",
    summary="The device's next command (called by the proxy for CoAP GET/Observe)",
    description="The oldest waiting command: its payload, `Content-Type` from its content "
    'format, `ETag: "<id>"`, `Cache-Control: max-age` = seconds until it expires (at most '
    "86400). It becomes `sent`. No command: 200 with an empty body, without ETag. The proxy "
    "observes it (RFC 7641) and is told of changes on `/observe/events`.",
    response_class=Response,
    responses={
        200: {
            "description": "the command's payload, or nothing",
            "headers": {
                "ETag": {"description": "the command id, quoted", "schema": {"type": "string"}}
            },
            "content": {
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in CONTENT_FORMATS.values()
            },
        },
        **error_responses(*_DEVICE_ERRORS),
    },
)
async def next_command(
    device: DevicePath, request: Request, store: StoreDep, commands: CommandsDep
) -> Response:
    iccid = await _own_device(request, store, device)
    command = await commands.head(iccid)
    if command is None:
        return Response(status_code=200)
    return Response(
        content=command.payload,
        media_type=content_type_for(command.content_format),
        headers={
            "ETag": f'"{command.id}"',
            "Cache-Control": f"max-age={_max_age(command, commands.clock())}",
        },
    )


def _entity_tag(if_match: str) -> str | None:
    """The one strong entity-tag of an If-Match (RFC 9110 §13.1.1); None for anything else
    (a list, ``*``, a weak tag: none of them names one command)."""
    value = if_match.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"' and '"' not in value[1:-1]:
        return value[1:-1]
    return None


@router.delete(
    "/commands/{device}",
    status_code=204,
    summary="The device acknowledged its command (called by the proxy)",
    description='`If-Match: "<id>"` names the command the device ACKed; it must be the '
    "oldest waiting one. It becomes `delivered` and the next one is announced.",
    response_class=Response,
    responses=error_responses(CommandNotHead, PreconditionRequired, *_DEVICE_ERRORS),
)
async def acknowledge_command(
    device: DevicePath,
    request: Request,
    store: StoreDep,
    commands: CommandsDep,
    if_match: Annotated[
        str | None,
        Header(description='"<command id>", from the ETag of the command the device ACKed'),
    ] = None,
) -> Response:
    iccid = await _own_device(request, store, device)
    if if_match is None:
        raise PreconditionRequired()
    command_id = _entity_tag(if_match)
    if command_id is None:
        raise CommandNotHead('If-Match must be one strong entity-tag: "<command id>"')
    await commands.deliver(iccid, command_id)
    return Response(status_code=204)
