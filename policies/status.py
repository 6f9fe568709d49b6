"""HTTP → CoAP status translation (SPEC §9: RFC 7252 §10.1, Californium proxy2's table).

The table is data: :data:`HTTP_TO_COAP` lists each explicit row, :func:`coap_code_for` adds the
class fallbacks and the method-dependent 2.xx rows.
"""

from __future__ import annotations


def code(cls: int, detail: int) -> int:
    """The 8-bit CoAP code ``c.dd`` (RFC 7252 §3)."""
    return (cls << 5) | detail


def code_text(value: int) -> str:
    """``"2.05"`` for 69."""
    return f"{value >> 5}.{value & 0x1F:02d}"


EMPTY = 0
GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH = 1, 2, 3, 4, 5, 6, 7
METHOD_NAMES = {
    GET: "GET",
    POST: "POST",
    PUT: "PUT",
    DELETE: "DELETE",
    FETCH: "FETCH",
    PATCH: "PATCH",
    IPATCH: "iPATCH",
}

CREATED = code(2, 1)
DELETED = code(2, 2)
VALID = code(2, 3)
CHANGED = code(2, 4)
CONTENT = code(2, 5)
BAD_REQUEST = code(4, 0)
UNAUTHORIZED = code(4, 1)
BAD_OPTION = code(4, 2)
FORBIDDEN = code(4, 3)
NOT_FOUND = code(4, 4)
METHOD_NOT_ALLOWED = code(4, 5)
NOT_ACCEPTABLE = code(4, 6)
PRECONDITION_FAILED = code(4, 12)
REQUEST_ENTITY_TOO_LARGE = code(4, 13)
UNSUPPORTED_CONTENT_FORMAT = code(4, 15)
TOO_MANY_REQUESTS = code(4, 29)
INTERNAL_SERVER_ERROR = code(5, 0)
NOT_IMPLEMENTED = code(5, 1)
BAD_GATEWAY = code(5, 2)
SERVICE_UNAVAILABLE = code(5, 3)
GATEWAY_TIMEOUT = code(5, 4)
PROXYING_NOT_SUPPORTED = code(5, 5)

# Explicit rows. 200 and 204 depend on the request method and are resolved below.
HTTP_TO_COAP: dict[int, int] = {
    201: CREATED,
    304: VALID,
    400: BAD_REQUEST,
    401: UNAUTHORIZED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    406: NOT_ACCEPTABLE,
    412: PRECONDITION_FAILED,
    413: REQUEST_ENTITY_TOO_LARGE,
    415: UNSUPPORTED_CONTENT_FORMAT,
    429: TOO_MANY_REQUESTS,
    500: INTERNAL_SERVER_ERROR,
    501: NOT_IMPLEMENTED,
    502: BAD_GATEWAY,
    503: SERVICE_UNAVAILABLE,
    504: GATEWAY_TIMEOUT,
}


def coap_code_for(http_status: int, method: int) -> int:
    """The CoAP response code for an HTTP status answering a request with CoAP ``method``."""
    if http_status == 200:
        return CHANGED if method in (POST, PUT) else CONTENT
    if http_status == 204:
        return DELETED if method == DELETE else CHANGED
    explicit = HTTP_TO_COAP.get(http_status)
    if explicit is not None:
        return explicit
    if 200 <= http_status < 300:
        return CHANGED if method in (POST, PUT) else CONTENT
    if 400 <= http_status < 500:
        return BAD_REQUEST
    if 500 <= http_status < 600:
        return INTERNAL_SERVER_ERROR
    # 1xx, other 3xx, anything outside the registry: the upstream answered something a CoAP
    # client cannot act on.
    return BAD_GATEWAY
