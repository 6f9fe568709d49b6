"""``POST /ingest``: telemetry from a device, via the proxy, to MQTT (SPEC §8, §10)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from api.deps import PublisherDep, SettingsDep, StoreDep, require_proxy
from api.errors import (
    ApiError,
    BadForwarded,
    BrokerUnavailable,
    DeviceUnauthorized,
    InvalidTopic,
    PayloadTooLarge,
)
from api.store.base import Device, DeviceStore
from policies.forwarding import FORWARDED_HEADER, IDENTITY_HEADER, Origin, parse_forwarded
from policies.media import content_format_for
from policies.topics import TopicError, render_topic, validate_topic

router = APIRouter(tags=["ingest"])


def _error_responses(*errors: type[ApiError]) -> dict[int | str, dict[str, str]]:
    return {error.status_code: {"description": error.default_message} for error in errors}


async def _resolve_device(request: Request, store: DeviceStore) -> tuple[Device, Origin]:
    forwarded = request.headers.get(FORWARDED_HEADER)
    origin = parse_forwarded(forwarded) if forwarded else None
    if origin is None:
        raise BadForwarded()
    identity = request.headers.get(IDENTITY_HEADER)
    # SPEC §2: over DTLS the PSK identity (the iccid) names the device; over plain CoAP its
    # source address does.
    device = await store.get(identity) if identity else await store.get_by_ip(origin.ip)
    if device is None or not device.is_active:
        raise DeviceUnauthorized()
    return device, origin


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"payload is {declared} bytes, at most {limit}")
    body = bytearray()
    # Counted while streaming as well: a chunked body declares no length.
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"payload is more than {limit} bytes")
    return bytes(body)


def _source(origin: Origin) -> str:
    host = f"[{origin.ip}]" if ":" in origin.ip else origin.ip
    return f"{host}:{origin.port}"


@router.post(
    "/ingest",
    status_code=204,
    summary="Publish one device message to MQTT",
    description=(
        "Called by the coap-bridge proxy with the device's address in `Forwarded` (and, over "
        "DTLS, its PSK identity). Answers 204 only after the broker's PUBACK (QoS 1); the body "
        "is published byte-exact."
    ),
    dependencies=[Depends(require_proxy)],
    responses=_error_responses(
        BadForwarded, DeviceUnauthorized, InvalidTopic, PayloadTooLarge, BrokerUnavailable
    )
    | {403: {"description": "missing or invalid proxy token"}},
)
async def ingest(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    publisher: PublisherDep,
    t: Annotated[
        str | None,
        Query(description="MQTT topic: 1-253 of [A-Za-z0-9_/], no '//'"),
    ] = None,
) -> Response:
    received_at = time.time_ns() // 1_000_000
    device, origin = await _resolve_device(request, store)
    if len(request.query_params.getlist("t")) > 1:
        raise InvalidTopic("query 't' given more than once")
    try:
        topic = (
            validate_topic(t)
            if t is not None
            else render_topic(settings.topic_template, iccid=device.iccid)
        )
    except TopicError as exc:
        raise InvalidTopic(str(exc)) from exc
    payload = await _read_body(request, settings.max_payload)

    properties = {"iccid": device.iccid, "source": _source(origin)}
    content_type = request.headers.get("content-type")
    if content_type:
        number = content_format_for(content_type)
        properties["content-format"] = str(number) if number is not None else content_type
    properties["received-at"] = str(received_at)

    await publisher.publish(topic, payload, properties)
    return Response(status_code=204)
