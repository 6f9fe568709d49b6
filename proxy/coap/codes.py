"""CoAP method and response code numbers (RFC 7252 §3, §12.1; RFC 8132 §6; RFC 7959 §2.9).

The numbers the codec and the messaging layer put on the wire. The HTTP → CoAP translation
rules name the same codes in RFC notation ("2.05", "GET") in policies/status.py; the proxy
compiles those into these numbers once at start-up (proxy/forward.py, ``StatusTable``).
"""

from __future__ import annotations


def code(cls: int, detail: int) -> int:
    """The 8-bit CoAP code ``c.dd`` (RFC 7252 §3)."""
    return (cls << 5) | detail


def code_text(value: int) -> str:
    """``"2.05"`` for 69."""
    return f"{value >> 5}.{value & 0x1F:02d}"


def parse_code_text(text: str) -> int | None:
    """69 for ``"2.05"``; None unless it is a response code ``c.dd`` of class 2, 4 or 5
    (RFC 7252 §12.1.2)."""
    cls, dot, detail = text.partition(".")
    if not dot or len(cls) != 1 or len(detail) != 2 or not (cls + detail).isdigit():
        return None
    if int(cls) not in (2, 4, 5) or int(detail) > 31:
        return None
    return code(int(cls), int(detail))


EMPTY = 0
# Request methods, class 0 (RFC 7252 §12.1.1, RFC 8132 §6 for FETCH, PATCH and iPATCH).
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
# The method name of every 8-bit code, "" for all but the methods above: what the route
# policy (policies/routes.py) is asked with, by one tuple index per request.
METHOD_NAME_OF: tuple[str, ...] = tuple(METHOD_NAMES.get(number, "") for number in range(256))

# Response codes (RFC 7252 §12.1.2, RFC 7959 §2.9, RFC 8516 §3).
CREATED = code(2, 1)
DELETED = code(2, 2)
VALID = code(2, 3)
CHANGED = code(2, 4)
CONTENT = code(2, 5)
CONTINUE = code(2, 31)
BAD_REQUEST = code(4, 0)
UNAUTHORIZED = code(4, 1)
BAD_OPTION = code(4, 2)
FORBIDDEN = code(4, 3)
NOT_FOUND = code(4, 4)
METHOD_NOT_ALLOWED = code(4, 5)
NOT_ACCEPTABLE = code(4, 6)
REQUEST_ENTITY_INCOMPLETE = code(4, 8)
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
