"""``GET /onboarding/coap``: HTTPS onboarding (docs/CONTRACT.md §8, issue #6).

A device (not the proxy) calls it directly over HTTPS and is identified by its source address:
the TCP peer, or — when the peer is one of ``trusted_proxy_networks`` — the address that
``X-Forwarded-For`` names (walking it from the right past trusted hops). It gets the same key
as CoAP ``/bootstrap`` would hand out: both go through ``api.psk_lifecycle.hand_out_psk``.

Answers (all of them documented in the OpenAPI schema, with examples):

- ``Accept``: ``application/json`` (also ``*/*``, ``application/*`` and no header) →
  ``{"clientIdentity": ..., "preSharedKey": ...}``; ``text/csv`` (or ``text/*``) →
  ``clientIdentity,preSharedKey``; anything else → 406. Highest q wins, JSON on a tie.
- ``Range`` (RFC 9110 §14, see :mod:`api.byte_ranges`): one range → 206 with
  ``Content-Range``; unsatisfiable → 416 with ``Content-Range: bytes */len``; malformed or
  several ranges → ignored, 200; ``If-Range`` → the full body (we have no validators to match).
- Errors: ``{"statusText": ..., "errors": [{"code": ..., "message": ...}]}`` —
  401 ``UnauthorizedResponse`` (unknown / inactive device, or terms not accepted),
  406 / 416 / 429, 503 and 500 ``ServerSideErrorResponse``.

Deployment note: uvicorn rewrites the client address from ``X-Forwarded-For`` by itself for
peers in its ``forwarded_allow_ips`` (127.0.0.1 by default). Serve this app with
``proxy_headers=False`` so ``trusted_proxy_networks`` is the only trust decision.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.byte_ranges import ByteRange, Unsatisfiable, parse_range
from api.deps import NowDep, SettingsDep, StoreDep
from api.errors import (
    ApiError,
    BootstrapRateLimited,
    DeviceUnauthorized,
    StoreUnavailable,
    TermsNotAccepted,
)
from api.psk_lifecycle import hand_out_psk
from api.safe_json import SafeJsonRoute

log = logging.getLogger(__name__)

router = APIRouter(tags=["onboarding"], route_class=SafeJsonRoute)

Format = Literal["application/json", "text/csv"]
JSON: Format = "application/json"
CSV: Format = "text/csv"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- response models (docs/CONTRACT.md §8) -------------------------------------------


class OnboardingCredentials(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"clientIdentity": "8988280666000000001", "preSharedKey": "aB3dEf7hIjKlMnOp"}
            ]
        }
    )

    clientIdentity: str = Field(description="The ICCID of the device's SIM (the PSK identity)")
    preSharedKey: str = Field(description="The pre-shared key for DTLS")


class ErrorItem(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. TERMS_NOT_ACCEPTED")
    message: str = Field(description="Human-readable explanation")


class _ErrorResponse(BaseModel):
    statusText: str = Field(description="HTTP status text")
    errors: list[ErrorItem] = Field(description="Detailed error information")


class UnauthorizedResponse(_ErrorResponse):
    """401: the device is unknown or inactive, or its owner has not accepted the terms."""


class ServerSideErrorResponse(_ErrorResponse):
    """5xx: the server could not answer; retry later."""


class ClientErrorResponse(_ErrorResponse):
    """406, 416 or 429: the request cannot be answered as asked."""


def _status_text(status: int) -> str:
    # RFC 9110 §15.5.17 renamed 416; Python's table still has the RFC 7233 phrase.
    return "Range Not Satisfiable" if status == 416 else HTTPStatus(status).phrase


def _problem(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"statusText": _status_text(status), "errors": [{"code": code, "message": message}]}
    return JSONResponse(body, status_code=status, headers={**_ALWAYS, **(headers or {})})


def _problem_for(exc: ApiError) -> JSONResponse:
    if isinstance(exc, TermsNotAccepted):
        return _problem(401, "TERMS_NOT_ACCEPTED", exc.message)
    if isinstance(exc, DeviceUnauthorized):
        return _problem(401, "UNKNOWN_DEVICE", exc.message)
    if isinstance(exc, BootstrapRateLimited):
        return _problem(429, "TOO_MANY_REQUESTS", exc.message, exc.headers)
    if isinstance(exc, StoreUnavailable):
        return _problem(503, "SERVICE_UNAVAILABLE", "device store unavailable", exc.headers)
    return _problem(exc.status_code, HTTPStatus(exc.status_code).name, exc.message, exc.headers)


# A PSK must not linger in a cache; the answer depends on Accept.
_ALWAYS = {"Cache-Control": "no-store", "Vary": "Accept"}


# --- content negotiation (RFC 9110 §12.5.1) --------------------------------------------------


def _specificity(media_range: str, candidate: str) -> int:
    """3 exact, 2 ``type/*``, 1 ``*/*``, 0 no match."""
    if media_range == candidate:
        return 3
    kind, _, subtype = media_range.partition("/")
    if subtype == "*" and kind == candidate.partition("/")[0]:
        return 2
    return 1 if media_range == "*/*" else 0


def negotiate(accept: str | None) -> Format | None:
    """The format to answer in; ``None`` → 406. Each candidate takes the q of its most specific
    matching media range; the highest q > 0 wins, JSON (the default) on a tie."""
    if accept is None or not accept.strip():
        return JSON
    ranges: list[tuple[str, float]] = []
    for element in accept.split(","):
        media_range, *params = (part.strip() for part in element.split(";"))
        if not media_range:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        ranges.append((media_range.lower(), q))
    best: tuple[float, Format] | None = None
    for candidate in (JSON, CSV):
        matches = [(_specificity(r, candidate), q) for r, q in ranges]
        specificity, q = max(matches, default=(0, 0.0))
        if specificity and q > 0 and (best is None or q > best[0]):
            best = (q, candidate)
    return best[1] if best else None


# --- who is calling --------------------------------------------------------------------------


def _hop_address(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One ``X-Forwarded-For`` element: ``ip``, ``ip:port``, ``[v6]`` or ``[v6]:port``."""
    hop = hop.strip().strip('"')
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def source_address(request: Request, trusted: list[Network]) -> str | None:
    """The device's address: the TCP peer unless that peer is a trusted proxy, then the
    rightmost ``X-Forwarded-For`` hop that is not itself trusted. ``None``: unusable."""
    peer = _hop_address(request.client.host) if request.client else None
    if peer is None:
        return None
    if not any(peer in network for network in trusted):
        return str(peer)
    hops = [hop for value in request.headers.getlist("x-forwarded-for") for hop in value.split(",")]
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            return None  # a trusted proxy passed on garbage: nobody can be named
        if not any(address in network for network in trusted):
            return str(address)
        peer = address
    return str(peer)


# --- the endpoint ----------------------------------------------------------------------------

_ERROR_EXAMPLE_UNKNOWN = {
    "statusText": "Unauthorized",
    "errors": [{"code": "UNKNOWN_DEVICE", "message": "unknown or inactive device"}],
}
_ERROR_EXAMPLE_TERMS = {
    "statusText": "Unauthorized",
    "errors": [
        {
            "code": "TERMS_NOT_ACCEPTED",
            "message": "the device owner has not accepted the terms of use",
        }
    ],
}
# The documented form of one range (what the parameter's schema states; other values are
# accepted and ignored, see api.byte_ranges).
RANGE_PATTERN = r"^ *[Bb][Yy][Tt][Ee][Ss]= *([0-9]{1,6}-[0-9]{0,6}|-[0-9]{1,6}) *$"

_RANGE_HEADERS = {
    "Content-Range": {
        "description": "`bytes first-last/length` of the slice sent",
        "schema": {"type": "string"},
    },
    "Accept-Ranges": {"description": "always `bytes`", "schema": {"type": "string"}},
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The device's credentials (the whole body)",
        "headers": {"Accept-Ranges": _RANGE_HEADERS["Accept-Ranges"]},
        "content": {
            JSON: {
                "schema": OnboardingCredentials.model_json_schema(),
                "example": {
                    "clientIdentity": "8988280666000000001",
                    "preSharedKey": "aB3dEf7hIjKlMnOp",
                },
            },
            CSV: {
                "schema": {"type": "string"},
                "example": "8988280666000000001,aB3dEf7hIjKlMnOp",
            },
        },
    },
    206: {
        "description": "One byte range of the 200 body (`Range: bytes=a-b`, `a-` or `-n`)",
        "headers": _RANGE_HEADERS,
        "content": {
            # Any bytes: a slice of a JSON document is not JSON itself (unless it is all of it).
            JSON: {"schema": {}, "example": '{"clientI'},
            CSV: {"schema": {"type": "string"}, "example": "89882806"},
        },
    },
    401: {
        "model": UnauthorizedResponse,
        "description": "Unknown or inactive device, or the owner has not accepted the terms",
        "content": {
            JSON: {
                "examples": {
                    "unknown device": {"value": _ERROR_EXAMPLE_UNKNOWN},
                    "terms not accepted": {"value": _ERROR_EXAMPLE_TERMS},
                }
            }
        },
    },
    406: {"model": ClientErrorResponse, "description": "Accept names neither JSON nor CSV"},
    416: {
        "model": ClientErrorResponse,
        "description": "The range lies outside the body; `Content-Range: bytes */length`",
        "headers": {"Content-Range": _RANGE_HEADERS["Content-Range"]},
    },
    429: {
        "model": ClientErrorResponse,
        "description": "Too many bootstrap/onboarding calls from this device; see Retry-After",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
    500: {
        "model": ServerSideErrorResponse,
        "description": "Internal server error",
        "content": {
            JSON: {
                "example": {
                    "statusText": "Internal Server Error",
                    "errors": [{"code": "INTERNAL_ERROR", "message": "internal error"}],
                }
            }
        },
    },
    503: {
        "model": ServerSideErrorResponse,
        "description": "The device store is unavailable; see Retry-After",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
}


@router.get(
    "/onboarding/coap",
    summary="DTLS credentials for the calling device (HTTPS onboarding)",
    description=(
        "Identifies the device by its source address (behind a trusted reverse proxy: by "
        "`X-Forwarded-For`). `Accept: application/json` (default) → "
        '`{"clientIdentity": ..., "preSharedKey": ...}`; `Accept: text/csv` → '
        "`clientIdentity,preSharedKey`; other → 406. Supports one byte range per request "
        "(`Range: bytes=a-b`, `a-`, `-n`; several ranges or a malformed header → the whole "
        "body with 200).\n\n"
        "Same key rules as CoAP `GET /bootstrap`, and the same key: no key → generated; a "
        "user-set key never changes; a generated key is regenerated 5 minutes or more after "
        "the previous bootstrap/onboarding call. Rate limited per device (429)."
    ),
    responses=RESPONSES,
    response_class=Response,
)
async def onboarding(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    now: NowDep,
    range_header: Annotated[
        str | None,
        Header(
            alias="Range",
            description=(
                "One byte range, RFC 9110 §14: `bytes=0-7`, `bytes=8-`, `bytes=-8`. A header "
                "that does not match this form, or names several ranges, is ignored (200)."
            ),
            json_schema_extra={"pattern": RANGE_PATTERN},
            openapi_examples={
                "first 8 bytes": {"value": "bytes=0-7"},
                "from byte 8 to the end": {"value": "bytes=8-"},
                "last 8 bytes": {"value": "bytes=-8"},
                "past the end (416)": {"value": "bytes=1000-"},
            },
        ),
    ] = None,
) -> Response:
    try:
        media_type = negotiate(request.headers.get("accept"))
        if media_type is None:
            return _problem(
                406, "NOT_ACCEPTABLE", "acceptable formats are application/json and text/csv"
            )
        address = source_address(request, settings.trusted_networks)
        device = await store.get_by_ip(address) if address else None
        if device is None or not device.is_active:
            raise DeviceUnauthorized()
        if device.terms_accepted is not True:
            raise TermsNotAccepted()
        psk = await hand_out_psk(store, settings, device, now, require_terms=True)
    except ApiError as exc:
        return _problem_for(exc)
    except Exception:
        # The device is its source address here (docs/CONTRACT.md §8).
        who = request.client.host if request.client else "-"
        log.exception("onboarding failed for device %s", who, extra={"device": who})
        return _problem(500, "INTERNAL_ERROR", "internal error")
    if media_type == JSON:
        body = json.dumps(
            {"clientIdentity": device.id, "preSharedKey": psk}, separators=(",", ":")
        ).encode()
    else:
        body = f"{device.id},{psk}".encode()
    return _ranged(body, media_type, None if "if-range" in request.headers else range_header)


def _ranged(body: bytes, media_type: str, range_header: str | None) -> Response:
    content_type = f"{media_type}; charset=utf-8" if media_type == CSV else media_type
    headers = {**_ALWAYS, "Accept-Ranges": "bytes"}
    wanted = parse_range(range_header, len(body))
    if isinstance(wanted, Unsatisfiable):
        return _problem(
            416,
            "RANGE_NOT_SATISFIABLE",
            f"the body has {wanted.length} bytes",
            {"Content-Range": wanted.content_range},
        )
    if isinstance(wanted, ByteRange):
        headers["Content-Range"] = wanted.content_range
        return Response(wanted.slice(body), 206, headers, content_type)
    return Response(body, 200, headers, content_type)
