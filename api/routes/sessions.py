"""The signed-session profile's device side (docs/PROFILES.md, "signed_session"), called by the
proxy over plain CoAP:

- ``POST /auth/{productKey}/{deviceKey}`` with ``{"secureMode": 2, "lifetime": 30..86400,
  "sign": <hex SHA-256>}`` opens a session bound to the device's address;
- ``POST /topic/sys/{productKey}/{deviceKey}/thing/measurepoint/post`` (JSON) and
  ``.../thing/model/up_raw`` (raw bytes): telemetry inside that session, published to MQTT.

The sign is the upper-case hex SHA-256 of
``deviceKey{dk}lifetime{lt}productKey{pk}secureMode{sm}{deviceSecret}``: the parameters sorted
by name, each name followed by its value (the numbers as their decimal text), then the secret.
What a replayed auth may achieve is bounded in stores/registry.py (``open_session``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response

from api.deps import IdempotencyDep, PublisherDep, SettingsDep, require_proxy
from api.errors import (
    AuthRefused,
    BadAuthMessage,
    BadForwarded,
    BrokerUnavailable,
    NoSession,
    PayloadTooLarge,
    StoreUnavailable,
    UndecodablePayload,
    error_responses,
)
from api.identity import origin_from
from api.presence import PresenceDep
from api.routes.ingest import publish_once, read_body
from api.routes.registry import RegistryDep, registry_errors
from api.safe_json import loads
from policies.forwarding import FORWARDED_HEADER
from policies.media import content_format_for
from policies.topics import render_topic
from stores.registry import AuthOutcome, device_id, valid_device_key, valid_product_key

router = APIRouter(tags=["sessions"], dependencies=[Depends(require_proxy)])

SECURE_MODE = 2
"""The only secure mode served: a static device secret, the sign over the parameters
(docs/PROFILES.md). Others would need dynamic activation (a product secret) or TLS."""
MIN_LIFETIME, MAX_LIFETIME = 30, 86_400
AUTH_BODY_LIMIT = 1024
"""An auth message is three short fields; nothing longer is one."""
_SIGN_RE = re.compile(r"[0-9A-Fa-f]{64}")

# Path segments: a key that breaks the registry's rules names no device (401, as an unknown
# one), rather than a 422 the device could not act on.
AnyKey = Annotated[str, Path(max_length=128)]


def expected_sign(product_key: str, device_key: str, lifetime: int, secret: str) -> str:
    text = (
        f"deviceKey{device_key}lifetime{lifetime}productKey{product_key}"
        f"secureMode{SECURE_MODE}{secret}"
    )
    return hashlib.sha256(text.encode()).hexdigest().upper()


def _int_field(message: dict[str, Any], name: str) -> int:
    value = message.get(name)
    # bool is an int in Python, not a number in JSON; 2.0 is not the decimal text "2".
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadAuthMessage(f"'{name}' must be an integer")
    return value


def parse_auth(body: bytes) -> tuple[int, str]:
    """The lifetime and the sign (upper case) of an auth message, or BadAuthMessage."""
    try:
        message = loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadAuthMessage("auth message is not JSON") from exc
    if not isinstance(message, dict):
        raise BadAuthMessage("auth message must be a JSON object")
    if _int_field(message, "secureMode") != SECURE_MODE:
        raise BadAuthMessage(f"secureMode must be {SECURE_MODE}")
    lifetime = _int_field(message, "lifetime")
    if not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
        raise BadAuthMessage(f"lifetime must be {MIN_LIFETIME}..{MAX_LIFETIME} seconds")
    sign = message.get("sign")
    if not isinstance(sign, str) or _SIGN_RE.fullmatch(sign) is None:
        raise BadAuthMessage("sign must be 64 hexadecimal characters")
    # Upper case is what the platform documents; lower case is the same digest and costs
    # nothing to accept (docs/PROFILES.md).
    return lifetime, sign.upper()


@router.post(
    "/auth/{product_key}/{device_key}",
    status_code=200,
    summary="Open a device's session with a signed auth message",
    description="200 (→ 2.05) with no body: the session is open (or this very auth opened the "
    "live one). 400: not a valid auth message. 401: unknown product or device, a sign that "
    "does not verify, or a replay (docs/PROFILES.md).",
    responses=error_responses(BadAuthMessage, BadForwarded, AuthRefused, StoreUnavailable),
)
async def authenticate(
    product_key: AnyKey,
    device_key: AnyKey,
    request: Request,
    registry: RegistryDep,
    presence: PresenceDep,
) -> Response:
    origin = origin_from(request.headers.get(FORWARDED_HEADER))
    lifetime, sign = parse_auth(await read_body(request, AUTH_BODY_LIMIT))
    if not (valid_product_key(product_key) and valid_device_key(device_key)):
        raise AuthRefused()
    with registry_errors():
        device = await registry.get_device(product_key, device_key)
    # Computed for an unknown device too, so that timing tells nothing about which keys exist.
    secret = device.device_secret if device is not None else "-"
    wanted = expected_sign(product_key, device_key, lifetime, secret)
    if not hmac.compare_digest(wanted.encode(), sign.encode()) or device is None:
        raise AuthRefused()
    with registry_errors():
        outcome = await registry.open_session(
            device.id, sign, origin.ip, lifetime, now=presence.clock()
        )
    if outcome is AuthOutcome.UNUSED:
        raise AuthRefused("an auth whose session was never used: authenticate anew")
    if outcome is AuthOutcome.OPENED:
        await presence.note(device.id, lifetime)
    return Response(status_code=200)


async def _telemetry(
    request: Request,
    product_key: str,
    device_key: str,
    resource: str,
    *,
    json_body: bool,
    settings: SettingsDep,
    registry: RegistryDep,
    presence: PresenceDep,
    publisher: PublisherDep,
    idempotency: IdempotencyDep,
) -> Response:
    received_at = time.time_ns() // 1_000_000
    origin = origin_from(request.headers.get(FORWARDED_HEADER))
    if not (valid_product_key(product_key) and valid_device_key(device_key)):
        raise NoSession()
    device = device_id(product_key, device_key)
    with registry_errors():
        lifetime = await registry.use_session(device, origin.ip, now=presence.clock())
    if lifetime is None:
        raise NoSession()
    payload = await read_body(request, settings.max_payload)
    if json_body:
        try:
            loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UndecodablePayload("measure points must be JSON") from exc
    host = f"[{origin.ip}]" if ":" in origin.ip else origin.ip
    properties = {
        "device": device,
        "product-key": product_key,
        "device-key": device_key,
        "resource": resource,
        "source": f"{host}:{origin.port}",
    }
    content_type = request.headers.get("content-type")
    if content_type:
        number = content_format_for(content_type)
        properties["content-format"] = str(number) if number is not None else content_type
    properties["received-at"] = str(received_at)
    topic = render_topic(settings.topic_template, device=device)
    status = await publish_once(request, idempotency, publisher, topic, payload, properties)
    await presence.note(device, lifetime)
    return Response(status_code=status)


_TELEMETRY_ERRORS = error_responses(
    BadForwarded, NoSession, PayloadTooLarge, BrokerUnavailable, StoreUnavailable
)


@router.post(
    "/topic/sys/{product_key}/{device_key}/thing/measurepoint/post",
    status_code=204,
    summary="Measure points (JSON) inside a session, published to MQTT",
    description="204 (→ 2.04) after the broker's PUBACK; the body is published as sent. 400: "
    "not JSON. 401: no live session of this device from this address.",
    responses=_TELEMETRY_ERRORS | error_responses(UndecodablePayload),
)
async def measurepoint(
    product_key: AnyKey,
    device_key: AnyKey,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    presence: PresenceDep,
    publisher: PublisherDep,
    idempotency: IdempotencyDep,
) -> Response:
    return await _telemetry(
        request,
        product_key,
        device_key,
        "thing/measurepoint/post",
        json_body=True,
        settings=settings,
        registry=registry,
        presence=presence,
        publisher=publisher,
        idempotency=idempotency,
    )


@router.post(
    "/topic/sys/{product_key}/{device_key}/thing/model/up_raw",
    status_code=204,
    summary="Raw bytes inside a session, published to MQTT as sent",
    description="204 (→ 2.04) after the broker's PUBACK. 401: no live session of this device "
    "from this address.",
    responses=_TELEMETRY_ERRORS,
)
async def up_raw(
    product_key: AnyKey,
    device_key: AnyKey,
    request: Request,
    settings: SettingsDep,
    registry: RegistryDep,
    presence: PresenceDep,
    publisher: PublisherDep,
    idempotency: IdempotencyDep,
) -> Response:
    return await _telemetry(
        request,
        product_key,
        device_key,
        "thing/model/up_raw",
        json_body=False,
        settings=settings,
        registry=registry,
        presence=presence,
        publisher=publisher,
        idempotency=idempotency,
    )
