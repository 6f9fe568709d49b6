"""The pure HTTP ↔ CoAP header rules (policies/translation.py), row by row."""

from __future__ import annotations

import pytest

from policies.translation import (
    HASHED_MARK,
    coap_etag,
    content_range,
    http_etag,
    location_parts,
    max_age,
    max_age_from_retry_after,
)

NOW = 4_000_000_000.0


@pytest.mark.parametrize(
    ("http_status", "headers", "expected"),
    [
        pytest.param(200, {"cache-control": "max-age=30"}, 30, id="max-age"),
        pytest.param(200, {"cache-control": 'max-age="30"'}, 30, id="quoted-max-age"),
        pytest.param(200, {"cache-control": "MAX-AGE=30"}, 30, id="directive-case"),
        pytest.param(200, {"cache-control": "no-store, max-age=30"}, 0, id="no-store-wins"),
        pytest.param(200, {"cache-control": 'no-cache="set-cookie"'}, 0, id="no-cache-fields"),
        pytest.param(200, {"cache-control": "public"}, None, id="no-age-directive"),
        pytest.param(202, {"cache-control": "public"}, 0, id="no-age-not-heuristic"),
        pytest.param(200, {"expires": "Thu, 01 Jan 1970 00:00:00 GMT"}, 0, id="expires-epoch"),
        pytest.param(
            200, {"expires": "Sun, 02 Oct 2096 07:06:40 GMT"}, 0, id="expires-now-no-date"
        ),
        pytest.param(
            200, {"expires": "Sun, 02 Oct 2096 07:07:40 GMT"}, 60, id="expires-against-now"
        ),
        pytest.param(
            200,
            {"expires": "Sun, 02 Oct 2096 07:07:40 GMT", "date": "garbage"},
            60,
            id="bad-date-is-now",
        ),
        pytest.param(206, {}, None, id="206-heuristic"),
        pytest.param(410, {}, None, id="410-heuristic"),
        pytest.param(401, {}, 0, id="401"),
        pytest.param(429, {}, 0, id="429"),
    ],
)
def test_max_age(http_status: int, headers: dict[str, str], expected: int | None) -> None:
    assert max_age(http_status, headers, NOW) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param('"a"', b"a", id="one-byte"),
        pytest.param(' "abc" ', b"abc", id="surrounding-space"),
        pytest.param('"\xe9t\xe9"', b"\xe9t\xe9", id="obs-text"),
        pytest.param("", None, id="empty-header"),
    ],
)
def test_coap_etag_raw(header: str, expected: bytes | None) -> None:
    assert coap_etag(header) == expected


@pytest.mark.parametrize("header", ['"123456789"', 'W/"a"', '""', "unquoted", '"a b"', '"a"b"'])
def test_coap_etag_hashed(header: str) -> None:
    value = coap_etag(header)
    assert value is not None
    assert len(value) == 8
    assert value.startswith(HASHED_MARK)
    assert http_etag(value) is None  # cannot be named to the origin


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b"v1", '"v1"', id="raw"),
        pytest.param(b"\x00abcdefg", None, id="hashed"),
        pytest.param(b"a b", None, id="space-not-etagc"),
        pytest.param(b'a"b', None, id="quote-not-etagc"),
        pytest.param(b"", None, id="empty"),
    ],
)
def test_http_etag(value: bytes, expected: str | None) -> None:
    assert http_etag(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("bytes 0-1023/4096", (0, 1023, 4096), id="slice"),
        pytest.param("BYTES 10-10/11", (10, 10, 11), id="unit-case"),
        pytest.param("bytes 0-9/*", (0, 9, None), id="unknown-total"),
        pytest.param("bytes */4096", (None, None, 4096), id="unsatisfied"),
        pytest.param("bytes 5-4/10", (None, None, 10), id="reversed"),
        pytest.param("bytes 0-10/10", (None, None, 10), id="past-total"),
        pytest.param("items 0-1/2", (None, None, None), id="other-unit"),
        pytest.param(None, (None, None, None), id="absent"),
    ],
)
def test_content_range(value: str | None, expected: tuple) -> None:
    assert content_range(value) == expected


URL = "http://origin:8000/api/things?x=1"


@pytest.mark.parametrize(
    ("location", "target_path", "coap_path", "expected"),
    [
        pytest.param("/api/things/1", "/api/things", "/t", (["t", "1"], []), id="under-target"),
        pytest.param("/api/thingsX", "/api/things", "/t", (["api", "thingsX"], []), id="prefix"),
        pytest.param("/x", "/", "/c", (["c", "x"], []), id="target-root"),
        pytest.param("/api/things", "/api/things", "/", ([], []), id="onto-coap-root"),
        pytest.param("/a/%2E%2E", "/api/things", "/t", None, id="dot-dot-decoded"),
        pytest.param("https://origin:8000/a", "/api/things", "/t", None, id="other-scheme"),
        pytest.param("//elsewhere/a", "/api/things", "/t", None, id="network-path"),
        pytest.param("?a=1&b", "/api/things", "/t", (["t"], ["a=1", "b"]), id="query-only-ref"),
    ],
)
def test_location_parts(location: str, target_path: str, coap_path: str, expected) -> None:
    assert location_parts(location, URL, target_path, coap_path) == expected


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        pytest.param("7", 7, id="seconds"),
        pytest.param(" 30 ", 30, id="spaces"),
        pytest.param("0", 0, id="zero"),
        pytest.param("99999999999", 0xFFFFFFFF, id="capped-at-4-bytes"),
        pytest.param("Wed, 21 Oct 2026 07:28:00 GMT", None, id="http-date"),
        pytest.param("-5", None, id="negative"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_retry_after_as_max_age(retry_after: str | None, expected: int | None) -> None:
    assert max_age_from_retry_after(retry_after) == expected
