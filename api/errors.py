"""Project errors of the HTTP backend, each knowing how it is rendered over HTTP.

Library exceptions (redis, aiomqtt) are translated into these at the module that wraps the
library, so routes and the single exception handler only ever see this hierarchy. Every error
renders as JSON ``{"detail": "<message>"}`` — the shape FastAPI itself uses for
``HTTPException`` — so a client parses one body shape for all failures; a 422 for one field
(:class:`InvalidField`) takes the shape of FastAPI's own validation errors instead, so a 422 is
always ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

ECHO_LIMIT = 64
"""Most characters of a caller's input an error repeats (issue 12: a 5 MB value in a 422, or a
10 KB path in a 404, came back whole)."""
MESSAGE_LIMIT = 256
"""Longest error message: a message that quotes the caller (an iccid from the path) is cut."""
_ECHO_ITEMS = 8
_ECHO_DEPTH = 2
_DECIMAL_EXPONENT = 18  # a Decimal this close to 1 is shown as a number, as FastAPI would


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when something was cut."""
    return text if len(text) <= limit else f"{text[:limit]}…"


class ApiError(Exception):
    """Base of every error the backend reports to its caller."""

    status_code: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = clip(message or self.default_message, MESSAGE_LIMIT)
        super().__init__(self.message)

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> Any:
        return {"detail": self.message}


class InvalidField(ApiError):
    """A value that passed the schema but not a rule the schema cannot express."""

    status_code = 422
    default_message = "invalid value"
    location: ClassVar[tuple[str, ...]] = ("body",)

    def body(self) -> Any:
        return {
            "detail": [{"loc": list(self.location), "msg": self.message, "type": "value_error"}]
        }


class DeviceNotFound(ApiError):
    status_code = 404
    default_message = "device not found"


class DeviceExists(ApiError):
    status_code = 409
    default_message = "a device with this id already exists"


class IpInUse(ApiError):
    status_code = 409
    default_message = "another device already has this ip"


class ImeiInUse(ApiError):
    """The IMEI index names one device: a device named by its IMEI must be unambiguous."""

    status_code = 409
    default_message = "another device already has this imei"


class StoreUnavailable(ApiError):
    """The device store (Redis) cannot be reached; the caller may retry."""

    status_code = 503
    default_message = "device store unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class BadBatch(ApiError):
    """A ``/ingest/batch`` body that does not follow the batch format."""

    status_code = 400
    default_message = "invalid batch body"


class BatchVersionMismatch(ApiError):
    """A ``/ingest/batch`` body in another layout than this backend's (a proxy of another
    release, during a rolling upgrade): refused as a whole, nothing decoded."""

    status_code = 415
    default_message = "batch layout not supported"


class BrokerUnavailable(ApiError):
    """No PUBACK: the broker is down or slow. 503 becomes 5.03 so the device retries
    (docs/CONTRACT.md §9)."""

    status_code = 503
    default_message = "MQTT broker unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class NotConfigured(ApiError):
    """A secret the endpoint needs is not set, so the endpoint is switched off."""

    status_code = 503
    default_message = "endpoint not configured"


class NotAuthenticated(ApiError):
    status_code = 401
    default_message = "missing or invalid bearer API key"

    @property
    def headers(self) -> dict[str, str]:
        # RFC 6750 §3: a 401 for a bearer-protected resource names the scheme.
        return {"WWW-Authenticate": 'Bearer realm="coap-bridge"'}


class ProxyForbidden(ApiError):
    """The caller lacks the proxy token, so it may not speak for a device (docs/CONTRACT.md §11)."""

    status_code = 403
    default_message = "missing or invalid proxy token"


class BadForwarded(ApiError):
    status_code = 400
    default_message = "missing or unparseable Forwarded header"


class InvalidTopic(ApiError):
    status_code = 400
    default_message = "invalid topic"


class DeviceUnauthorized(ApiError):
    """Unknown or non-active device: 4.01 on the CoAP side (docs/CONTRACT.md §2)."""

    status_code = 401
    default_message = "unknown or inactive device"


class TermsNotAccepted(DeviceUnauthorized):
    """HTTPS onboarding for a device whose owner has not accepted the terms
    (docs/CONTRACT.md §8)."""

    default_message = "the device owner has not accepted the terms of use"


class BadDeviceQuery(ApiError):
    """``POST /telemetry`` without exactly one non-empty ``id`` query: 4.00 (docs/PROFILES.md)."""

    status_code = 400
    default_message = "query 'id' must be given exactly once and not be empty"


class DeviceForbidden(ApiError):
    """The caller is an authenticated device, but the ``id`` it names is another device's:
    4.03 (RFC 7252 §5.9.2.4: authenticated, not allowed), docs/PROFILES.md."""

    status_code = 403
    default_message = "the PSK identity does not belong to this device"


class UndecodablePayload(ApiError):
    """A payload that does not decode in the Content-Format it declares (JSON, CBOR): 4.00."""

    status_code = 400
    default_message = "payload does not decode in its content format"


class UnsupportedContentFormat(ApiError):
    """A Content-Format the resource does not take: 4.15 (RFC 7252 §5.9.2.9)."""

    status_code = 415
    default_message = "unsupported content format"


class CredentialNotFound(ApiError):
    status_code = 404
    default_message = "credential not found"


class PayloadTooLarge(ApiError):
    status_code = 413
    default_message = "payload too large"


class BodyTooLarge(PayloadTooLarge):
    """A request body over the route's cap (api/guard.py), refused before it is read."""

    default_message = "request body too large"


class InvalidPsk(InvalidField):
    """A user-supplied PSK that cannot be used (``policies.psk.PskError``); the message says
    why and never repeats the key."""

    default_message = "invalid PSK"
    location = ("body", "psk")


class SampleTimeInFuture(InvalidField):
    """A location sample from the future would shadow every real update ("newest wins")."""

    default_message = "sample_time is more than one day ahead of the server's clock"
    location = ("body", "sample_time")


class BootstrapRateLimited(ApiError):
    """Too many bootstrap/onboarding calls from one device in the current window (issue #5):
    429 → 4.29, so the endpoint cannot be used to hammer the store or churn keys."""

    status_code = 429
    default_message = "too many bootstrap calls for this device"

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class BadLocationRequest(ApiError):
    """``GET /location`` with a query or a payload: 4.00 on the CoAP side (issue #6)."""

    status_code = 400
    default_message = "GET /location takes no query and no payload"


class LocationForbidden(ApiError):
    """The device is barred from reading its location: 4.03 (issue #6)."""

    status_code = 403
    default_message = "location access is barred for this device"


class LocationNotFound(ApiError):
    """No position is known for the device yet: 4.04 (issue #6)."""

    status_code = 404
    default_message = "no location data for this device"


class ErrorBody(BaseModel):
    """The body of every error of the management and proxy-facing endpoints."""

    detail: str


_ERROR_SCHEMA = ErrorBody.model_json_schema()


def error_responses(*errors: type[ApiError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given errors (one per status, descriptions
    joined). The JSON content is spelled out rather than given as ``model``: FastAPI would file
    a model under the route's own media type, text/plain for the CSV endpoints."""
    responses: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        entry = responses.setdefault(
            error.status_code,
            {
                "description": error.default_message,
                "content": {"application/json": {"schema": _ERROR_SCHEMA}},
            },
        )
        if error.default_message not in entry["description"]:
            entry["description"] += f"; or: {error.default_message}"
    return responses


# FastAPI answers a body that is not JSON at all with 400 before any route code runs.
MALFORMED_BODY: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "the body is not valid JSON",
        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
    }
}


# Every route with a body: larger than its cap is refused unread (api/guard.py).
BODY_TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {
        "description": "the body is larger than this endpoint accepts",
        "content": {"application/json": {"schema": _ERROR_SCHEMA}},
    }
}


def render(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _render(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)  # registered for ApiError only
    return render(exc)


def echo(value: Any, depth: int = 0) -> Any:
    """What a 422 may repeat of the caller's ``value``: JSON-ready, bounded in size and cost.

    Strings are cut to :data:`ECHO_LIMIT` characters, containers to a few items and levels;
    numbers that JSON cannot carry (inf, a Decimal, a huge int) become short text without
    being converted: ``int(Decimal("1e999999999"))`` is what froze the API (issue 12)."""
    if value is None or isinstance(value, bool | str):
        return clip(value) if isinstance(value, str) else value
    if isinstance(value, int):
        return value if value.bit_length() <= 64 else f"<{value.bit_length()}-bit integer>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        if value.is_finite() and -_DECIMAL_EXPONENT <= value.adjusted() <= _DECIMAL_EXPONENT:
            return int(value) if value.as_tuple().exponent >= 0 else float(value)  # type: ignore[operator]
        return clip(str(value))  # scientific notation: never expanded to its digits
    if isinstance(value, bytes | bytearray):
        return clip(bytes(value[: ECHO_LIMIT * 4]).decode("utf-8", "replace"))
    if isinstance(value, Mapping | list | tuple):
        if depth >= _ECHO_DEPTH:
            return "…"
        if isinstance(value, Mapping):
            pairs = list(value.items())[:_ECHO_ITEMS]
            shown = {clip(str(key)): echo(item, depth + 1) for key, item in pairs}
            return shown | ({"…": "…"} if len(value) > _ECHO_ITEMS else {})
        items = [echo(item, depth + 1) for item in value[:_ECHO_ITEMS]]
        return items + (["…"] if len(value) > _ECHO_ITEMS else [])
    return clip(str(value))


def _loc_part(part: Any) -> str | int:
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    return clip(str(part))  # an extra field's name is the caller's text too


async def _render_validation(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 ``{"detail": [{"loc", "msg", "type", "input", "ctx"}]}``, with every
    part that repeats the caller bounded (:func:`echo`) instead of encoded whole."""
    assert isinstance(exc, RequestValidationError)
    detail: list[dict[str, Any]] = []
    for error in exc.errors()[:_ECHO_ITEMS]:
        item: dict[str, Any] = {
            "type": clip(str(error.get("type", "value_error"))),
            "loc": [_loc_part(part) for part in list(error.get("loc", ()))[:_ECHO_ITEMS]],
            "msg": clip(str(error.get("msg", "")), MESSAGE_LIMIT),
        }
        if "input" in error:
            item["input"] = echo(error["input"])
        ctx = error.get("ctx")
        if isinstance(ctx, Mapping):
            item["ctx"] = {clip(str(k)): _ctx_value(v) for k, v in list(ctx.items())[:_ECHO_ITEMS]}
        detail.append(item)
    return JSONResponse({"detail": detail}, status_code=422)


def _ctx_value(value: Any) -> Any:
    # ctx holds the rule (a bound, a pattern) or the validator's exception: text for the latter.
    if isinstance(value, bool | int | float | str | Decimal):
        return echo(value)
    return clip(str(value), MESSAGE_LIMIT)


def install_error_handler(app: FastAPI) -> None:
    """Render every :class:`ApiError` as JSON with its status and headers, and FastAPI's
    validation errors with what they repeat of the request cut short."""
    app.add_exception_handler(ApiError, _render)
    app.add_exception_handler(RequestValidationError, _render_validation)


# --- the signed-session profile (docs/PROFILES.md, "signed_session")


class ProductNotFound(ApiError):
    status_code = 404
    default_message = "product not found"


class ProductExists(ApiError):
    status_code = 409
    default_message = "a product with this productKey already exists"


class ProductHasDevices(ApiError):
    status_code = 409
    default_message = "the product still has devices: delete them first"


class RegisteredDeviceNotFound(ApiError):
    status_code = 404
    default_message = "no device with this deviceKey in this product"


class DeviceKeyExists(ApiError):
    status_code = 409
    default_message = "a device with this deviceKey already exists in this product"


class BadAuthMessage(ApiError):
    """An auth message that is not ``{"secureMode": 2, "lifetime": 30..86400, "sign": hex}``:
    4.00 on the CoAP side."""

    status_code = 400
    default_message = "malformed auth message"


class AuthRefused(DeviceUnauthorized):
    """Unknown product or device, a sign that does not verify, or a replay: 4.01."""

    default_message = "authentication failed"


class NoSession(DeviceUnauthorized):
    """A message outside a live session of the device, or from another address: 4.01 (the
    device authenticates again)."""

    default_message = "no live session for this device from this address: authenticate first"


# --- payload templates (issue 17; docs/API.md, "Payload templates")


class TemplateNotFound(ApiError):
    status_code = 404
    default_message = "template not found"


class InvalidTemplate(ApiError):
    """A template that does not compile (``policies.templates.TemplateError``): the message
    says what is wrong, ``where`` names the place (``sense[1].value.type``)."""

    status_code = 422
    default_message = "invalid template"

    def __init__(self, message: str | None = None, where: str = "") -> None:
        super().__init__(message)
        self.where = clip(where, MESSAGE_LIMIT)

    def body(self) -> Any:
        return {"detail": self.message, "where": self.where}


class TemplateInUse(ApiError):
    """A template some device is assigned: deleting it would leave that device's messages
    published raw (docs/API.md)."""

    status_code = 409
    default_message = "the template is assigned to devices: assign them another first"

    def __init__(self, message: str | None = None, devices: list[str] | None = None) -> None:
        super().__init__(message)
        self.devices = list(devices or [])

    def body(self) -> Any:
        return {"detail": self.message, "devices": self.devices}


class UnknownTemplate(InvalidField):
    """A device assigned a template id that names no template."""

    default_message = "no template with this id"
    location = ("body", "template")


class UntranslatablePayload(ApiError):
    """A payload its device's template cannot translate (too short, a string that is not
    UTF-8): 400 → 4.00, nothing published."""

    status_code = 400
    default_message = "the payload does not fit its device's template"


class PayloadNotTranslated(ApiError):
    """``POST /templates/{id}/test``: the payload does not fit the template."""

    status_code = 422
    default_message = "the payload does not fit the template"


class TemplateStoreUnavailable(StoreUnavailable):
    default_message = "template store unavailable"
