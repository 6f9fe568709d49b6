"""The batch wire format shared by the proxy and the API (policies/batch.py)."""

from __future__ import annotations

import pytest

from policies.batch import (
    BatchFormatError,
    BatchItem,
    decode_batch,
    decode_statuses,
    encode_batch,
    encode_statuses,
)

ITEMS = [
    BatchItem('for="10.0.0.1:5683";proto=coap', "", "coap:10.0.0.1:5683:1:aa", "t=a/b", "", b""),
    BatchItem(
        'for="[2001:db8::1]:1";proto=coaps',
        "8988280666000000001",
        "k2",
        "t=%C3%A4&x=1",
        "application/octet-stream",
        bytes(range(256)) * 300,
    ),
]


def test_round_trip_keeps_every_field_byte_exact() -> None:
    assert decode_batch(encode_batch(ITEMS)) == ITEMS


def test_empty_batch() -> None:
    assert encode_batch([]) == b""
    assert decode_batch(b"") == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(encode_batch(ITEMS)[:-1], "payload runs past", id="payload-cut"),
        pytest.param(encode_batch(ITEMS[:1])[:3], "field runs past|truncated", id="field-cut"),
        pytest.param(b"\x00", "truncated", id="half-length"),
        pytest.param(
            b"\x00\x01\xff" + b"\x00\x00" * 4 + b"\x00\x00\x00\x00", "not UTF-8", id="utf8"
        ),
    ],
)
def test_malformed_batches_are_refused_with_the_item_named(body: bytes, message: str) -> None:
    with pytest.raises(BatchFormatError, match=message):
        decode_batch(body)


def test_oversized_field_is_refused_on_encode() -> None:
    with pytest.raises(BatchFormatError, match="exceeds"):
        encode_batch([BatchItem("x" * 70000, "", "", "", "", b"")])


def test_statuses_round_trip() -> None:
    assert decode_statuses(encode_statuses([204, 401, 503]), 3) == [204, 401, 503]


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b'{"statuses": [204]}', b'{"statuses": [204, "x"]}', b'{"statuses": [true, 1]}'],
)
def test_statuses_that_do_not_match_the_batch_are_refused(body: bytes) -> None:
    with pytest.raises(BatchFormatError):
        decode_statuses(body, 2)
