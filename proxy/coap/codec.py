"""CoAP message codec (RFC 7252 §3).

Hand-written for the hot path: a decode is a handful of slicing operations, with none of the
per-option object churn of a general-purpose library (docs/ARCHITECTURE.md, "Own message
layer"). Every message format error of RFC 7252 §3 / §4.1 raises :class:`FormatError`,
carrying the type and MID when the header could be read so the messaging layer can Reset a CON
(§4.2) and silently drop a NON (§4.3).
"""

from __future__ import annotations

import struct

CON, NON, ACK, RST = 0, 1, 2, 3
TYPE_NAMES = ("CON", "NON", "ACK", "RST")

PAYLOAD_MARKER = 0xFF
_HEADER = struct.Struct("!BBH")


class FormatError(Exception):
    """A datagram that violates the message format; ``mtype``/``mid`` are -1 when unreadable."""

    def __init__(self, reason: str, mtype: int = -1, mid: int = -1) -> None:
        super().__init__(reason)
        self.mtype = mtype
        self.mid = mid


class Message:
    """One CoAP message. ``options`` is a list of ``(number, value)`` in ascending order."""

    __slots__ = ("code", "mid", "mtype", "options", "payload", "token")

    def __init__(
        self,
        mtype: int,
        code: int,
        mid: int,
        token: bytes = b"",
        options: list[tuple[int, bytes]] | None = None,
        payload: bytes = b"",
    ) -> None:
        self.mtype = mtype
        self.code = code
        self.mid = mid
        self.token = token
        self.options: list[tuple[int, bytes]] = options if options is not None else []
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.mtype == other.mtype
            and self.code == other.code
            and self.mid == other.mid
            and self.token == other.token
            and self.options == other.options
            and self.payload == other.payload
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"Message({TYPE_NAMES[self.mtype]}, {self.code >> 5}.{self.code & 31:02d}, "
            f"mid={self.mid}, token={self.token.hex()}, options={self.options!r}, "
            f"payload={self.payload[:32]!r})"
        )


class Unreadable(Exception):
    """Too short for a header or not version 1: RFC 7252 §3 says silently ignore."""


def decode(data: bytes) -> Message:
    """Decode one datagram. Raises :class:`Unreadable` or :class:`FormatError`."""
    if len(data) < 4:
        raise Unreadable("shorter than the 4-byte header")
    first, code, mid = _HEADER.unpack_from(data)
    if first >> 6 != 1:
        raise Unreadable("unknown version")
    mtype = (first >> 4) & 0x03
    tkl = first & 0x0F
    if tkl > 8:
        raise FormatError("token length 9-15 is reserved", mtype, mid)
    end = len(data)
    if code == 0:
        # Empty message: exactly the 4-byte header (§4.1).
        if tkl or end != 4:
            raise FormatError("empty message with token, options or payload", mtype, mid)
        return Message(mtype, 0, mid)
    cls = code >> 5
    if cls == 1 or cls >= 6:
        raise FormatError("reserved code class", mtype, mid)
    pos = 4 + tkl
    if pos > end:
        raise FormatError("token runs past the datagram", mtype, mid)
    token = data[4:pos]
    options: list[tuple[int, bytes]] = []
    number = 0
    while pos < end:
        byte = data[pos]
        if byte == PAYLOAD_MARKER:
            if pos + 1 == end:
                raise FormatError("payload marker followed by no payload", mtype, mid)
            return Message(mtype, code, mid, token, options, data[pos + 1 :])
        pos += 1
        delta = byte >> 4
        length = byte & 0x0F
        if delta >= 13:
            if delta == 13:
                if pos >= end:
                    raise FormatError("option delta runs past the datagram", mtype, mid)
                delta = data[pos] + 13
                pos += 1
            elif delta == 14:
                if pos + 2 > end:
                    raise FormatError("option delta runs past the datagram", mtype, mid)
                delta = (data[pos] << 8 | data[pos + 1]) + 269
                pos += 2
            else:
                raise FormatError("option delta nibble 15", mtype, mid)
        if length >= 13:
            if length == 13:
                if pos >= end:
                    raise FormatError("option length runs past the datagram", mtype, mid)
                length = data[pos] + 13
                pos += 1
            elif length == 14:
                if pos + 2 > end:
                    raise FormatError("option length runs past the datagram", mtype, mid)
                length = (data[pos] << 8 | data[pos + 1]) + 269
                pos += 2
            else:
                raise FormatError("option length nibble 15", mtype, mid)
        number += delta
        stop = pos + length
        if stop > end:
            raise FormatError("option value runs past the datagram", mtype, mid)
        options.append((number, data[pos:stop]))
        pos = stop
    return Message(mtype, code, mid, token, options, b"")


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def encode_parts(
    mtype: int,
    code: int,
    mid: int,
    token: bytes,
    options: list[tuple[int, bytes]],
    payload: bytes,
) -> bytes:
    """Encode without building a :class:`Message`. ``options`` must be sorted by number."""
    out = bytearray(_HEADER.pack(0x40 | (mtype << 4) | len(token), code, mid))
    out += token
    previous = 0
    for number, value in options:
        delta_nibble, delta_ext = _nibble(number - previous)
        length_nibble, length_ext = _nibble(len(value))
        out.append((delta_nibble << 4) | length_nibble)
        out += delta_ext
        out += length_ext
        out += value
        previous = number
    if payload:
        out.append(PAYLOAD_MARKER)
        out += payload
    return bytes(out)


def encode(message: Message) -> bytes:
    """Encode ``message``; options are sorted by number (stable, so repeats keep their order)."""
    options = sorted(message.options, key=lambda option: option[0])
    return encode_parts(
        message.mtype, message.code, message.mid, message.token, options, message.payload
    )


def encode_empty(mtype: int, mid: int) -> bytes:
    """An Empty ACK or RST (§4.2): the header only."""
    return _HEADER.pack(0x40 | (mtype << 4), 0, mid)


def uint_bytes(value: int) -> bytes:
    """uint option value in the fewest bytes; 0 is the empty string (§3.2)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def parse_uint(value: bytes) -> int:
    return int.from_bytes(value, "big")
