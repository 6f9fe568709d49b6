"""Project errors of the HTTP backend, each knowing how it is rendered over HTTP.

Library exceptions (redis, aiomqtt) are translated into these at the module that wraps the
library, so routes and the single exception handler only ever see this hierarchy. Every error
renders as JSON ``{"detail": "<message>"}`` — the shape FastAPI itself uses for
``HTTPException`` — so a client parses one body shape for all failures.
"""

from __future__ import annotations

from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


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


class PayloadTooLarge(ApiError):
    status_code = 413
    default_message = "payload too large"


async def _render(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)  # registered for ApiError only
    return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=exc.headers)


def install_error_handler(app: FastAPI) -> None:
    """Render every :class:`ApiError` as JSON with its status and headers."""
    app.add_exception_handler(ApiError, _render)
