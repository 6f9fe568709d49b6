"""The metadata envelope (policies/envelope.py), row by row: which fields, and when the payload
is embedded as JSON or carried as base64."""

from __future__ import annotations

import base64
import json

import pytest

from policies.envelope import wrap

SIM = {
    "iccid": "8988280666000000001",
    "device": "8988280666000000001",
    "source": "10.64.0.1:40001",
    "received-at": "1700000000123",
}
MANAGED = {"device": "koru-1", "source": "[2001:db8::1]:5684", "received-at": "1700000000456"}


def _opened(payload: bytes, properties: dict[str, str]) -> dict[str, object]:
    envelope = wrap(payload, properties)
    document = json.loads(envelope)  # the envelope itself is always JSON
    assert isinstance(document, dict)
    return document


@pytest.mark.parametrize(
    ("payload", "properties", "expected"),
    [
        # Raw bytes: base64, every byte kept.
        (
            b"\x00\xff\x10",
            {**SIM, "content-format": "42"},
            {
                "iccid": SIM["iccid"],
                "device": SIM["device"],
                "source": SIM["source"],
                "content_format": 42,
                "received_at": 1700000000123,
                "payload_base64": "AP8Q",
            },
        ),
        # No Content-Format at all: null, and base64.
        (
            b"hi",
            SIM,
            {
                "iccid": SIM["iccid"],
                "device": SIM["device"],
                "source": SIM["source"],
                "content_format": None,
                "received_at": 1700000000123,
                "payload_base64": "aGk=",
            },
        ),
        # JSON (50): embedded as JSON. A device without an ICCID has no "iccid".
        (
            b' {"t": 21.5, "ok": [true, null]} ',
            {**MANAGED, "content-format": "50"},
            {
                "device": "koru-1",
                "source": "[2001:db8::1]:5684",
                "content_format": 50,
                "received_at": 1700000000456,
                "payload": {"t": 21.5, "ok": [True, None]},
            },
        ),
        # A JSON scalar is JSON too.
        (b"42", {**MANAGED, "content-format": "50"}, {"payload": 42}),
        # Declared JSON but is not: base64, nothing lost.
        (b'{"t": ', {**MANAGED, "content-format": "50"}, {"payload_base64": "eyJ0Ijog"}),
        (b"NaN", {**MANAGED, "content-format": "50"}, {"payload_base64": "TmFO"}),
        (b'"\xc3\x28"', {**MANAGED, "content-format": "50"}, {"payload_base64": "IsMoIg=="}),
        (b"", {**MANAGED, "content-format": "50"}, {"payload_base64": ""}),
        # JSON bytes without the JSON Content-Format stay opaque.
        (
            b"{}",
            {**MANAGED, "content-format": "0"},
            {"content_format": 0, "payload_base64": "e30="},
        ),
        # A media type without a number stays text.
        (
            b"x",
            {**MANAGED, "content-format": "application/x-custom"},
            {"content_format": "application/x-custom"},
        ),
        # Translated: the template is named and the payload embedded as it is.
        (
            b'{"a":{"b":5},"s":"\xc3\xa9"}',
            {**SIM, "content-format": "50", "template": "tpl_1"},
            {"template": "tpl_1", "content_format": 50, "payload": {"a": {"b": 5}, "s": "é"}},
        ),
    ],
)
def test_rows(payload: bytes, properties: dict[str, str], expected: dict[str, object]) -> None:
    document = _opened(payload, properties)
    for key, value in expected.items():
        assert document[key] == value, key
    # Exactly one of the two payload keys, always.
    assert ("payload" in document) != ("payload_base64" in document)


def test_base64_round_trips_any_bytes() -> None:
    payload = bytes(range(256))
    document = _opened(payload, {**SIM, "content-format": "42"})
    assert base64.b64decode(str(document["payload_base64"])) == payload


def test_keys_and_their_order() -> None:
    document = _opened(b"{}", {**SIM, "content-format": "50"})
    assert list(document) == [
        "iccid",
        "device",
        "source",
        "content_format",
        "received_at",
        "payload",
    ]


def test_deep_json_is_not_embedded_and_costs_no_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    document = _opened(deep, {**SIM, "content-format": "50"})
    assert base64.b64decode(str(document["payload_base64"])) == deep
