"""Option numbers and formats (RFC 7252 §5.10, RFC 7959, RFC 7641, RFC 7967, RFC 9175).

:data:`FORMATS` is the one table of what each option's value may look like: its length range
(RFC 7252 §5.4.3), whether it may occur more than once (§5.4.5) and its value format (§3.2).
The request interpretation (:func:`proxy.coap.requests.interpret`) enforces it, through
:data:`REQUEST_RULES`, for every option this server reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IF_MATCH = 1
URI_HOST = 3
ETAG = 4
IF_NONE_MATCH = 5
OBSERVE = 6
URI_PORT = 7
LOCATION_PATH = 8
URI_PATH = 11
CONTENT_FORMAT = 12
MAX_AGE = 14
URI_QUERY = 15
ACCEPT = 17
LOCATION_QUERY = 20
BLOCK2 = 23
BLOCK1 = 27
SIZE2 = 28
PROXY_URI = 35
PROXY_SCHEME = 39
SIZE1 = 60
ECHO = 252
NO_RESPONSE = 258
REQUEST_TAG = 292

# RFC 7252 §3.2 option value formats.
Format = Literal["empty", "opaque", "uint", "string"]


@dataclass(frozen=True, slots=True)
class OptionFormat:
    number: int
    name: str
    min_length: int
    max_length: int
    repeatable: bool
    format: Format


# RFC 7252 §5.10 Table 4, RFC 7959 §2.1 and §4, RFC 7641 §2, RFC 7967 §2, RFC 9175 §2.2/§3.2.
FORMATS: dict[int, OptionFormat] = {
    row.number: row
    for row in (
        OptionFormat(IF_MATCH, "If-Match", 0, 8, True, "opaque"),
        OptionFormat(URI_HOST, "Uri-Host", 1, 255, False, "string"),
        OptionFormat(ETAG, "ETag", 1, 8, True, "opaque"),
        OptionFormat(IF_NONE_MATCH, "If-None-Match", 0, 0, False, "empty"),
        OptionFormat(OBSERVE, "Observe", 0, 3, False, "uint"),
        OptionFormat(URI_PORT, "Uri-Port", 0, 2, False, "uint"),
        OptionFormat(LOCATION_PATH, "Location-Path", 0, 255, True, "string"),
        OptionFormat(URI_PATH, "Uri-Path", 0, 255, True, "string"),
        OptionFormat(CONTENT_FORMAT, "Content-Format", 0, 2, False, "uint"),
        OptionFormat(MAX_AGE, "Max-Age", 0, 4, False, "uint"),
        OptionFormat(URI_QUERY, "Uri-Query", 0, 255, True, "string"),
        OptionFormat(ACCEPT, "Accept", 0, 2, False, "uint"),
        OptionFormat(LOCATION_QUERY, "Location-Query", 0, 255, True, "string"),
        OptionFormat(BLOCK2, "Block2", 0, 3, False, "uint"),
        OptionFormat(BLOCK1, "Block1", 0, 3, False, "uint"),
        OptionFormat(SIZE2, "Size2", 0, 4, False, "uint"),
        OptionFormat(PROXY_URI, "Proxy-Uri", 1, 1034, False, "string"),
        OptionFormat(PROXY_SCHEME, "Proxy-Scheme", 1, 255, False, "string"),
        OptionFormat(SIZE1, "Size1", 0, 4, False, "uint"),
        OptionFormat(ECHO, "Echo", 1, 40, False, "opaque"),
        OptionFormat(NO_RESPONSE, "No-Response", 0, 1, False, "uint"),
        OptionFormat(REQUEST_TAG, "Request-Tag", 0, 8, True, "opaque"),
    )
}

# Critical options (odd numbers, §5.4.1) this server understands. Any other critical option in
# a request is answered 4.02 Bad Option. If-Match and If-None-Match are forwarded as HTTP
# preconditions (proxy/forward.py; §5.10.8, RFC 9110 §13.1), never dropped.
UNDERSTOOD_CRITICAL = frozenset(
    {
        IF_MATCH,
        IF_NONE_MATCH,
        URI_HOST,
        URI_PORT,
        URI_PATH,
        URI_QUERY,
        ACCEPT,
        BLOCK2,
        BLOCK1,
        PROXY_URI,
        PROXY_SCHEME,
    }
)

# Elective options whose value a request is read for. Every other elective option is ignored
# (§5.4.1), so its length or repetition cannot matter.
# Size1, Size2 and Request-Tag are read by the block-wise layer (proxy/coap/blockwise.py;
# RFC 7959 §4, RFC 9175 §3).
# ETag is read by the forwarder: validation of a GET (§5.10.6.2).
UNDERSTOOD_ELECTIVE = frozenset({ETAG, CONTENT_FORMAT, SIZE1, SIZE2, REQUEST_TAG})

# number → (valid value lengths, repeatable) for the options a request is read by: an
# occurrence outside the length range (§5.4.3) or a second occurrence of a non-repeatable
# option (§5.4.5) is treated like an unrecognized option (critical → 4.02, elective → ignored).
REQUEST_RULES: dict[int, tuple[range, bool]] = {
    number: (range(row.min_length, row.max_length + 1), row.repeatable)
    for number, row in FORMATS.items()
    if number in UNDERSTOOD_CRITICAL or number in UNDERSTOOD_ELECTIVE
}


def is_critical(number: int) -> bool:
    return bool(number & 1)
