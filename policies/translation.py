"""HTTP ↔ CoAP header translation rules, pure (RFC 7252 §5.10, §10.1; RFC 8075 §7; RFC 9110,
RFC 9111). The forwarder (proxy/forward.py) applies them; docs/ARCHITECTURE.md lists the rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urljoin, urlsplit

from policies.forwarding import http_origin

# The origin's response headers the translation reads: the upstream clients keep these (and
# Content-Type, Retry-After) and drop every other header while parsing (proxy/http1.py).
KEPT_HEADERS = frozenset(
    {"etag", "location", "cache-control", "expires", "date", "content-range", "accept-ranges"}
)

MAX_AGE_LIMIT = 0xFFFFFFFF  # a 4-byte uint (RFC 7252 §5.10.5)

# RFC 9110 §15.1 "heuristically cacheable" statuses: without explicit freshness HTTP still lets
# a cache keep these, so an absent Max-Age (CoAP's default of 60 s, RFC 7252 §5.10.5) says
# about as much. Any other status without freshness information must not be reused: Max-Age 0.
HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Cache-Control response directives after which a response must not be reused without
# revalidation (RFC 9111 §5.2.2.4, §5.2.2.5, §5.2.2.7): Max-Age 0.
NOT_REUSABLE = frozenset({"no-store", "no-cache", "private"})


def max_age(http_status: int, headers: Mapping[str, str], now: float) -> int | None:
    """The Max-Age for a cacheable CoAP response to this HTTP answer; None: leave it out.

    In order: ``Cache-Control`` no-store / no-cache / private → 0; the smaller of ``max-age``
    and ``s-maxage`` (RFC 9111 §5.2.2.1, §5.2.2.10); ``Expires`` minus ``Date`` (or minus
    ``now`` without a Date), an unparseable Expires being in the past (RFC 9111 §5.3); with no
    freshness information, 0 unless the status is heuristically cacheable (then None).
    """
    control = headers.get("cache-control")
    if control is not None:
        ages: list[int] = []
        for directive in control.split(","):
            name, _, value = directive.strip().partition("=")
            name = name.strip().lower()
            if name in NOT_REUSABLE:
                return 0
            if name in ("max-age", "s-maxage"):
                value = value.strip().strip('"')
                # RFC 9111 §1.2.2: an invalid delta-seconds is treated as stale.
                ages.append(min(int(value), MAX_AGE_LIMIT) if value.isdigit() else 0)
        if ages:
            return min(ages)
    expires = headers.get("expires")
    if expires is not None:
        end = _http_date(expires)
        if end is None:
            return 0
        start = _http_date(headers.get("date", "")) if "date" in headers else None
        return max(0, min(int(end - (now if start is None else start)), MAX_AGE_LIMIT))
    return None if http_status in HEURISTICALLY_CACHEABLE else 0


def max_age_from_retry_after(value: str | None) -> int | None:
    """``Retry-After`` in delta-seconds as Max-Age (RFC 9110 §10.2.3; an HTTP-date is not
    worth parsing for this); None when absent or not delta-seconds."""
    if value is None:
        return None
    value = value.strip()
    return min(int(value), MAX_AGE_LIMIT) if value.isdigit() else None


def _http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value.strip()).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


# -- entity tags ------------------------------------------------------------------------------

# etagc (RFC 9110 §8.8.3): %x21 / %x23-7E / obs-text. A CoAP ETag made only of these bytes is
# an origin's strong opaque-tag carried as is; anything else is not (a hashed tag begins with
# 0x00, outside etagc, so the two kinds never collide).
_ETAGC = frozenset({0x21, *range(0x23, 0x7F), *range(0x80, 0x100)})
HASHED_MARK = b"\x00"
ETAG_MAX = 8  # RFC 7252 §5.10.6


def coap_etag(http_etag: str) -> bytes | None:
    """The CoAP ETag option for an origin's ``ETag`` header (None: no usable header).

    A strong tag whose opaque value is 1-8 bytes travels as those bytes, so it can go back to
    the origin in ``If-Match`` / ``If-None-Match`` unchanged. Any other tag (longer, empty, or
    weak ``W/"..."``) becomes ``0x00`` + 7 bytes of BLAKE2b over the whole field value: stable
    across replicas and requests, and weak and strong tags of one opaque value stay apart. Such
    a tag cannot be sent back to the origin; the proxy compares it itself (proxy/forward.py).
    """
    value = http_etag.strip()
    if not value:
        return None
    raw = value.encode("latin-1", "replace")
    if len(raw) >= 3 and raw[0] == raw[-1] == 0x22:
        opaque = raw[1:-1]
        if len(opaque) <= ETAG_MAX and all(b in _ETAGC for b in opaque):
            return opaque
    return HASHED_MARK + hashlib.blake2b(raw, digest_size=ETAG_MAX - 1).digest()


def http_etag(coap: bytes) -> str | None:
    """The HTTP entity-tag for a CoAP ETag / If-Match value this proxy can name to the origin;
    None for a hashed (or client-invented, non-etagc) value."""
    if coap and all(b in _ETAGC for b in coap):
        return '"' + coap.decode("latin-1") + '"'
    return None


# -- byte ranges ------------------------------------------------------------------------------


def content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes first-last/total`` → (first, last, total); ``bytes */total`` (a 416) →
    (None, None, total); a ``*`` total or anything unreadable → None in its place
    (RFC 9110 §14.4)."""
    if value is None:
        return None, None, None
    unit, _, rest = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None, None, None
    span, _, total_text = rest.strip().partition("/")
    total = int(total_text) if total_text.isdigit() else None
    first_text, dash, last_text = span.partition("-")
    if dash and first_text.isdigit() and last_text.isdigit():
        first, last = int(first_text), int(last_text)
        if first <= last and (total is None or last < total):
            return first, last, total
    return None, None, total


# -- Location ---------------------------------------------------------------------------------


def location_parts(
    location: str, request_url: str, target_path: str, coap_path: str
) -> tuple[list[str], list[str]] | None:
    """Location-Path segments and Location-Query arguments for an origin's ``Location``
    (RFC 7252 §5.10.7: a relative reference resolved against the request URI).

    The reference is resolved against the URL the proxy called. On another origin it cannot be
    said in CoAP terms: None (dropped). A path under the route's target (``target_path`` or
    below) is mapped back onto the CoAP route (``coap_path`` + the rest); any other path on the
    same origin travels as is. Segments and arguments are percent-decoded (CoAP options carry
    no percent-encoding); a ``.`` or ``..`` segment, which a Location-Path must not be, drops
    the whole Location.
    """
    absolute = urljoin(request_url, location.strip())
    parts = urlsplit(absolute)
    if http_origin(absolute) is None or http_origin(absolute) != http_origin(request_url):
        return None
    path = parts.path or "/"
    base = target_path.rstrip("/")
    if path == base or path.startswith(base + "/"):
        path = coap_path.rstrip("/") + path[len(base) :]
    segments = [unquote(segment) for segment in path.split("/")[1:]]
    if segments == [""]:
        segments = []  # "/": no Location-Path at all (§5.10.7)
    if any(segment in (".", "..") for segment in segments):
        return None
    queries = [unquote(q) for q in parts.query.split("&")] if parts.query else []
    return segments, queries
