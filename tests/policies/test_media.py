"""Content-Type ↔ Content-Format by the IANA CoAP Content-Formats registry (RFC 7252 §12.3)."""

from __future__ import annotations

import pytest

from policies.media import CONTENT_FORMATS, content_format_for, content_type_for

# (Content-Format number, media type) as registered by IANA; docs/CONTRACT.md §10 names these.
REGISTRY_ROWS = [
    pytest.param(0, "text/plain", id="text-plain-0"),
    pytest.param(40, "application/link-format", id="link-format-40"),
    pytest.param(41, "application/xml", id="xml-41"),
    pytest.param(42, "application/octet-stream", id="octet-stream-42"),
    pytest.param(47, "application/exi", id="exi-47"),
    pytest.param(50, "application/json", id="json-50"),
    pytest.param(60, "application/cbor", id="cbor-60"),
]


@pytest.mark.parametrize(("number", "media_type"), REGISTRY_ROWS)
def test_content_format_for_media_type(number: int, media_type: str) -> None:
    assert content_format_for(media_type) == number


@pytest.mark.parametrize(("number", "media_type"), REGISTRY_ROWS)
def test_content_type_for_number(number: int, media_type: str) -> None:
    content_type = content_type_for(number)
    assert content_type is not None
    assert content_type.split(";", 1)[0] == media_type


def test_text_plain_carries_utf8_charset() -> None:
    # Content-Format 0 is registered as "text/plain; charset=utf-8".
    assert content_type_for(0) == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    ("content_type", "number"),
    [
        pytest.param("text/plain; charset=utf-8", 0, id="charset-utf8"),
        pytest.param("text/plain;charset=UTF-8", 0, id="charset-upper-no-space"),
        pytest.param("application/json; charset=utf-8", 50, id="json-with-charset"),
        pytest.param("Application/JSON", 50, id="case-insensitive"),
        pytest.param("  application/cbor  ", 60, id="surrounding-space"),
        pytest.param("application/cbor ; foo=bar", 60, id="space-before-parameter"),
        pytest.param("text/csv", 0, id="csv-served-as-text-plain"),
        pytest.param("text/xml", 41, id="text-xml-alias"),
    ],
)
def test_content_format_for_variants(content_type: str, number: int) -> None:
    assert content_format_for(content_type) == number


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("", id="empty"),
        pytest.param("image/png", id="unregistered"),
        pytest.param("application/jsonx", id="prefix-of-registered"),
        pytest.param("json", id="no-slash"),
        pytest.param(";charset=utf-8", id="only-parameter"),
    ],
)
def test_content_format_for_unknown(content_type: str) -> None:
    assert content_format_for(content_type) is None


def test_text_plain_in_other_charset_is_not_content_format_0() -> None:
    # Content-Format 0 means UTF-8 text; the docstring promises text's charset is not
    # ignored, so Latin-1 text must not be labelled as Content-Format 0.
    assert content_format_for("text/plain; charset=iso-8859-1") is None


@pytest.mark.parametrize("number", [-1, 1, 43, 9999, 65535, 65536])
def test_content_type_for_unknown(number: int) -> None:
    assert content_type_for(number) is None


@pytest.mark.parametrize("number", sorted(CONTENT_FORMATS))
def test_every_registered_format_round_trips(number: int) -> None:
    assert content_format_for(CONTENT_FORMATS[number]) == number
