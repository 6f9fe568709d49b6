"""HTTP → CoAP status translation rules (RFC 7252 §10.1, docs/CONTRACT.md §10).

The table is data in RFC notation: :data:`HTTP_TO_COAP` holds every row — the
method-dependent ones and the class fallbacks included — with CoAP response codes as ``"c.dd"``
text and CoAP methods by name. The proxy compiles it into code numbers once at start-up, one
list index per answer (proxy/forward.py, ``StatusTable``; the numbers are proxy/coap/codes.py).
"""

from __future__ import annotations

import re

# CoAP request methods by name (RFC 7252 §12.1.1, RFC 8132 §6), as rows and route policies
# name them.
METHODS = ("GET", "POST", "PUT", "DELETE", "FETCH", "PATCH", "iPATCH")
ANY = "*"

# A response code in RFC 7252 §12.1.2 notation: class 2, 4 or 5, a two-digit detail 00-31.
_RESPONSE_CODE = re.compile(r"[245]\.(?:[0-2][0-9]|3[01])")


def is_response_code(text: str) -> bool:
    """``"2.05"`` yes; ``"2.5"``, ``"3.00"``, ``"0.01"`` (a method), ``"4.32"`` no."""
    return _RESPONSE_CODE.fullmatch(text) is not None


# The table (docs/CONTRACT.md §10; RFC 7252 §10.1 and RFC 8075 §7 for the 2.xx rows): (HTTP
# status or status class "2xx", CoAP method name or ANY) → CoAP code. Every method-dependent row
# is a row here, not code around the table. A lookup takes the first of: (status, method),
# (status, ANY), (class, method), (class, ANY); anything the table does not name — 1xx, 3xx
# other than 304, a status outside 100-599 — is 5.02: the origin answered something a CoAP
# client cannot act on.
HTTP_TO_COAP: dict[tuple[int | str, str], str] = {
    # A successful GET or FETCH returns a representation, possibly empty: 2.05 Content.
    # 2.04 Changed would claim a resource changed, which a safe method never does.
    ("2xx", "GET"): "2.05",
    ("2xx", "FETCH"): "2.05",
    ("2xx", "POST"): "2.04",
    ("2xx", "PUT"): "2.04",
    ("2xx", "PATCH"): "2.04",
    ("2xx", "iPATCH"): "2.04",
    # RFC 7252 §5.9.1.2: 2.02 Deleted answers DELETE, whatever success code the origin chose
    # (200 with a body, 202 accepted, 204).
    ("2xx", "DELETE"): "2.02",
    # RFC 7252 §5.9.1.1: 2.01 Created answers POST and PUT only.
    (201, "POST"): "2.01",
    (201, "PUT"): "2.01",
    # RFC 7252 §5.9.1.3: 2.03 Valid validates a cached representation (a conditional GET or
    # FETCH); a 304 to any other method is not something a CoAP client can act on.
    (304, "GET"): "2.03",
    (304, "FETCH"): "2.03",
    (400, ANY): "4.00",
    (401, ANY): "4.01",
    (403, ANY): "4.03",
    (404, ANY): "4.04",
    (405, ANY): "4.05",
    (406, ANY): "4.06",
    (412, ANY): "4.12",
    (413, ANY): "4.13",
    (415, ANY): "4.15",
    (429, ANY): "4.29",
    ("4xx", ANY): "4.00",
    (500, ANY): "5.00",
    (501, ANY): "5.01",
    (502, ANY): "5.02",
    (503, ANY): "5.03",
    (504, ANY): "5.04",
    ("5xx", ANY): "5.00",
}
UNMAPPED = "5.02"


Rows = dict[tuple[int | str, str], str]


def find(table: Rows, http_status: int, method: str) -> str | None:
    """One cell of ``table`` by the lookup order above; None when no row names it."""
    cls = f"{http_status // 100}xx"
    for key in ((http_status, method), (http_status, ANY), (cls, method), (cls, ANY)):
        found = table.get(key)
        if found is not None:
            return found
    return None


def lookup(table: Rows, http_status: int, method: str) -> str:
    """One cell of ``table`` by the lookup order above (the readable form of the rule)."""
    found = find(table, http_status, method)
    return UNMAPPED if found is None else found


def lookup_with(overrides: Rows, table: Rows, http_status: int, method: str) -> str:
    """A route's cell: its own rows first, as a whole (so its ``("2xx", ANY)`` beats the
    default ``(201, "POST")``), then the table's."""
    found = find(overrides, http_status, method)
    return lookup(table, http_status, method) if found is None else found
