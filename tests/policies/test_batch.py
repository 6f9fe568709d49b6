"""The batch wire format shared by the proxy and the API (policies/batch.py)."""

from __future__ import annotations

import struct

import pytest

from policies.batch import (
    NO_CONTENT_FORMAT,
    BatchFormatError,
    BatchItem,
    decode_batch,
    decode_statuses,
    encode_batch,
    encode_statuses,
)

ITEMS = [
    BatchItem("10.0.0.1", 5683, "coap", "", "coap:10.0.0.1:5683:1:aa", "a/b", None, b""),
    BatchItem(
        "2001:db8::1",
        1,
        "coaps",
        "8988280666000000001",
        "k2",
        "ä",
        42,
        bytes(range(256)) * 300,
    ),
    BatchItem("10.0.0.2", 65535, "coap", "", "", "", 0, b"x"),
]


def test_round_trip_keeps_every_field_byte_exact() -> None:
    assert decode_batch(encode_batch(ITEMS)) == ITEMS


def test_empty_batch() -> None:
    assert encode_batch([]) == b""
    assert decode_batch(b"") == []


def _head(*lengths: int) -> bytes:
    """An item head: port, no Content-Format, then the lengths of ip, proto, identity, key,
    topic and payload."""
    ip, proto, identity, key, topic, payload = lengths
    return struct.pack("!HIBBHHHI", 1, NO_CONTENT_FORMAT, ip, proto, identity, key, topic, payload)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(encode_batch(ITEMS)[:-1], "payload runs past", id="payload-cut"),
        pytest.param(encode_batch(ITEMS[:1])[:25], "field runs past|truncated", id="field-cut"),
        pytest.param(b"\x00", "truncated", id="half-length"),
        pytest.param(_head(0, 0, 1, 0, 0, 0) + b"\xff", "not UTF-8", id="utf8"),
    ],
)
def test_malformed_batches_are_refused_with_the_item_named(body: bytes, message: str) -> None:
    with pytest.raises(BatchFormatError, match=message):
        decode_batch(body)


def test_oversized_field_is_refused_on_encode() -> None:
    with pytest.raises(BatchFormatError, match="exceeds"):
        encode_batch([BatchItem("10.0.0.1", 1, "coap", "x" * 70000, "", "", None, b"")])


def test_statuses_round_trip() -> None:
    assert decode_statuses(encode_statuses([204, 401, 503]), 3) == [204, 401, 503]


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b'{"statuses": [204]}', b'{"statuses": [204, "x"]}', b'{"statuses": [true, 1]}'],
)
def test_statuses_that_do_not_match_the_batch_are_refused(body: bytes) -> None:
    with pytest.raises(BatchFormatError):
        decode_statuses(body, 2)
