"""Our CoAP codec against aiocoap as an oracle (RFC 7252 §3).

Two properties:

(a) For valid messages built by hypothesis, our encoding is byte-for-byte aiocoap's encoding,
    aiocoap decodes ours to the same fields, and we decode aiocoap's to the same fields.
(b) For arbitrary and near-valid datagrams, whenever both decoders accept, they agree on type,
    code, MID, token, options and payload.

aiocoap interprets option values (uint, string, block, content-format), so option values are
compared in aiocoap's canonical encoding: ``OptionNumber(n).create_option(decode=raw).encode()``.
That strips leading zero bytes from uint options; a string option that is not UTF-8 makes
aiocoap's decode fail, whereas our codec keeps option values as opaque bytes. That is the only
case where we accept and aiocoap rejects.

aiocoap 0.4.17 accepts these datagrams, which RFC 7252 §3 makes message format errors
(or reserves) and which our codec rejects with :class:`FormatError` (RFC 7252 §4.2, §4.3: CON
→ RST, NON → silently dropped):

* token length 9–15 (aiocoap takes up to 15 bytes as the token);
* a token length longer than the rest of the datagram (aiocoap takes the shorter token);
* a payload marker followed by no payload (aiocoap returns an empty payload);
* an Empty message (code 0.00) with a token, options or a payload (§4.1);
* a code in the reserved classes 1, 6 and 7 (§12.1).

:data:`AIOCOAP_LENIENCIES` pins each of them; property (b) checks that whenever aiocoap accepts
and we reject, the datagram falls in exactly these classes.
"""

from __future__ import annotations

from typing import Any

import aiocoap
import pytest
from aiocoap.error import UnparsableMessage
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import StringOption
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from proxy.coap.codec import FormatError, Message, Unreadable, decode, encode

Fields = tuple[int, int, int, bytes, list[tuple[int, bytes]], bytes]

PROPERTY_SETTINGS = settings(max_examples=400, deadline=None)


def canonical(number: int, raw: bytes) -> bytes:
    """The option value as aiocoap re-encodes it after interpreting it."""
    return bytes(OptionNumber(number).create_option(decode=raw).encode())


def aiocoap_fields(message: Any) -> Fields:
    return (
        int(message.mtype),
        int(message.code),
        int(message.mid),
        bytes(message.token),
        [(int(option.number), bytes(option.encode())) for option in message.opt.option_list()],
        bytes(message.payload),
    )


def our_fields(message: Message, *, canonicalise: bool = False) -> Fields:
    opts = [
        (number, canonical(number, value) if canonicalise else value)
        for number, value in message.options
    ]
    return (message.mtype, message.code, message.mid, message.token, opts, message.payload)


def to_aiocoap(message: Message) -> Any:
    """Build the aiocoap message through attributes, as its own ``decode`` does (the mid,
    mtype and token constructor arguments are deprecated)."""
    result = aiocoap.Message(code=message.code, payload=message.payload)
    result.mid = message.mid
    result.mtype = Type(message.mtype)
    result.token = message.token
    for number, value in message.options:
        result.opt.add_option(OptionNumber(number).create_option(decode=value))
    return result


def aiocoap_decode(data: bytes) -> Any | None:
    try:
        return aiocoap.Message.decode(data)
    except (UnparsableMessage, UnicodeDecodeError):
        return None


def our_decode(data: bytes) -> Message | None:
    # Any other exception is a bug in the codec and must fail the test.
    try:
        return decode(data)
    except (Unreadable, FormatError):
        return None


def reads_as_aiocoap(number: int, value: bytes) -> bool:
    try:
        canonical(number, value)
    except UnicodeDecodeError:
        return False
    return True


# --- strategies ---------------------------------------------------------------------------------


@st.composite
def option_values(draw: st.DrawFn, number: int) -> bytes:
    raw = draw(st.binary(max_size=300))
    if OptionNumber(number).format is StringOption:
        raw = raw.decode("utf-8", "replace").encode("utf-8")
    return canonical(number, raw)


@st.composite
def valid_messages(draw: st.DrawFn) -> Message:
    numbers = draw(st.lists(st.integers(1, 2000), max_size=6))
    opts = sorted(
        ((number, draw(option_values(number))) for number in numbers),
        key=lambda option: option[0],
    )
    return Message(
        mtype=draw(st.integers(0, 3)),
        code=draw(st.one_of(st.integers(1, 31), st.integers(0x40, 0xBF))),
        mid=draw(st.integers(0, 0xFFFF)),
        token=draw(st.binary(max_size=8)),
        options=opts,
        payload=draw(st.binary(max_size=100)),
    )


@st.composite
def near_valid_datagrams(draw: st.DrawFn) -> bytes:
    """A valid encoding with one corruption: truncation, a flipped byte, an inserted byte,
    a trailing marker, or a rewritten first byte (type/TKL)."""
    data = bytearray(encode(draw(valid_messages())))
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "marker", "first", "code"]))
    if kind == "truncate":
        del data[draw(st.integers(4, len(data))) :]
    elif kind == "flip" and len(data) > 4:
        data[draw(st.integers(4, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "insert":
        data.insert(draw(st.integers(4, len(data))), draw(st.integers(0, 255)))
    elif kind == "marker":
        data.append(0xFF)
    elif kind == "first":
        data[0] = 0x40 | draw(st.integers(0, 0x3F))
    elif kind == "code":
        data[1] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def version_1_datagrams(draw: st.DrawFn) -> bytes:
    return bytes((0x40 | draw(st.integers(0, 0x3F)),)) + draw(st.binary(max_size=63))


# --- (a) valid messages ---------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(valid_messages())
def test_encoding_matches_aiocoap(message: Message) -> None:
    ours = encode(message)
    assert ours == to_aiocoap(message).encode()
    assert aiocoap_fields(aiocoap.Message.decode(ours)) == our_fields(message)


@PROPERTY_SETTINGS
@given(valid_messages())
def test_we_decode_what_aiocoap_encodes(message: Message) -> None:
    assert our_fields(decode(to_aiocoap(message).encode())) == our_fields(message)


@pytest.mark.parametrize(("mtype", "mid"), [(0, 0), (1, 0x1234), (2, 0xFFFF), (3, 7)])
def test_empty_message_matches_aiocoap(mtype: int, mid: int) -> None:
    message = Message(mtype, 0, mid)
    assert aiocoap_fields(aiocoap.Message.decode(encode(message))) == our_fields(message)
    assert decode(to_aiocoap(message).encode()) == message


# --- (b) arbitrary datagrams ----------------------------------------------------------------


def is_known_leniency(data: bytes, theirs: Any) -> bool:
    """Whether ``data`` is one of the format errors aiocoap lets through (module docstring)."""
    tkl, code = data[0] & 0x0F, data[1]
    return (
        tkl > 8
        or code >> 5 in (1, 6, 7)
        or (code == 0 and len(data) > 4)
        or 4 + tkl > len(data)
        or (data.endswith(b"\xff") and theirs.payload == b"")
    )


@PROPERTY_SETTINGS
@given(st.one_of(st.binary(max_size=64), version_1_datagrams(), near_valid_datagrams()))
@example(b"\x40\x01\x00\x01\xff")
@example(b"\x4f\x01\x00\x01" + bytes(15))
@example(b"\x40\x01\x00\x01\xb2\xc3\x28")  # Uri-Path that is not UTF-8
def test_decoders_agree_when_both_accept(data: bytes) -> None:
    ours = our_decode(data)
    theirs = aiocoap_decode(data)
    event(f"ours={'ok' if ours else 'reject'} aiocoap={'ok' if theirs else 'reject'}")
    if ours is not None and theirs is not None:
        assert our_fields(ours, canonicalise=True) == aiocoap_fields(theirs)
    elif ours is not None:
        # We keep option values opaque; aiocoap fails only on a string option that is not
        # UTF-8, so re-reading each of our options as aiocoap would must fail too.
        assert not all(reads_as_aiocoap(number, value) for number, value in ours.options)
    elif theirs is not None:
        assert is_known_leniency(data, theirs), data.hex()
        with pytest.raises(FormatError):
            decode(data)


# --- the known differences, one row each --------------------------------------------------------

AIOCOAP_LENIENCIES = [
    pytest.param(b"\x4f\x01\x00\x01" + bytes(15), id="tkl-15"),
    pytest.param(b"\x59\x01\x00\x01" + bytes(9), id="tkl-9"),
    pytest.param(b"\x48\x01\x00\x01abc", id="token-past-end"),
    pytest.param(b"\x40\x02\x00\x01\xff", id="marker-no-payload"),
    pytest.param(b"\x40\x45\x00\x01\xc1\x00\xff", id="marker-no-payload-after-option"),
    pytest.param(b"\x41\x00\x00\x01\xaa", id="empty-with-token"),
    pytest.param(b"\x60\x00\x00\x01\xb0", id="empty-with-option"),
    pytest.param(b"\x70\x00\x00\x01\xffx", id="empty-with-payload"),
    pytest.param(b"\x40\x20\x00\x01", id="class-1"),
    pytest.param(b"\x40\xc0\x00\x01", id="class-6"),
    pytest.param(b"\x50\xe0\x00\x01", id="class-7"),
]


@pytest.mark.parametrize("data", AIOCOAP_LENIENCIES)
def test_aiocoap_accepts_but_we_reject(data: bytes) -> None:
    theirs = aiocoap.Message.decode(data)
    with pytest.raises(FormatError) as caught:
        decode(data)
    assert (caught.value.mtype, caught.value.mid) == (int(theirs.mtype), theirs.mid)


BOTH_REJECT = [
    pytest.param(b"\x40\x01\x00", id="short"),
    pytest.param(b"\x80\x01\x00\x01", id="version-2"),
    pytest.param(b"\x40\x01\x00\x01\xf0", id="delta-nibble-15"),
    pytest.param(b"\x40\x01\x00\x01\x1f", id="length-nibble-15"),
    pytest.param(b"\x40\x01\x00\x01\xd0", id="delta-13-cut"),
    pytest.param(b"\x40\x01\x00\x01\x1e\x00", id="length-14-cut"),
    pytest.param(b"\x40\x01\x00\x01\x13ab", id="value-past-end"),
]


@pytest.mark.parametrize("data", BOTH_REJECT)
def test_both_reject(data: bytes) -> None:
    assert aiocoap_decode(data) is None
    assert our_decode(data) is None
