"""``POST /telemetry?id=<device>``: the managed-PSK profile's telemetry (docs/PROFILES.md).

The device names itself in the ``id`` query (its id or its IMEI). Over DTLS the PSK identity
has already named the device (the proxy sends it in ``X-Bridge-Identity``), so ``id`` must be
that device's: another device's id is 403 (authenticated, but not allowed to speak for it,
RFC 7252 §5.9.2.4), not 401 (the handshake did authenticate it). Over plain CoAP, which the
proxy forwards only in development mode (the profile's route is not ``plain``), ``id`` alone
names the device.

The payload is published byte-exact, after checking that it decodes in its Content-Format:
JSON (50) by the API's bounded parser, CBOR (60) as exactly one well-formed data item
(RFC 8949 §5.1), raw bytes (42, or no Content-Format) as they are; anything else is 415.
Publishing is /ingest's: QoS 1, answered after the PUBACK, once per Idempotency-Key across
replicas (api/idempotency.py), so a retransmission that another proxy replica forwards again
is answered 201 without a second message.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Annotated

import cbor2
from fastapi import APIRouter, Depends, Query, Request, Response

from api.deps import IdempotencyDep, PublisherDep, SettingsDep, StoreDep, require_proxy
from api.errors import (
    BadDeviceQuery,
    BadForwarded,
    BrokerUnavailable,
    DeviceForbidden,
    DeviceUnauthorized,
    PayloadTooLarge,
    UndecodablePayload,
    UnsupportedContentFormat,
    error_responses,
)
from api.identity import origin_from
from api.presence import PresenceWatcher
from api.routes.ingest import (
    default_topic,
    message_properties,
    publish_once,
    read_body,
)
from api.safe_json import SafeJsonRoute, loads
from api.store.base import Device, DeviceStore, check_imei
from policies.forwarding import (
    FORWARDED_HEADER,
    IDENTITY_HEADER,
)

log = logging.getLogger(__name__)

router = APIRouter(tags=["telemetry"], route_class=SafeJsonRoute)

JSON, CBOR, OCTETS = 50, 60, 42
_MEDIA_TYPES = {
    "application/json": JSON,
    "application/cbor": CBOR,
    "application/octet-stream": OCTETS,
}


def content_format_of(content_type: str | None) -> int | None:
    """The Content-Format of a request (None: the device sent none, treated as raw bytes);
    :class:`UnsupportedContentFormat` for any other than JSON, CBOR or raw."""
    if not content_type:
        return None
    media_type = content_type.partition(";")[0].strip().lower()
    number = _MEDIA_TYPES.get(media_type)
    if number is None:
        raise UnsupportedContentFormat(
            f"content format {media_type[:64]!r} not accepted: send JSON (50), CBOR (60) or "
            "raw bytes (42)"
        )
    return number


def check_payload(content_format: int | None, payload: bytes) -> None:
    """:class:`UndecodablePayload` unless ``payload`` decodes in ``content_format``."""
    if content_format == JSON:
        try:
            loads(payload)
        except json.JSONDecodeError as exc:
            raise UndecodablePayload(f"payload is not valid JSON: {exc.msg}") from exc
    elif content_format == CBOR:
        _check_cbor(payload)


def _check_cbor(payload: bytes) -> None:
    # A lone "break" stop code is no data item (RFC 8949 §3.2.1: it only ends an
    # indefinite-length one) though the decoder returns a marker for it; no item starts with it.
    if payload[:1] == b"\xff":
        raise UndecodablePayload("payload is not valid CBOR: a break stop code outside a container")
    stream = io.BytesIO(payload)
    try:
        cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, RecursionError, ValueError, OverflowError) as exc:
        raise UndecodablePayload(f"payload is not valid CBOR: {exc}") from exc
    # Bytes after the item would be a second one: a CBOR sequence (RFC 8742) is not
    # Content-Format 60.
    if stream.tell() != len(payload):
        raise UndecodablePayload(
            f"payload is not valid CBOR: {len(payload) - stream.tell()} bytes after the data item"
        )


def _named(ids: list[str]) -> str:
    if len(ids) != 1 or not ids[0]:
        raise BadDeviceQuery(
            "query 'id' is missing" if not ids
            else "query 'id' is empty" if len(ids) == 1
            else "query 'id' given more than once"
        )  # fmt: skip
    return ids[0]


def _is_imei(value: str) -> bool:
    try:
        check_imei(value)
    except ValueError:
        return False
    return True


async def telemetry_device(store: DeviceStore, named: str, identity: str | None) -> Device:
    """The device a /telemetry message is from (module docstring): 401 for an unknown or
    inactive device, 403 when a DTLS device names another."""
    if identity:
        device = await store.get(identity)
        if device is None or not device.is_active:
            raise DeviceUnauthorized()
        if named not in (device.id, device.imei):
            raise DeviceForbidden(f"the PSK identity {identity[:64]} may not send for {named[:64]}")
        return device
    device = await store.get(named)
    if device is None and _is_imei(named):
        device = await store.get_by_imei(named)
    if device is None or not device.is_active:
        raise DeviceUnauthorized()
    return device


@router.post(
    "/telemetry",
    status_code=201,
    summary="Publish one managed-PSK device message to MQTT",
    description=(
        "Called by the coap-bridge proxy for `POST /telemetry?id=<device>` (docs/PROFILES.md). "
        "`id` is the device's id or IMEI; over DTLS it must belong to the PSK identity's "
        "device (else 403). The body must decode in its Content-Format (JSON, CBOR; raw "
        "bytes are taken as they are) and is published byte-exact to the device's default "
        "topic; 201 after the broker's PUBACK."
    ),
    dependencies=[Depends(require_proxy)],
    responses=error_responses(
        BadForwarded,
        BadDeviceQuery,
        UndecodablePayload,
        DeviceUnauthorized,
        DeviceForbidden,
        PayloadTooLarge,
        UnsupportedContentFormat,
        BrokerUnavailable,
    )
    | {201: {"description": "published (PUBACK received); no body"}},
)
async def telemetry(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    publisher: PublisherDep,
    idempotency: IdempotencyDep,
    id: Annotated[str | None, Query(description="the device's id or IMEI")] = None,
) -> Response:
    received_at = time.time_ns() // 1_000_000
    origin = origin_from(request.headers.get(FORWARDED_HEADER))
    named = _named(request.query_params.getlist("id"))
    device = await telemetry_device(store, named, request.headers.get(IDENTITY_HEADER))
    content_format = content_format_of(request.headers.get("content-type"))
    payload = await read_body(request, settings.max_payload)
    check_payload(content_format, payload)
    properties = message_properties(
        device,
        origin.ip,
        origin.port,
        None if content_format is None else str(content_format),
        received_at,
    )
    topic = default_topic(settings, device)
    status = await publish_once(request, idempotency, publisher, topic, payload, properties)
    await note_presence(request, device.id, settings.online_window)
    # publish_once speaks /ingest's 204 (also when it repeats a recorded answer).
    return Response(status_code=201 if status == 204 else status)


async def note_presence(request: Request, device: str, lifetime: float) -> None:
    """The device is online for ``lifetime`` s from this message (docs/PROFILES.md)."""
    # Absent in an app built without presence (a test's): nothing to note.
    watcher: PresenceWatcher | None = getattr(request.app.state, "presence", None)
    if watcher is not None:
        await watcher.note(device, lifetime)
