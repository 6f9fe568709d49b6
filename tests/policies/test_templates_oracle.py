"""The compiled templates (policies/templates.py) against a second, naive implementation.

The oracle below reads every field straight from the template's JSON with slices and
int.from_bytes, one field at a time: none of the compiled path's merged struct formats, shared
slots or converter chains. Hypothesis draws templates (every type and length, both byte orders,
overlapping fields, bit fields, scale/offset, nesting) and payloads (short, exact, longer,
invalid UTF-8) and the two must agree.
"""

from __future__ import annotations

import json
import math
import struct
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.templates import PayloadError, compile_template

SCALES = [0.1, 0.01, 0.5, 2, 10, 1.8, 1e-7, -1, 0.25, 3.3]
OFFSETS = [0, -40, 32, 0.5, 273.15, -0.01, 1000]


class Short(Exception):
    pass


def naive_field(value: dict[str, Any], payload: bytes) -> Any:
    start = value["byte"]
    end = start + value["bytelength"]
    if len(payload) < end:
        raise Short
    chunk = payload[start:end]
    kind = value["type"]
    if kind == "string":
        while chunk.endswith(b"\x00"):
            chunk = chunk[:-1]
        return chunk.decode("utf-8")  # UnicodeDecodeError: the oracle's payload error
    if value.get("byteorder", "big") == "little":
        chunk = chunk[::-1]  # the oracle always reads big-endian
    if kind == "float":
        number = {2: ">e", 4: ">f", 8: ">d"}[len(chunk)]
        result = struct.unpack(number, chunk)[0]
        if "scale" in value or "offset" in value:
            result = result * value.get("scale", 1) + value.get("offset", 0)
        return result if math.isfinite(result) else None
    signed = kind == "int" and value.get("signed", True)
    raw = int.from_bytes(chunk, "big")
    width = 8 * len(chunk)
    if "bit" in value or "bitlength" in value:
        bit = value.get("bit", 0)
        width = value.get("bitlength", 1)
        raw = (raw >> bit) % (2**width)
    if signed and raw >= 2 ** (width - 1):
        raw -= 2**width
    if kind == "boolean":
        return raw != 0
    if "scale" not in value and "offset" not in value:
        return raw
    scale, offset = value.get("scale", 1), value.get("offset", 0)
    if isinstance(scale, int) and isinstance(offset, int):
        return raw * scale + offset
    # The documented meaning: the scale and offset as written, in exact decimal arithmetic.
    return Decimal(raw) * Decimal(repr(scale)) + Decimal(repr(offset))


def naive(template: dict[str, Any], payload: bytes) -> dict[str, Any]:
    # A short payload is refused before any field is read (a bad string included).
    for item in template["sense"]:
        if len(payload) < item["value"]["byte"] + item["value"]["bytelength"]:
            raise Short
    document: dict[str, Any] = {}
    for item in template["sense"]:
        *parents, leaf = item["asset"].split(".")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = naive_field(item["value"], payload)
    return document


def agrees(compiled: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return (
            isinstance(compiled, dict)
            and list(compiled) == list(expected)
            and all(agrees(compiled[key], expected[key]) for key in expected)
        )
    if isinstance(expected, Decimal):
        if not isinstance(compiled, float):
            return False
        # Exactly the nearest double while float arithmetic is precise enough to round back to
        # the value's decimals (the case of every sensor reading); close beyond that.
        places = -min(expected.as_tuple().exponent, 0)  # type: ignore[operator]
        if abs(expected) < Decimal(2**40) / 10**places:
            return compiled == float(expected)
        return math.isclose(compiled, float(expected), rel_tol=1e-12)
    return type(compiled) is type(expected) and compiled == expected


@st.composite
def field_values(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["int", "uint", "float", "boolean", "string"]))
    if kind == "float":
        length = draw(st.sampled_from([2, 4, 8]))
    elif kind == "string":
        length = draw(st.integers(1, 12))
    else:
        length = draw(st.integers(1, 8))
    value: dict[str, Any] = {"byte": draw(st.integers(0, 24)), "bytelength": length, "type": kind}
    if kind != "string" and draw(st.booleans()):
        value["byteorder"] = draw(st.sampled_from(["big", "little"]))
    if kind == "int" and draw(st.booleans()):
        value["signed"] = draw(st.booleans())
    if kind == "uint" and draw(st.booleans()):
        value["signed"] = False
    if kind in ("int", "uint", "boolean") and draw(st.booleans()):
        bit = draw(st.integers(0, 8 * length - 1))
        bitlength = draw(st.integers(1, 8 * length - bit))
        if bit or draw(st.booleans()):
            value["bit"] = bit
        if bitlength != 1 or draw(st.booleans()):
            value["bitlength"] = bitlength
    if kind in ("int", "uint", "float"):
        if draw(st.booleans()):
            value["scale"] = draw(st.sampled_from(SCALES))
        if draw(st.booleans()):
            value["offset"] = draw(st.sampled_from(OFFSETS))
    return value


@st.composite
def templates(draw: st.DrawFn) -> dict[str, Any]:
    values = draw(st.lists(field_values(), min_size=1, max_size=12))
    sense = []
    for index, value in enumerate(values):
        # Leaves are n<i>, groups g<j>/h<k>: names never collide, prefixes never are leaves.
        group = draw(st.sampled_from(["", "g0.", "g1.", "g0.h0.", "g1.h1."]))
        sense.append({"asset": f"{group}n{index}", "value": value})
    return {"sense": sense}


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    template = draw(templates())
    needed = max(item["value"]["byte"] + item["value"]["bytelength"] for item in template["sense"])
    size = draw(st.one_of(st.integers(0, needed + 4), st.just(needed)))
    payload = draw(
        st.one_of(
            st.binary(min_size=size, max_size=size),
            # Mostly printable bytes, so string fields are often valid UTF-8.
            st.lists(st.sampled_from(b"\x00AZaz09 \x7f"), min_size=size, max_size=size).map(bytes),
        )
    )
    return template, payload


@settings(max_examples=400, deadline=None)
@given(cases())
def test_compiled_agrees_with_naive_oracle(case: tuple[dict[str, Any], bytes]) -> None:
    template, payload = case
    compiled = compile_template(template)
    try:
        expected: dict[str, Any] | None = naive(template, payload)
        failure: type[Exception] | None = None
    except (Short, UnicodeDecodeError) as error:
        expected, failure = None, type(error)
    if expected is None:
        with pytest.raises(PayloadError) as refused:
            compiled.translate(payload)
        # A short payload says how short; a bad string does not.
        assert (refused.value.needed is not None) == (failure is Short)
        return
    result = compiled.translate(payload)
    assert agrees(result.document, expected), (result.document, expected)
    assert (result.latitude, result.longitude) == (None, None)


@settings(max_examples=300, deadline=None)
@given(templates(), st.binary(max_size=40))
def test_translation_is_json_serialisable(template: dict[str, Any], payload: bytes) -> None:
    compiled = compile_template(template)
    try:
        document = compiled.translate(payload).document
    except PayloadError:
        with pytest.raises(PayloadError):
            compiled.translate_json(payload)
        return
    # allow_nan=False: a NaN or infinity slipping through would make invalid JSON (RFC 8259 §6).
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    # The JSON text written straight from the values is, byte for byte, what encoding the
    # document gives (the API publishes the former).
    text, _, _ = compiled.translate_json(payload)
    assert text == json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
