"""HTTP → CoAP status translation (RFC 7252 §10.1, docs/CONTRACT.md §10).

The table is data: :data:`HTTP_TO_COAP` holds every row — the method-dependent ones and the
class fallbacks included; :class:`StatusTable` compiles it into one list index per answer.
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

ANY = "*"

# The table (docs/CONTRACT.md §10; RFC 7252 §10.1 and RFC 8075 §7 for the 2.xx rows): (HTTP
# status or status class "2xx", CoAP method name or ANY) → CoAP code. Every method-dependent row
# is a row here, not code around the table. A lookup takes the first of: (status, method),
# (status, ANY), (class, method), (class, ANY); anything the table does not name — 1xx, 3xx
# other than 304, a status outside 100-599 — is 5.02: the origin answered something a CoAP
# client cannot act on.
HTTP_TO_COAP: dict[tuple[int | str, str], int] = {
    # A successful GET or FETCH returns a representation, possibly empty: 2.05 Content.
    # 2.04 Changed would claim a resource changed, which a safe method never does.
    ("2xx", "GET"): CONTENT,
    ("2xx", "FETCH"): CONTENT,
    ("2xx", "POST"): CHANGED,
    ("2xx", "PUT"): CHANGED,
    ("2xx", "PATCH"): CHANGED,
    ("2xx", "iPATCH"): CHANGED,
    # RFC 7252 §5.9.1.2: 2.02 Deleted answers DELETE, whatever success code the origin chose
    # (200 with a body, 202 accepted, 204).
    ("2xx", "DELETE"): DELETED,
    # RFC 7252 §5.9.1.1: 2.01 Created answers POST and PUT only.
    (201, "POST"): CREATED,
    (201, "PUT"): CREATED,
    # RFC 7252 §5.9.1.3: 2.03 Valid validates a cached representation (a conditional GET or
    # FETCH); a 304 to any other method is not something a CoAP client can act on.
    (304, "GET"): VALID,
    (304, "FETCH"): VALID,
    (400, ANY): BAD_REQUEST,
    (401, ANY): UNAUTHORIZED,
    (403, ANY): FORBIDDEN,
    (404, ANY): NOT_FOUND,
    (405, ANY): METHOD_NOT_ALLOWED,
    (406, ANY): NOT_ACCEPTABLE,
    (412, ANY): PRECONDITION_FAILED,
    (413, ANY): REQUEST_ENTITY_TOO_LARGE,
    (415, ANY): UNSUPPORTED_CONTENT_FORMAT,
    (429, ANY): TOO_MANY_REQUESTS,
    ("4xx", ANY): BAD_REQUEST,
    (500, ANY): INTERNAL_SERVER_ERROR,
    (501, ANY): NOT_IMPLEMENTED,
    (502, ANY): BAD_GATEWAY,
    (503, ANY): SERVICE_UNAVAILABLE,
    (504, ANY): GATEWAY_TIMEOUT,
    ("5xx", ANY): INTERNAL_SERVER_ERROR,
}
UNMAPPED = BAD_GATEWAY


Rows = dict[tuple[int | str, str], int]


def find(table: Rows, http_status: int, method: int) -> int | None:
    """One cell of ``table`` by the lookup order above; None when no row names it."""
    name = METHOD_NAMES.get(method, "")
    cls = f"{http_status // 100}xx"
    for key in ((http_status, name), (http_status, ANY), (cls, name), (cls, ANY)):
        found = table.get(key)
        if found is not None:
            return found
    return None


def lookup(table: Rows, http_status: int, method: int) -> int:
    """One cell of ``table`` by the lookup order above (the readable form of the rule)."""
    found = find(table, http_status, method)
    return UNMAPPED if found is None else found


def lookup_with(overrides: Rows, table: Rows, http_status: int, method: int) -> int:
    """A route's cell: its own rows first, as a whole (so its ``("2xx", ANY)`` beats the
    default ``(201, "POST")``), then the table's."""
    found = find(overrides, http_status, method)
    return lookup(table, http_status, method) if found is None else found


class StatusTable:
    """A table compiled for the hot path: one list index per answer.

    Built from :data:`HTTP_TO_COAP` by default; a profile may pass its own rows, and a route
    policy its ``overrides`` (docs/ARCHITECTURE.md), which win over every row of ``table``.
    """

    __slots__ = ("_cells", "overrides")

    def __init__(self, table: Rows = HTTP_TO_COAP, overrides: Rows | None = None) -> None:
        self.overrides: Rows = dict(overrides or {})
        self._cells = [
            lookup_with(self.overrides, table, http_status, method)
            for http_status in range(1000)
            for method in range(8)
        ]

    def code_for(self, http_status: int, method: int) -> int:
        if 0 <= http_status < 1000 and 0 <= method < 8:
            return self._cells[http_status * 8 + method]
        return UNMAPPED


DEFAULT_TABLE = StatusTable()


def coap_code_for(http_status: int, method: int) -> int:
    """The CoAP response code for an HTTP status answering a request with CoAP ``method``."""
    return DEFAULT_TABLE.code_for(http_status, method)
