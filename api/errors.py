"""Project errors of the HTTP backend, each knowing how it is rendered over HTTP.

Library exceptions (redis, aiomqtt) are translated into these at the module that wraps the
library, so routes and the single exception handler only ever see this hierarchy. Every error
renders as JSON ``{"detail": "<message>"}`` — the shape FastAPI itself uses for
``HTTPException`` — so a client parses one body shape for all failures; a 422 for one field
(:class:`InvalidField`) takes the shape of FastAPI's own validation errors instead, so a 422 is
always ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ApiError(Exception):
    """Base of every error the backend reports to its caller."""

    status_code: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
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
    default_message = "a device with this iccid already exists"


class IpInUse(ApiError):
    status_code = 409
    default_message = "another device already has this ip"


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


class BrokerUnavailable(ApiError):
    """No PUBACK: the broker is down or slow. 503 becomes 5.03 so the device retries (SPEC §8)."""

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
    """The caller lacks the proxy token, so it may not speak for a device (SPEC §10)."""

    status_code = 403
    default_message = "missing or invalid proxy token"


class BadForwarded(ApiError):
    status_code = 400
    default_message = "missing or unparseable Forwarded header"


class InvalidTopic(ApiError):
    status_code = 400
    default_message = "invalid topic"


class DeviceUnauthorized(ApiError):
    """Unknown or non-active device: 4.01 on the CoAP side (SPEC §2)."""

    status_code = 401
    default_message = "unknown or inactive device"


class TermsNotAccepted(DeviceUnauthorized):
    """HTTPS onboarding for a device whose owner has not accepted the terms (SPEC §7)."""

    default_message = "the device owner has not accepted the terms of use"


class PayloadTooLarge(ApiError):
    status_code = 413
    default_message = "payload too large"


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


async def _render(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)  # registered for ApiError only
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def install_error_handler(app: FastAPI) -> None:
    """Render every :class:`ApiError` as JSON with its status and headers."""
    app.add_exception_handler(ApiError, _render)
