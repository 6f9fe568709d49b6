"""The binary template translation (policies/templates.py), row by row."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest

from policies.templates import (
    MAX_ASSETS,
    PayloadError,
    TemplateError,
    Translation,
    compile_template,
)


def one(value: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A template with one asset "v"."""
    return {"sense": [{"asset": "v", "value": value, **extra}]}


def translate_one(value: dict[str, Any], payload: bytes) -> Any:
    return compile_template(one(value)).translate(payload).document["v"]


# --- the platform's documented format, a whole template -------------------------------------

TRACKER = {
    "sense": [
        {"asset": "temperature", "value": {"byte": 0, "bytelength": 2, "type": "int"}},
        {
            "asset": "humidity",
            "value": {"byte": 2, "bytelength": 1, "type": "uint", "signed": False},
        },
        {"asset": "door_open", "value": {"byte": 3, "bytelength": 1, "type": "boolean"}},
        {"asset": "car.fuel", "value": {"byte": 4, "bytelength": 4, "type": "float"}},
        {
            "asset": "car.odometer",
            "value": {"byte": 8, "bytelength": 4, "type": "uint", "byteorder": "little"},
        },
        {"asset": "name", "value": {"byte": 12, "bytelength": 6, "type": "string"}},
        {
            "asset": "gps.lat",
            "custom_type": "location_lat",
            "value": {"byte": 18, "bytelength": 8, "type": "float"},
        },
        {
            "asset": "gps.long",
            "custom_type": "location_long",
            "value": {"byte": 26, "bytelength": 8, "type": "float"},
        },
    ]
}


def tracker_payload() -> bytes:
    return (
        struct.pack(">hBBf", -125, 87, 1, 42.5)
        + struct.pack("<I", 123_456)
        + b"unit7\x00"
        + struct.pack(">dd", 48.1372, 11.5756)
    )


def test_documented_template_translates_exactly() -> None:
    template = compile_template(TRACKER)
    assert template.min_length == 34
    result = template.translate(tracker_payload())
    assert result == Translation(
        {
            "temperature": -125,
            "humidity": 87,
            "door_open": True,
            "car": {"fuel": 42.5, "odometer": 123_456},
            "name": "unit7",
            "gps": {"lat": 48.1372, "long": 11.5756},
        },
        48.1372,
        11.5756,
    )
    # The document is what the API publishes: plain JSON, keys in template order.
    assert json.dumps(result.document, separators=(",", ":")) == (
        '{"temperature":-125,"humidity":87,"door_open":true,'
        '"car":{"fuel":42.5,"odometer":123456},"name":"unit7",'
        '"gps":{"lat":48.1372,"long":11.5756}}'
    )


def test_compiled_template_is_reusable_and_results_are_independent() -> None:
    template = compile_template(TRACKER)
    first = template.translate(tracker_payload())
    first.document["car"]["fuel"] = 0
    second = template.translate(tracker_payload())
    assert second.document["car"]["fuel"] == 42.5


# --- every type, both byte orders, signed and unsigned --------------------------------------


@pytest.mark.parametrize(
    ("value", "payload", "expected"),
    [
        # int: signed unless told
        pytest.param({"type": "int", "bytelength": 1}, "ff", -1, id="int8"),
        pytest.param({"type": "int", "bytelength": 1, "signed": False}, "ff", 255, id="int8-u"),
        pytest.param({"type": "int", "bytelength": 2}, "fffe", -2, id="int16-be"),
        pytest.param(
            {"type": "int", "bytelength": 2, "byteorder": "little"}, "feff", -2, id="int16-le"
        ),
        pytest.param({"type": "int", "bytelength": 3}, "800000", -(2**23), id="int24-be-min"),
        pytest.param(
            {"type": "int", "bytelength": 3, "byteorder": "little"}, "feffff", -2, id="int24-le"
        ),
        pytest.param(
            {"type": "int", "bytelength": 3, "signed": False}, "800001", 2**23 + 1, id="int24-u"
        ),
        pytest.param({"type": "int", "bytelength": 4}, "80000000", -(2**31), id="int32-min"),
        pytest.param(
            {"type": "int", "bytelength": 5, "byteorder": "little"},
            "0100000080",
            1 - 2**39,
            id="int40-le",
        ),
        pytest.param({"type": "int", "bytelength": 8}, "ff" * 8, -1, id="int64"),
        pytest.param(
            {"type": "int", "bytelength": 8, "byteorder": "little"},
            "0000000000000080",
            -(2**63),
            id="int64-le-min",
        ),
        # uint
        pytest.param({"type": "uint", "bytelength": 1}, "ff", 255, id="uint8"),
        pytest.param({"type": "uint", "bytelength": 2}, "0102", 0x0102, id="uint16-be"),
        pytest.param(
            {"type": "uint", "bytelength": 2, "byteorder": "little"}, "0102", 0x0201, id="uint16-le"
        ),
        pytest.param({"type": "uint", "bytelength": 3}, "010203", 0x010203, id="uint24-be"),
        pytest.param(
            {"type": "uint", "bytelength": 3, "byteorder": "little"},
            "010203",
            0x030201,
            id="uint24-le",
        ),
        pytest.param({"type": "uint", "bytelength": 4}, "ffffffff", 2**32 - 1, id="uint32"),
        pytest.param({"type": "uint", "bytelength": 6}, "010000000000", 2**40, id="uint48"),
        pytest.param({"type": "uint", "bytelength": 7}, "ff" * 7, 2**56 - 1, id="uint56"),
        pytest.param({"type": "uint", "bytelength": 8}, "ff" * 8, 2**64 - 1, id="uint64"),
        pytest.param(
            {"type": "uint", "bytelength": 8, "signed": False}, "00" * 7 + "2a", 42, id="uint64-f"
        ),
        # float: IEEE 754 half, single, double
        pytest.param({"type": "float", "bytelength": 2}, "3c00", 1.0, id="half"),
        pytest.param({"type": "float", "bytelength": 4}, "41ac0000", 21.5, id="single-be"),
        pytest.param(
            {"type": "float", "bytelength": 4, "byteorder": "little"},
            "0000ac41",
            21.5,
            id="single-le",
        ),
        pytest.param(
            {"type": "float", "bytelength": 8}, struct.pack(">d", -0.1).hex(), -0.1, id="double"
        ),
        pytest.param(
            {"type": "float", "bytelength": 8, "byteorder": "little"},
            struct.pack("<d", 1e300).hex(),
            1e300,
            id="double-le",
        ),
        pytest.param(
            {"type": "float", "bytelength": 4, "signed": True}, "bf800000", -1.0, id="f-s"
        ),
        # NaN and infinities have no JSON form: null
        pytest.param({"type": "float", "bytelength": 4}, "7fc00000", None, id="nan"),
        pytest.param({"type": "float", "bytelength": 8}, "fff0000000000000", None, id="-inf"),
        pytest.param({"type": "float", "bytelength": 2}, "7c00", None, id="half-inf"),
        # boolean: nonzero is true, over its whole length
        pytest.param({"type": "boolean", "bytelength": 1}, "00", False, id="bool-0"),
        pytest.param({"type": "boolean", "bytelength": 1}, "02", True, id="bool-2"),
        pytest.param({"type": "boolean", "bytelength": 2}, "0100", True, id="bool-16"),
        pytest.param({"type": "boolean", "bytelength": 3}, "000000", False, id="bool-24-0"),
        pytest.param({"type": "boolean", "bytelength": 3}, "000001", True, id="bool-24-1"),
        # string: UTF-8, trailing NULs dropped, inner ones kept
        pytest.param({"type": "string", "bytelength": 5}, b"hello".hex(), "hello", id="str"),
        pytest.param({"type": "string", "bytelength": 5}, b"hi\0\0\0".hex(), "hi", id="str-nul"),
        pytest.param({"type": "string", "bytelength": 4}, b"a\0b\0".hex(), "a\0b", id="str-in"),
        pytest.param({"type": "string", "bytelength": 3}, "00" * 3, "", id="str-empty"),
        pytest.param({"type": "string", "bytelength": 3}, "c3a900", "é", id="str-utf8"),
        pytest.param(
            {"type": "string", "bytelength": 2, "byteorder": "little"}, b"ok".hex(), "ok", id="s-le"
        ),
    ],
)
def test_type(value: dict[str, Any], payload: str, expected: object) -> None:
    result = translate_one({"byte": 0, **value}, bytes.fromhex(payload))
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "payload", "expected"),
    [
        # bit 0 is the least significant bit of the field, whatever its byte order
        pytest.param({"type": "uint", "bit": 0}, "01", 1, id="bit0"),
        pytest.param({"type": "uint", "bit": 7}, "80", 1, id="bit7"),
        pytest.param({"type": "uint", "bit": 7}, "7f", 0, id="bit7-clear"),
        pytest.param({"type": "uint", "bit": 4, "bitlength": 4}, "a5", 0xA, id="high-nibble"),
        pytest.param({"type": "uint", "bitlength": 4}, "a5", 0x5, id="low-nibble"),
        pytest.param(
            {"type": "uint", "bytelength": 2, "bit": 6, "bitlength": 4}, "03c0", 0xF, id="straddle"
        ),
        pytest.param(
            {"type": "uint", "bytelength": 2, "byteorder": "little", "bit": 8, "bitlength": 8},
            "3412",
            0x12,
            id="le-high-byte",
        ),
        pytest.param(
            {"type": "uint", "bytelength": 3, "bit": 20, "bitlength": 4}, "a00000", 0xA, id="24bit"
        ),
        # an int bit field is two's complement over its own width
        pytest.param({"type": "int", "bit": 0, "bitlength": 3}, "07", -1, id="int3-neg"),
        pytest.param({"type": "int", "bit": 0, "bitlength": 3}, "03", 3, id="int3-pos"),
        pytest.param({"type": "int", "bit": 4, "bitlength": 4}, "8f", -8, id="int4-min"),
        pytest.param(
            {"type": "int", "signed": False, "bit": 4, "bitlength": 4}, "8f", 8, id="int4-u"
        ),
        pytest.param({"type": "boolean", "bit": 3}, "08", True, id="bool-bit"),
        pytest.param({"type": "boolean", "bit": 3}, "f7", False, id="bool-bit-clear"),
        pytest.param({"type": "boolean", "bit": 1, "bitlength": 2}, "09", False, id="bool-bits"),
    ],
)
def test_bit_field(value: dict[str, Any], payload: str, expected: object) -> None:
    field = {"byte": 0, "bytelength": 1, **value}
    result = translate_one(field, bytes.fromhex(payload))
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "payload", "expected"),
    [
        # integer scale and offset keep an integer
        pytest.param({"type": "uint", "scale": 10}, "07", 70, id="int-scale"),
        pytest.param({"type": "uint", "offset": -40}, "0a", -30, id="int-offset"),
        # a decimal scale gives the decimal a user expects, not 21.500000000000004
        pytest.param({"type": "uint", "bytelength": 2, "scale": 0.1}, "00d7", 21.5, id="0.1"),
        pytest.param({"type": "int", "bytelength": 2, "scale": 0.01}, "fc19", -9.99, id="0.01"),
        pytest.param(
            {"type": "uint", "scale": 1.8, "offset": 32}, "25", 98.6, id="celsius-to-fahrenheit"
        ),
        pytest.param(
            {"type": "uint", "bytelength": 2, "scale": 0.01, "offset": 273.15},
            "0000",
            273.15,
            id="kelvin",
        ),
        pytest.param({"type": "int", "scale": 2.0}, "ff", -2.0, id="float-integral-scale"),
        pytest.param(
            {"type": "int", "bytelength": 4, "scale": 1e-7},
            "1cb127a0",
            48.1372064,
            id="gps-1e-7",
        ),
        pytest.param(
            {"type": "uint", "bit": 4, "bitlength": 4, "scale": 0.5}, "f0", 7.5, id="bits-scaled"
        ),
        # floats scale in floating point; an overflow is null like any infinity
        pytest.param({"type": "float", "bytelength": 4, "scale": 2}, "41ac0000", 43.0, id="float"),
        pytest.param(
            {"type": "float", "bytelength": 4, "offset": -0.5}, "41ac0000", 21.0, id="float-offset"
        ),
        pytest.param(
            {"type": "float", "bytelength": 8, "scale": 1e300},
            struct.pack(">d", 1e300).hex(),
            None,
            id="float-overflow",
        ),
        pytest.param({"type": "float", "bytelength": 4, "scale": 3}, "7fc00000", None, id="nan"),
    ],
)
def test_scale_and_offset(value: dict[str, Any], payload: str, expected: object) -> None:
    field = {"byte": 0, "bytelength": 1, **value}
    result = translate_one(field, bytes.fromhex(payload))
    assert result == expected
    assert type(result) is type(expected)


def test_fields_anywhere_overlapping_and_in_any_order() -> None:
    # Fields out of order, reading the same bytes several ways, in both byte orders.
    template = compile_template(
        {
            "sense": [
                {"asset": "tail", "value": {"byte": 6, "bytelength": 2, "type": "uint"}},
                {"asset": "be", "value": {"byte": 0, "bytelength": 4, "type": "uint"}},
                {
                    "asset": "le",
                    "value": {"byte": 0, "bytelength": 4, "type": "uint", "byteorder": "little"},
                },
                {"asset": "first", "value": {"byte": 0, "bytelength": 1, "type": "uint"}},
                {"asset": "flag", "value": {"byte": 0, "bytelength": 1, "type": "uint", "bit": 0}},
                {"asset": "mid", "value": {"byte": 2, "bytelength": 3, "type": "int"}},
                {"asset": "raw", "value": {"byte": 1, "bytelength": 2, "type": "string"}},
            ]
        }
    )
    assert template.min_length == 8
    document = template.translate(bytes.fromhex("0141420000fe0102")).document
    assert document == {
        "tail": 0x0102,
        "be": 0x01414200,
        "le": 0x00424101,
        "first": 1,
        "flag": 1,
        "mid": 0x420000,
        "raw": "AB",
    }
    assert list(document) == ["tail", "be", "le", "first", "flag", "mid", "raw"]


def test_gaps_and_trailing_bytes_are_ignored() -> None:
    template = compile_template(
        {
            "sense": [
                {"asset": "a", "value": {"byte": 1, "bytelength": 1, "type": "uint"}},
                {"asset": "b", "value": {"byte": 5, "bytelength": 1, "type": "uint"}},
            ]
        }
    )
    assert template.min_length == 6
    assert template.translate(bytes(range(10))).document == {"a": 1, "b": 5}


# --- nesting ---------------------------------------------------------------------------------


def test_dotted_names_nest_in_first_appearance_order() -> None:
    template = compile_template(
        {
            "sense": [
                {"asset": "car.fuel", "value": {"byte": 0, "bytelength": 1, "type": "uint"}},
                {"asset": "x", "value": {"byte": 1, "bytelength": 1, "type": "uint"}},
                {"asset": "car.engine.rpm", "value": {"byte": 2, "bytelength": 1, "type": "uint"}},
                {"asset": "car.speed", "value": {"byte": 3, "bytelength": 1, "type": "uint"}},
                {"asset": "car.engine.temp", "value": {"byte": 4, "bytelength": 1, "type": "int"}},
            ]
        }
    )
    document = template.translate(bytes([1, 2, 3, 4, 0xFB])).document
    assert document == {
        "car": {"fuel": 1, "engine": {"rpm": 3, "temp": -5}, "speed": 4},
        "x": 2,
    }
    assert list(document) == ["car", "x"]
    assert list(document["car"]) == ["fuel", "engine", "speed"]


# --- location --------------------------------------------------------------------------------


def location_template(lat: dict[str, Any], long: dict[str, Any]) -> dict[str, Any]:
    return {
        "sense": [
            {"asset": "t", "value": {"byte": 0, "bytelength": 1, "type": "int"}},
            {"asset": "lat", "custom_type": "location_lat", "value": lat},
            {"asset": "long", "custom_type": "location_long", "value": long},
        ]
    }


def test_location_from_float32_fields_stays_in_the_document() -> None:
    template = compile_template(
        location_template(
            {"byte": 1, "bytelength": 4, "type": "float", "byteorder": "little"},
            {"byte": 5, "bytelength": 4, "type": "float", "byteorder": "little"},
        )
    )
    result = template.translate(b"\x10" + struct.pack("<ff", -33.5, 151.25))
    assert (result.latitude, result.longitude) == (-33.5, 151.25)
    assert result.document == {"t": 16, "lat": -33.5, "long": 151.25}


def test_location_from_scaled_integers() -> None:
    # GPS modules often send degrees × 10⁷ as int32 (an extension, policies/templates.py).
    template = compile_template(
        location_template(
            {"byte": 1, "bytelength": 4, "type": "int", "scale": 1e-7},
            {"byte": 5, "bytelength": 4, "type": "int", "scale": 1e-7},
        )
    )
    result = template.translate(b"\x00" + struct.pack(">ii", 481_372_064, -1_157_560))
    assert (result.latitude, result.longitude) == (48.1372064, -0.115756)
    assert isinstance(result.latitude, float)


@pytest.mark.parametrize(
    ("lat", "long"),
    [
        pytest.param(math.nan, 11.5, id="lat-nan"),
        pytest.param(48.1, math.inf, id="long-inf"),
        pytest.param(90.5, 11.5, id="lat-out-of-range"),
        pytest.param(48.1, -180.01, id="long-out-of-range"),
    ],
)
def test_invalid_fix_keeps_the_message_but_gives_no_location(lat: float, long: float) -> None:
    template = compile_template(
        location_template(
            {"byte": 1, "bytelength": 8, "type": "float"},
            {"byte": 9, "bytelength": 8, "type": "float"},
        )
    )
    result = template.translate(b"\x01" + struct.pack(">dd", lat, long))
    assert (result.latitude, result.longitude) == (None, None)
    assert result.document["t"] == 1


def test_location_bounds_are_inclusive() -> None:
    template = compile_template(
        location_template(
            {"byte": 1, "bytelength": 8, "type": "float"},
            {"byte": 9, "bytelength": 8, "type": "float"},
        )
    )
    result = template.translate(b"\x01" + struct.pack(">dd", -90.0, 180.0))
    assert (result.latitude, result.longitude) == (-90.0, 180.0)


def test_no_location_fields_no_location() -> None:
    result = compile_template(one({"byte": 0, "bytelength": 8, "type": "float"})).translate(
        struct.pack(">d", 45.0)
    )
    assert (result.latitude, result.longitude) == (None, None)


# --- payload errors --------------------------------------------------------------------------


@pytest.mark.parametrize("got", [0, 1, 33])
def test_short_payload(got: int) -> None:
    template = compile_template(TRACKER)
    with pytest.raises(PayloadError, match=f"payload is {got} bytes, the template needs 34") as e:
        template.translate(tracker_payload()[:got])
    assert (e.value.needed, e.value.got) == (34, got)


def test_payload_of_exactly_min_length_translates() -> None:
    template = compile_template(one({"byte": 3, "bytelength": 3, "type": "uint"}))
    assert template.min_length == 6
    assert template.translate(b"\0\0\0\0\0\x05").document == {"v": 5}


def test_string_that_is_not_utf8() -> None:
    template = compile_template(
        {"sense": [{"asset": "label", "value": {"byte": 2, "bytelength": 3, "type": "string"}}]}
    )
    with pytest.raises(PayloadError, match=r"asset 'label': bytes 2\.\.4 are not UTF-8") as e:
        template.translate(b"\0\0a\xff\0")
    assert (e.value.needed, e.value.got) == (None, None)


def test_payload_types_accepted() -> None:
    template = compile_template(one({"byte": 0, "bytelength": 2, "type": "uint"}))
    for payload in (b"\x01\x02", bytearray(b"\x01\x02"), memoryview(b"\x01\x02")):
        assert template.translate(payload).document == {"v": 0x0102}


# --- malformed templates: each refused with the place it fails -------------------------------

V = {"byte": 0, "bytelength": 2, "type": "int"}


def asset(**changes: Any) -> dict[str, Any]:
    return {"asset": "a", "value": dict(V), **changes}


def value(**changes: Any) -> dict[str, Any]:
    return {"sense": [{"asset": "a", "value": {**V, **changes}}]}


def without(key: str) -> dict[str, Any]:
    return {"sense": [{"asset": "a", "value": {k: v for k, v in V.items() if k != key}}]}


def ok(name: str, byte: int = 0) -> dict[str, Any]:
    return {"asset": name, "value": {"byte": byte, "bytelength": 1, "type": "uint"}}


def lat(name: str = "lat", custom: str = "location_lat") -> dict[str, Any]:
    return {
        "asset": name,
        "custom_type": custom,
        "value": {"byte": 0, "bytelength": 8, "type": "float"},
    }


@pytest.mark.parametrize(
    ("template", "where", "message"),
    [
        pytest.param([], "", "a template is a JSON object", id="not-object"),
        pytest.param({}, "sense", "missing", id="no-sense"),
        pytest.param({"sense": {}}, "sense", "must be a list", id="sense-not-list"),
        pytest.param({"sense": []}, "sense", "at least one asset", id="sense-empty"),
        pytest.param(
            {"sense": [ok(f"a{i}") for i in range(MAX_ASSETS + 1)]},
            "sense",
            "at most 256 assets, got 257",
            id="too-many",
        ),
        pytest.param({"sense": [], "senses": 1}, "senses", "unknown key", id="root-key"),
        pytest.param({"sense": ["a"]}, "sense[0]", "an asset is an object", id="asset-not-obj"),
        pytest.param({"sense": [ok("a"), {"value": V}]}, "sense[1].asset", "missing", id="noname"),
        pytest.param({"sense": [asset(asset=7)]}, "sense[0].asset", "not a string", id="name-int"),
        pytest.param({"sense": [asset(asset="")]}, "sense[0].asset", "1 to 128", id="name-empty"),
        pytest.param(
            {"sense": [asset(asset="x" * 129)]}, "sense[0].asset", "1 to 128", id="name-long"
        ),
        pytest.param(
            {"sense": [asset(asset="car..fuel")]}, "sense[0].asset", "empty part", id="name-dots"
        ),
        pytest.param(
            {"sense": [asset(asset=".fuel")]}, "sense[0].asset", "empty part", id="name-lead"
        ),
        pytest.param(
            {"sense": [asset(asset="car.")]}, "sense[0].asset", "empty part", id="name-trail"
        ),
        pytest.param({"sense": [asset(unit="C")]}, "sense[0].unit", "unknown key", id="item-key"),
        pytest.param({"sense": [{"asset": "a"}]}, "sense[0].value", "missing", id="no-value"),
        pytest.param(
            {"sense": [{"asset": "a", "value": 3}]}, "sense[0].value", "not an object", id="val-3"
        ),
        pytest.param(
            value(bytelenght=2), "sense[0].value.bytelenght", "unknown key", id="misspelt"
        ),
        pytest.param(without("type"), "sense[0].value.type", "missing or not one of", id="notype"),
        pytest.param(value(type="double"), "sense[0].value.type", "int, uint", id="bad-type"),
        pytest.param(without("byte"), "sense[0].value.byte", "missing", id="no-byte"),
        pytest.param(value(byte=-1), "sense[0].value.byte", "0 to 1023, got -1", id="byte-neg"),
        pytest.param(value(byte=1024), "sense[0].value.byte", "0 to 1023", id="byte-big"),
        pytest.param(value(byte="0"), "sense[0].value.byte", "an integer, got '0'", id="byte-s"),
        pytest.param(value(byte=1.0), "sense[0].value.byte", "an integer", id="byte-float"),
        pytest.param(value(byte=True), "sense[0].value.byte", "an integer", id="byte-bool"),
        pytest.param(without("bytelength"), "sense[0].value.bytelength", "missing", id="no-len"),
        pytest.param(value(bytelength=0), "sense[0].value.bytelength", "1 to 1024", id="len-0"),
        pytest.param(
            value(byte=1000, bytelength=25, type="string"),
            "sense[0].value.bytelength",
            "ends at byte 1025, past 1024",
            id="past-1024",
        ),
        pytest.param(value(bytelength=9), "sense[0].value.bytelength", "1 to 8", id="int-9"),
        pytest.param(
            value(type="uint", bytelength=9), "sense[0].value.bytelength", "1 to 8", id="uint-9"
        ),
        pytest.param(
            value(type="boolean", bytelength=9), "sense[0].value.bytelength", "1 to 8", id="bool-9"
        ),
        pytest.param(
            value(type="float", bytelength=3), "sense[0].value.bytelength", "2, 4 or 8", id="f3"
        ),
        pytest.param(value(signed="yes"), "sense[0].value.signed", "true or false", id="signed-s"),
        pytest.param(
            value(type="uint", signed=True), "sense[0].value.signed", "a uint is unsigned", id="us"
        ),
        pytest.param(
            value(type="float", bytelength=4, signed=False),
            "sense[0].value.signed",
            "always signed",
            id="float-unsigned",
        ),
        pytest.param(
            value(type="string", signed=False), "sense[0].value.signed", "string", id="str-signed"
        ),
        pytest.param(
            value(type="boolean", signed=True), "sense[0].value.signed", "boolean", id="bool-sign"
        ),
        pytest.param(value(byteorder="BIG"), "sense[0].value.byteorder", '"big"', id="order"),
        pytest.param(
            value(byteorder="network"), "sense[0].value.byteorder", "little", id="order-2"
        ),
        pytest.param(
            value(type="float", bytelength=4, bit=1), "sense[0].value.bit", "bit fields", id="fbit"
        ),
        pytest.param(
            value(type="string", bitlength=1), "sense[0].value.bit", "bit fields", id="sbit"
        ),
        pytest.param(value(bit=16), "sense[0].value.bit", "0 to 15, got 16", id="bit-past"),
        pytest.param(value(bit=-1), "sense[0].value.bit", "0 to 15", id="bit-neg"),
        pytest.param(value(bitlength=0), "sense[0].value.bitlength", "1 to 16", id="bitlen-0"),
        pytest.param(
            value(bit=10, bitlength=7),
            "sense[0].value.bitlength",
            "bits 10..16 do not fit a 2-byte field",
            id="bits-past",
        ),
        pytest.param(value(scale="2"), "sense[0].value.scale", "finite number", id="scale-str"),
        pytest.param(value(scale=True), "sense[0].value.scale", "finite number", id="scale-bool"),
        pytest.param(
            value(scale=math.inf), "sense[0].value.scale", "finite number", id="scale-inf"
        ),
        pytest.param(value(scale=0), "sense[0].value.scale", "must not be 0", id="scale-0"),
        pytest.param(value(scale=0.0), "sense[0].value.scale", "must not be 0", id="scale-0.0"),
        pytest.param(
            value(offset=math.nan), "sense[0].value.offset", "finite number", id="offset-nan"
        ),
        pytest.param(
            value(type="boolean", scale=2), "sense[0].value.scale", "boolean", id="bool-scale"
        ),
        pytest.param(
            value(type="string", offset=1), "sense[0].value.offset", "string", id="str-offset"
        ),
        pytest.param(
            {"sense": [asset(custom_type="location")]},
            "sense[0].custom_type",
            "location_lat, location_long",
            id="custom-type",
        ),
        pytest.param(
            {
                "sense": [
                    {
                        "asset": "lat",
                        "custom_type": "location_lat",
                        "value": {"byte": 0, "bytelength": 8, "type": "string"},
                    }
                ]
            },
            "sense[0].custom_type",
            "a location is a number, not a string",
            id="location-string",
        ),
        pytest.param(
            {"sense": [lat()]},
            "sense[0].custom_type",
            "location_lat needs an asset with location_long",
            id="lat-alone",
        ),
        pytest.param(
            {"sense": [ok("x"), lat("long", "location_long")]},
            "sense[1].custom_type",
            "location_long needs an asset with location_lat",
            id="long-alone",
        ),
        pytest.param(
            {"sense": [lat(), lat("lat2"), lat("long", "location_long")]},
            "sense[1].custom_type",
            r"a second location_lat \(the first is sense\[0\]\)",
            id="two-lat",
        ),
        pytest.param(
            {"sense": [ok("a"), ok("b"), ok("a", 1)]},
            "sense[2].asset",
            r"'a' repeats sense\[0\]",
            id="repeated",
        ),
        pytest.param(
            {"sense": [ok("car"), ok("car.fuel", 1)]},
            "sense[1].asset",
            r"'car' is already a value \(sense\[0\]\)",
            id="leaf-then-prefix",
        ),
        pytest.param(
            {"sense": [ok("car.engine.rpm"), ok("car.engine", 1)]},
            "sense[1].asset",
            r"'car.engine' is also an object for sense\[0\]",
            id="prefix-then-leaf",
        ),
    ],
)
def test_malformed_template(template: object, where: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message) as e:
        compile_template(template)
    assert e.value.where == where
    assert str(e.value) == (f"{where}: {e.value.message}" if where else e.value.message)


def test_limits_themselves_are_accepted() -> None:
    template = compile_template(
        {
            "sense": [
                {"asset": "x" * 128, "value": {"byte": 1023, "bytelength": 1, "type": "uint"}},
                *(ok(f"a{i}") for i in range(MAX_ASSETS - 1)),
            ]
        }
    )
    assert template.min_length == 1024
    document = template.translate(bytes(1023) + b"\x09").document
    assert document["x" * 128] == 9
    assert len(document) == MAX_ASSETS


def test_template_from_json_text_with_explicit_defaults() -> None:
    # What the API receives: JSON text, every optional key spelled out.
    text = """{"sense": [{"asset": "t", "value": {"byte": 0, "bytelength": 2, "type": "int",
        "signed": true, "byteorder": "big", "bit": 0, "bitlength": 16, "scale": 1,
        "offset": 0}}]}"""
    assert compile_template(json.loads(text)).translate(b"\xff\xfe").document == {"t": -2}
