"""Option numbers (RFC 7252 §5.10, RFC 7959, RFC 7641, RFC 7967, RFC 9175)."""

from __future__ import annotations

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

# Critical options (odd numbers, §5.4.1) this server understands. Any other critical option in
# a request is answered 4.02 Bad Option; unknown elective options are ignored.
UNDERSTOOD_CRITICAL = frozenset(
    {
        IF_MATCH,
        URI_HOST,
        IF_NONE_MATCH,
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


def is_critical(number: int) -> bool:
    return bool(number & 1)
