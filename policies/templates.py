"""Binary payload templates → JSON (issue 17), pure: no I/O.

A template is the JSON format of the platform's translation service (a subset of the Binary
Conversion Language): ``{"sense": [{"asset": NAME, "value": {"byte": OFFSET, "bytelength": N,
"type": "int"|"uint"|"float"|"boolean"|"string", "signed": BOOL, "byteorder": "big"|"little"},
"custom_type"?: "location_lat"|"location_long"}, ...]}``. The rules:

- big-endian unless ``"byteorder": "little"``; ``int`` is signed unless ``"signed": false``,
  ``uint`` is unsigned; int/uint/boolean are 1 to 8 bytes (3, 5, 6, 7 too), a float 2 (IEEE
  half), 4 or 8; a boolean is true when any bit is set; a string is N bytes of UTF-8 with its
  trailing NULs dropped. NaN and infinities become null (RFC 8259 §6: JSON has neither).
- Extensions: ``"bit"`` / ``"bitlength"`` (defaults 0 / 1) take a bit field of an int, uint or
  boolean, bit 0 being the least significant bit of the whole field; an int bit field is two's
  complement over its own width (use uint for flags). ``"scale"`` / ``"offset"`` give
  value * scale + offset for numbers; integers with integer factors stay integers, with a
  decimal factor the result is rounded to the factors' decimals (215 * 0.1 → 21.5).
- A dotted asset name nests (``car.fuel`` → ``{"car": {"fuel": …}}``); a repeated name, or one
  that is both a value and an object, is refused.
- ``custom_type`` location_lat / location_long: both or neither, at most one of each, a float
  (or an int/uint with a scale, e.g. degrees × 10⁷); they stay in the document too, and give
  the Translation's position when both are finite and within ±90 / ±180.
- Unknown keys are refused (a misspelt ``bytelenght`` must not pass silently); at most 256
  assets, names of 1 to 128 characters, every field within the first 1024 bytes.

A template is compiled once (the API caches compiled templates by their immutable id): every
field becomes a slot in a few precomputed ``struct.Struct`` objects (non-overlapping fields of
one byte order merge into one format with padding), plus a small converter where the raw value
needs one (bit field, scale, 3-byte integer, NaN, string). Translating a message is then one
``unpack_from`` per merged format and one pass over the fields, never a walk over the JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

MAX_ASSETS: Final = 256
# RFC 7252 §4.6: 1024 bytes is the payload size that fits an IP datagram without fragmentation
# in any case; a field beyond it could never be filled by a single CoAP message.
MAX_PAYLOAD: Final = 1024
MAX_NAME: Final = 128

TYPES: Final = ("int", "uint", "float", "boolean", "string")
LOCATION_TYPES: Final = ("location_lat", "location_long")
SENSE_KEYS: Final = frozenset({"asset", "value", "custom_type"})
VALUE_KEYS: Final = frozenset(
    {"byte", "bytelength", "type", "signed", "byteorder", "bit", "bitlength", "scale", "offset"}
)

# struct codes of the integer widths struct reads natively (unsigned, signed).
_INT_CODES: Final = {1: ("B", "b"), 2: ("H", "h"), 4: ("I", "i"), 8: ("Q", "q")}
_FLOAT_CODES: Final = {2: "e", 4: "f", 8: "d"}


class TemplateError(ValueError):
    """A template that cannot be compiled. `where` names the place: "sense[2].value.bytelength"
    ("" for the template as a whole)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


class PayloadError(ValueError):
    """A payload the template cannot translate (too short: `needed`, `got`; a string field that
    is not UTF-8). The device gets 4.00, nothing is published."""

    def __init__(self, message: str, *, needed: int | None = None, got: int | None = None) -> None:
        super().__init__(message)
        self.needed = needed
        self.got = got


@dataclass(frozen=True)
class Translation:
    document: dict[str, Any]  # the JSON object (dotted asset names nested)
    latitude: float | None  # from the asset with custom_type location_lat (None: no valid fix)
    longitude: float | None  # ... location_long; both None unless both are valid


Converter = Callable[[Any], Any]
# A nesting plan: (key, index into the values) or (key, sub-plan), in first-appearance order.
Plan = list[tuple[str, "int | Plan"]]


class Template:
    """A compiled template; build it with compile_template()."""

    __slots__ = (
        "_fields",
        "_flat_keys",
        "_json_format",
        "_json_order",
        "_lanes",
        "_location",
        "_plan",
        "min_length",
    )

    def __init__(
        self,
        min_length: int,
        lanes: Sequence[tuple[struct.Struct, int]],
        fields: Sequence[tuple[int, Converter | None]],
        flat_keys: tuple[str, ...] | None,
        plan: Plan,
        location: tuple[int, int] | None,
    ) -> None:
        self.min_length = min_length
        self._lanes = tuple(lanes)
        self._fields = tuple(fields)
        self._flat_keys = flat_keys
        self._plan = plan
        self._location = location
        self._json_format, self._json_order = _json_layout(plan)

    def translate(self, payload: bytes) -> Translation:
        """The JSON document for this payload; PayloadError when it is too short or a string
        field is not UTF-8. Bytes past the last field are ignored (a newer firmware may append
        fields an older template does not know yet)."""
        values = self._values(payload)
        keys = self._flat_keys
        document = (
            dict(zip(keys, values, strict=True)) if keys is not None else _build(self._plan, values)
        )
        latitude, longitude = self._position(values)
        return Translation(document, latitude, longitude)

    def translate_json(self, payload: bytes) -> tuple[str, float | None, float | None]:
        """What :meth:`translate` gives, with the document as compact JSON text: exactly
        ``json.dumps(document, separators=(",", ":"), ensure_ascii=False)``, written into a
        text laid out once per template instead of building the dicts and encoding them
        (about half the cost per message). PayloadError as for :meth:`translate`."""
        values = self._values(payload)
        text = self._json_format % tuple([_json_scalar(values[i]) for i in self._json_order])
        latitude, longitude = self._position(values)
        return text, latitude, longitude

    def _position(self, values: list[Any]) -> tuple[float | None, float | None]:
        if self._location is None:
            return None, None
        latitude, longitude = values[self._location[0]], values[self._location[1]]
        if _valid_degrees(latitude, 90.0) and _valid_degrees(longitude, 180.0):
            return float(latitude), float(longitude)
        return None, None

    def _values(self, payload: bytes) -> list[Any]:
        got = len(payload)
        if got < self.min_length:
            raise PayloadError(
                f"payload is {got} bytes, the template needs {self.min_length}",
                needed=self.min_length,
                got=got,
            )
        lanes = self._lanes
        if len(lanes) == 1:
            layout, start = lanes[0]
            raws = layout.unpack_from(payload, start)
        else:
            raws = tuple(
                itertools.chain.from_iterable(
                    layout.unpack_from(payload, start) for layout, start in lanes
                )
            )
        return [
            raws[slot] if convert is None else convert(raws[slot]) for slot, convert in self._fields
        ]


_encode_text = json.encoder.encode_basestring  # what json.dumps uses with ensure_ascii=False


def _json_scalar(value: Any) -> str:
    """One value as json.dumps writes it (RFC 8259 §6, §7): the values a template yields are
    int, float (finite: NaN and infinities are already None), bool, str or None."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return float.__repr__(value)
    if kind is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(_encode_text(value))


def _json_layout(plan: Plan) -> tuple[str, tuple[int, ...]]:
    """The document's JSON text with a ``%s`` where each value goes, and which value goes
    where (the plan's order: first appearance, as the dicts of :func:`_build` keep it)."""
    order: list[int] = []

    def layout(node: Plan) -> str:
        members = []
        for key, entry in node:
            name = str(_encode_text(key)).replace("%", "%%")
            if isinstance(entry, int):
                order.append(entry)
                members.append(f"{name}:%s")
            else:
                members.append(f"{name}:{layout(entry)}")
        return "{" + ",".join(members) + "}"

    return layout(plan), tuple(order)


def _build(plan: Plan, values: list[Any]) -> dict[str, Any]:
    return {
        key: values[entry] if isinstance(entry, int) else _build(entry, values)
        for key, entry in plan
    }


def _valid_degrees(value: object, limit: float) -> bool:
    # A NaN / out-of-range fix (a GPS without a fix often sends NaN or a sentinel) keeps the
    # device's last location instead of failing the message; the document still carries it.
    return isinstance(value, int | float) and -limit <= value <= limit


@dataclass
class _Field:
    """One validated asset, before the slots are laid out."""

    name: str
    byte: int
    length: int
    kind: str
    signed: bool
    little: bool
    bit: int | None
    bitlength: int | None
    scale: int | float | None
    offset: int | float | None
    custom: str | None


def compile_template(raw: object) -> Template:
    """Validate a template (the parsed JSON) and compile it; TemplateError says where it fails."""
    if not isinstance(raw, dict):
        raise TemplateError("", 'a template is a JSON object {"sense": [...]}')
    for key in raw:
        if key != "sense":
            raise TemplateError(str(key), 'unknown key (a template has only "sense")')
    sense = raw.get("sense")
    if sense is None:
        raise TemplateError("sense", "missing")
    if not isinstance(sense, list):
        raise TemplateError("sense", "must be a list of assets")
    if not sense:
        raise TemplateError("sense", "needs at least one asset")
    if len(sense) > MAX_ASSETS:
        raise TemplateError("sense", f"at most {MAX_ASSETS} assets, got {len(sense)}")
    fields = [_parse_field(item, f"sense[{index}]") for index, item in enumerate(sense)]
    plan, flat = _nesting(fields)
    location = _location(fields)
    slots, lanes = _layout(fields)
    compiled = [(slots[_slot_key(field)], _converter(field)) for field in fields]
    return Template(
        min_length=max(field.byte + field.length for field in fields),
        lanes=lanes,
        fields=compiled,
        flat_keys=tuple(field.name for field in fields) if flat else None,
        plan=plan,
        location=location,
    )


def _parse_field(item: object, where: str) -> _Field:
    if not isinstance(item, dict):
        raise TemplateError(where, 'an asset is an object {"asset": NAME, "value": {...}}')
    for key in item:
        if key not in SENSE_KEYS:
            raise TemplateError(f"{where}.{key}", "unknown key")
    name = item.get("asset")
    if not isinstance(name, str):
        raise TemplateError(f"{where}.asset", "missing or not a string")
    if not 0 < len(name) <= MAX_NAME:
        raise TemplateError(f"{where}.asset", f"must be 1 to {MAX_NAME} characters")
    if "" in name.split("."):
        raise TemplateError(f"{where}.asset", f"{name!r} has an empty part between dots")
    custom = item.get("custom_type")
    if custom is not None and custom not in LOCATION_TYPES:
        raise TemplateError(f"{where}.custom_type", f"must be one of {', '.join(LOCATION_TYPES)}")
    value = item.get("value")
    at = f"{where}.value"
    if not isinstance(value, dict):
        raise TemplateError(at, "missing or not an object")
    for key in value:
        if key not in VALUE_KEYS:
            raise TemplateError(f"{at}.{key}", "unknown key")
    kind = value.get("type")
    if kind not in TYPES:
        raise TemplateError(f"{at}.type", f"missing or not one of {', '.join(TYPES)}")
    byte = _integer(value, "byte", at, 0, MAX_PAYLOAD - 1)
    length = _integer(value, "bytelength", at, 1, MAX_PAYLOAD)
    if byte + length > MAX_PAYLOAD:
        raise TemplateError(
            f"{at}.bytelength", f"the field ends at byte {byte + length}, past {MAX_PAYLOAD}"
        )
    if kind in ("int", "uint", "boolean") and length > 8:
        raise TemplateError(f"{at}.bytelength", f"an {kind} is 1 to 8 bytes")
    if kind == "float" and length not in _FLOAT_CODES:
        raise TemplateError(f"{at}.bytelength", "a float is 2, 4 or 8 bytes (IEEE 754)")

    signed = _signed(value, kind, at)
    order = value.get("byteorder", "big")
    if order not in ("big", "little"):
        raise TemplateError(f"{at}.byteorder", 'must be "big" or "little"')

    bit = bitlength = None
    if "bit" in value or "bitlength" in value:
        if kind not in ("int", "uint", "boolean"):
            raise TemplateError(f"{at}.bit", "bit fields apply to int, uint and boolean")
        width = 8 * length
        bit = _integer(value, "bit", at, 0, width - 1) if "bit" in value else 0
        bitlength = _integer(value, "bitlength", at, 1, width) if "bitlength" in value else 1
        if bit + bitlength > width:
            raise TemplateError(
                f"{at}.bitlength",
                f"bits {bit}..{bit + bitlength - 1} do not fit a {length}-byte field",
            )

    scale = _number(value, "scale", at, kind)
    offset = _number(value, "offset", at, kind)
    if scale == 0:
        raise TemplateError(f"{at}.scale", "must not be 0")
    if custom is not None and kind not in ("int", "uint", "float"):
        raise TemplateError(f"{where}.custom_type", f"a location is a number, not a {kind}")
    return _Field(
        name, byte, length, kind, signed, order == "little", bit, bitlength, scale, offset, custom
    )


def _integer(value: dict[str, Any], key: str, at: str, low: int, high: int) -> int:
    number = value.get(key)
    if number is None:
        raise TemplateError(f"{at}.{key}", "missing")
    if isinstance(number, bool) or not isinstance(number, int):
        raise TemplateError(f"{at}.{key}", f"must be an integer, got {number!r}")
    if not low <= number <= high:
        raise TemplateError(f"{at}.{key}", f"must be {low} to {high}, got {number}")
    return number


def _signed(value: dict[str, Any], kind: str, at: str) -> bool:
    if "signed" not in value:
        return kind in ("int", "float")
    signed = value["signed"]
    if not isinstance(signed, bool):
        raise TemplateError(f"{at}.signed", "must be true or false")
    if kind == "uint" and signed:
        raise TemplateError(f"{at}.signed", 'a uint is unsigned: use "type": "int"')
    if kind == "float" and not signed:
        raise TemplateError(f"{at}.signed", "an IEEE 754 float is always signed")
    if kind in ("boolean", "string"):
        raise TemplateError(f"{at}.signed", f"does not apply to a {kind}")
    return signed


def _number(value: dict[str, Any], key: str, at: str, kind: str) -> int | float | None:
    if key not in value:
        return None
    number = value[key]
    if kind not in ("int", "uint", "float"):
        raise TemplateError(f"{at}.{key}", f"does not apply to a {kind}")
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise TemplateError(f"{at}.{key}", f"must be a finite number, got {number!r}")
    return number


def _nesting(fields: list[_Field]) -> tuple[Plan, bool]:
    """The nesting plan of the dotted names; refuses a repeated name or one that is both a
    value and an object (``car`` and ``car.fuel``): the JSON could not hold both."""
    leaves: dict[str, int] = {}
    prefixes: dict[str, int] = {}
    root: Plan = []
    for index, field in enumerate(fields):
        where = f"sense[{index}].asset"
        if field.name in leaves:
            raise TemplateError(where, f"{field.name!r} repeats sense[{leaves[field.name]}]")
        if field.name in prefixes:
            other = prefixes[field.name]
            raise TemplateError(
                where,
                f"{field.name!r} is also an object for sense[{other}] ({fields[other].name!r})",
            )
        parts = field.name.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if prefix in leaves:
                raise TemplateError(
                    where, f"{prefix!r} is already a value (sense[{leaves[prefix]}])"
                )
            prefixes.setdefault(prefix, index)
        leaves[field.name] = index
        node = root
        for part in parts[:-1]:
            for key, entry in node:
                if key == part and not isinstance(entry, int):
                    node = entry
                    break
            else:
                child: Plan = []
                node.append((part, child))
                node = child
        node.append((parts[-1], index))
    return root, not prefixes


def _location(fields: list[_Field]) -> tuple[int, int] | None:
    found: dict[str, int] = {}
    for index, field in enumerate(fields):
        if field.custom is None:
            continue
        if field.custom in found:
            raise TemplateError(
                f"sense[{index}].custom_type",
                f"a second {field.custom} (the first is sense[{found[field.custom]}])",
            )
        found[field.custom] = index
    if not found:
        return None
    for mine, other in (LOCATION_TYPES, LOCATION_TYPES[::-1]):
        if mine in found and other not in found:
            raise TemplateError(
                f"sense[{found[mine]}].custom_type", f"{mine} needs an asset with {other}"
            )
    return found["location_lat"], found["location_long"]


def _code(field: _Field) -> str:
    """The struct code that reads the field's raw value."""
    if field.kind == "string" or (field.kind != "float" and field.length not in _INT_CODES):
        return f"{field.length}s"  # strings, and 3/5/6/7-byte integers (int.from_bytes)
    if field.kind == "float":
        return _FLOAT_CODES[field.length]
    # Bit fields and booleans read the field unsigned; the converter applies the sign.
    signed = field.signed and field.kind == "int" and field.bit is None
    return _INT_CODES[field.length][signed]


def _slot_key(field: _Field) -> tuple[int, str, bool | None]:
    code = _code(field)
    # One-byte and byte-string reads do not depend on the byte order: share them.
    order_free = code.endswith("s") or code in ("b", "B")
    return field.byte, code, None if order_free else field.little


def _layout(
    fields: list[_Field],
) -> tuple[dict[tuple[int, str, bool | None], int], list[tuple[struct.Struct, int]]]:
    """Merge the distinct raw reads into as few struct formats as the overlaps allow: a lane is
    a run of non-overlapping reads of one byte order, read with one unpack_from."""
    keys = sorted({_slot_key(field) for field in fields})
    littles = sum(1 for _, _, little in keys if little)
    bigs = sum(1 for _, _, little in keys if little is False)
    dominant = littles > bigs
    lanes: list[tuple[bool, list[tuple[int, str, tuple[int, str, bool | None]]]]] = []
    for key in sorted(keys, key=lambda key: (key[0], -struct.calcsize(key[1]))):
        byte, code, little = key
        order = dominant if little is None else little
        for lane_order, reads in lanes:
            last_byte, last_code, _ = reads[-1]
            if lane_order == order and last_byte + struct.calcsize(last_code) <= byte:
                reads.append((byte, code, key))
                break
        else:
            lanes.append((order, [(byte, code, key)]))
    slots: dict[tuple[int, str, bool | None], int] = {}
    built: list[tuple[struct.Struct, int]] = []
    for order, reads in lanes:
        start = cursor = reads[0][0]
        parts = ["<" if order else ">"]
        for byte, code, key in reads:
            if byte > cursor:
                parts.append(f"{byte - cursor}x")
            parts.append(code)
            cursor = byte + struct.calcsize(code)
            slots[key] = len(slots)
        built.append((struct.Struct("".join(parts)), start))
    return slots, built


def _decimals(number: int | float) -> int:
    exponent = Decimal(repr(number)).as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _converter(field: _Field) -> Converter | None:
    """The per-field step from the raw struct value to the JSON value; None: use it as is."""
    kind = field.kind
    if kind == "string":
        return _string_converter(field)
    steps: list[Converter] = []
    code = _code(field)
    if code.endswith("s"):
        order: Any = "little" if field.little else "big"
        signed = field.signed and kind == "int" and field.bit is None
        steps.append(lambda raw: int.from_bytes(raw, order, signed=signed))
    if kind == "boolean":
        # One step for the common flag (a bit of a status byte): no chained calls per message.
        steps.append(_bool_bits(field.bit, field.bitlength) if field.bit is not None else bool)
    elif field.bit is not None and field.bitlength is not None:
        steps.append(_bits(field.bit, field.bitlength, field.signed and kind == "int"))
    if field.scale is not None or field.offset is not None:
        steps.append(_scaling(field))
    if kind == "float" and field.scale is None and field.offset is None:
        steps.append(_finite)
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]
    chain = tuple(steps)

    def convert(raw: Any) -> Any:
        for step in chain:
            raw = step(raw)
        return raw

    return convert


def _string_converter(field: _Field) -> Converter:
    name, first, last = field.name, field.byte, field.byte + field.length - 1

    def convert(raw: bytes) -> str:
        try:
            return raw.rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError(f"asset {name!r}: bytes {first}..{last} are not UTF-8") from None

    return convert


def _bits(bit: int, bitlength: int, signed: bool) -> Converter:
    mask = (1 << bitlength) - 1
    if not signed:
        return lambda raw: (raw >> bit) & mask
    sign = 1 << (bitlength - 1)
    # Two's complement over the field's own width: bits 0b111 of a 3-bit int field are -1.
    return lambda raw: (((raw >> bit) & mask) ^ sign) - sign


def _bool_bits(bit: int, bitlength: int | None) -> Converter:
    mask = ((1 << (bitlength or 1)) - 1) << bit
    return lambda raw: raw & mask != 0


def _finite(value: float) -> float | None:
    # JSON has no NaN or infinity (RFC 8259 §6): null stands for them.
    return value if math.isfinite(value) else None


def _scaling(field: _Field) -> Converter:
    scale = 1 if field.scale is None else field.scale
    offset = 0 if field.offset is None else field.offset
    if field.kind == "float":
        return lambda raw: _finite(raw * scale + offset)
    if isinstance(scale, int) and isinstance(offset, int):
        return lambda raw: raw * scale + offset
    # An integer times a decimal scale has at most as many decimals as scale and offset:
    # rounding to them turns 215 * 0.1 = 21.500000000000004 back into 21.5.
    places = max(_decimals(scale), _decimals(offset))
    return lambda raw: round(raw * scale + offset, places)
