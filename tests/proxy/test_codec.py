"""Unit and property tests for the CoAP codec (RFC 7252 §3, §4.1, §4.2, §4.3).

The interoperability checks against a second implementation live in ``test_codec_oracle.py``;
this module pins the exact bytes and the error classification of our own codec.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.coap import options
from proxy.coap.codec import (
    ACK,
    CON,
    NON,
    RST,
    FormatError,
    Message,
    Unreadable,
    decode,
    encode,
    encode_empty,
    encode_parts,
    parse_uint,
    uint_bytes,
)

GET, POST = 1, 2
CONTENT, CHANGED = 0x45, 0x44  # 2.05, 2.04


def header(mtype: int, code: int, mid: int, tkl: int = 0, version: int = 1) -> bytes:
    return bytes((version << 6 | mtype << 4 | tkl, code)) + mid.to_bytes(2, "big")


# --- datagrams that are not CoAP at all: silently ignored (§3) -------------------------------

UNREADABLE = [
    pytest.param(b"", id="empty-datagram"),
    pytest.param(b"\x40", id="one-byte"),
    pytest.param(b"\x40\x01\x00", id="three-bytes"),
    pytest.param(header(CON, GET, 1, version=0), id="version-0"),
    pytest.param(header(CON, GET, 1, version=2), id="version-2"),
    pytest.param(header(CON, GET, 1, version=3) + b"\xb4data", id="version-3-with-options"),
    # The version is checked before anything else, so a reserved TKL does not turn an
    # unknown version into a format error.
    pytest.param(header(CON, GET, 1, tkl=15, version=0), id="version-0-tkl-15"),
]


@pytest.mark.parametrize("data", UNREADABLE)
def test_unreadable_datagrams(data: bytes) -> None:
    with pytest.raises(Unreadable):
        decode(data)


# --- message format errors: CON → RST, NON → drop, so mtype/mid must be right (§4.2, §4.3) ---

FORMAT_ERRORS = [
    pytest.param(header(CON, GET, 0x1234, tkl=9) + bytes(9), CON, 0x1234, id="tkl-9"),
    pytest.param(header(NON, GET, 0xBEEF, tkl=15) + bytes(15), NON, 0xBEEF, id="tkl-15"),
    pytest.param(header(ACK, CONTENT, 7, tkl=12), ACK, 7, id="tkl-12-no-token-bytes"),
    pytest.param(header(CON, 0x20, 1), CON, 1, id="class-1"),
    pytest.param(header(NON, 0x3F, 2), NON, 2, id="class-1-detail-31"),
    pytest.param(header(CON, 0xC0, 3), CON, 3, id="class-6"),
    pytest.param(header(RST, 0xE0, 4), RST, 4, id="class-7"),
    pytest.param(header(CON, 0xFF, 5), CON, 5, id="class-7-detail-31"),
    pytest.param(header(CON, 0, 10, tkl=1) + b"\xaa", CON, 10, id="empty-with-token"),
    pytest.param(header(ACK, 0, 11, tkl=1), ACK, 11, id="empty-with-tkl-but-no-token"),
    pytest.param(header(CON, 0, 12) + b"\xb0", CON, 12, id="empty-with-option"),
    pytest.param(header(RST, 0, 13) + b"\xff\x01", RST, 13, id="empty-with-payload"),
    pytest.param(header(NON, 0, 14) + b"\xff", NON, 14, id="empty-with-bare-marker"),
    pytest.param(header(CON, GET, 20, tkl=8) + b"abc", CON, 20, id="token-past-end"),
    pytest.param(header(CON, GET, 21) + b"\xf0", CON, 21, id="delta-nibble-15"),
    pytest.param(header(NON, GET, 22) + b"\xf3abc", NON, 22, id="delta-nibble-15-with-value"),
    pytest.param(header(CON, GET, 23) + b"\x1f", CON, 23, id="length-nibble-15"),
    pytest.param(header(CON, GET, 24) + b"\xbf", CON, 24, id="length-nibble-15-after-delta"),
    pytest.param(header(CON, GET, 25) + b"\xd0", CON, 25, id="delta-13-no-extension"),
    pytest.param(header(CON, GET, 26) + b"\xe0", CON, 26, id="delta-14-no-extension"),
    pytest.param(header(CON, GET, 27) + b"\xe0\x00", CON, 27, id="delta-14-half-extension"),
    pytest.param(header(CON, GET, 28) + b"\x1d", CON, 28, id="length-13-no-extension"),
    pytest.param(header(CON, GET, 29) + b"\x1e\x00", CON, 29, id="length-14-half-extension"),
    pytest.param(header(CON, GET, 30) + b"\xdd\x00", CON, 30, id="delta-13-then-length-13-cut"),
    pytest.param(header(CON, GET, 31) + b"\xee\x00\x00", CON, 31, id="delta-14-then-length-cut"),
    pytest.param(header(CON, GET, 32) + b"\x13ab", CON, 32, id="value-past-end"),
    pytest.param(header(CON, GET, 33) + b"\x1d\x00" + bytes(12), CON, 33, id="value13-past-end"),
    pytest.param(
        header(CON, GET, 34) + b"\x1e\x00\x00" + bytes(268), CON, 34, id="value269-past-end"
    ),
    pytest.param(header(CON, GET, 35) + b"\xb1a\x13", CON, 35, id="second-option-past-end"),
    pytest.param(header(CON, POST, 40) + b"\xff", CON, 40, id="marker-no-payload"),
    pytest.param(header(NON, POST, 41, tkl=2) + b"tk\xff", NON, 41, id="marker-after-token"),
    pytest.param(header(ACK, CONTENT, 42) + b"\xc1\x00\xff", ACK, 42, id="marker-after-option"),
    pytest.param(header(RST, CONTENT, 0xFFFF) + b"\xff", RST, 0xFFFF, id="marker-rst-max-mid"),
]


@pytest.mark.parametrize(("data", "mtype", "mid"), FORMAT_ERRORS)
def test_format_errors_carry_type_and_mid(data: bytes, mtype: int, mid: int) -> None:
    with pytest.raises(FormatError) as caught:
        decode(data)
    assert (caught.value.mtype, caught.value.mid) == (mtype, mid)


def test_format_error_and_unreadable_are_distinct() -> None:
    # The messaging layer answers the one with RST and ignores the other; neither may
    # swallow the other in an ``except`` clause.
    assert not issubclass(FormatError, Unreadable)
    assert not issubclass(Unreadable, FormatError)


def test_format_error_defaults_to_unreadable_header() -> None:
    error = FormatError("why")
    assert (str(error), error.mtype, error.mid) == ("why", -1, -1)


# --- well-formed datagrams ---------------------------------------------------------------------

VALID = [
    pytest.param(header(CON, 0, 0x1234), Message(CON, 0, 0x1234), id="empty-con-ping"),
    pytest.param(header(ACK, 0, 1), Message(ACK, 0, 1), id="empty-ack"),
    pytest.param(header(RST, 0, 0xFFFF), Message(RST, 0, 0xFFFF), id="empty-rst"),
    pytest.param(header(CON, GET, 2), Message(CON, GET, 2), id="get-bare"),
    pytest.param(
        header(CON, GET, 3, tkl=8) + b"12345678",
        Message(CON, GET, 3, b"12345678"),
        id="token-8",
    ),
    pytest.param(
        header(NON, POST, 4, tkl=1) + b"\x00\xb4data\xff{}",
        Message(NON, POST, 4, b"\x00", [(options.URI_PATH, b"data")], b"{}"),
        id="post-uri-path-payload",
    ),
    pytest.param(
        header(CON, GET, 5) + b"\xb8location\x45t=a/b",
        Message(CON, GET, 5, b"", [(options.URI_PATH, b"location"), (15, b"t=a/b")]),
        id="uri-path-and-query",
    ),
    pytest.param(
        header(CON, GET, 6) + b"\xb1a\x11b\x00",
        Message(CON, GET, 6, b"", [(11, b"a"), (12, b"b"), (12, b"")]),
        id="repeated-and-zero-length",
    ),
    pytest.param(
        header(ACK, CONTENT, 7, tkl=2) + b"tk\xc0\xff\xff",
        Message(ACK, CONTENT, 7, b"tk", [(options.CONTENT_FORMAT, b"")], b"\xff"),
        id="payload-is-0xff",
    ),
    pytest.param(header(CON, 0x1F, 8), Message(CON, 0x1F, 8), id="method-0.31"),
    pytest.param(header(CON, 0x7F, 9), Message(CON, 0x7F, 9), id="class-3-unassigned"),
    pytest.param(header(ACK, 0xBF, 10), Message(ACK, 0xBF, 10), id="code-5.31"),
    pytest.param(header(CON, GET, 11) + b"\x00", Message(CON, GET, 11, b"", [(0, b"")]), id="o0"),
]


@pytest.mark.parametrize(("data", "message"), VALID)
def test_decode_valid(data: bytes, message: Message) -> None:
    assert decode(data) == message


@pytest.mark.parametrize(("data", "message"), VALID)
def test_encode_valid(data: bytes, message: Message) -> None:
    assert encode(message) == data


# --- extended option delta and length (§3.1) -------------------------------------------------

EXTENDED = [
    pytest.param(0, b"\x00", b"", id="0"),
    pytest.param(12, b"\x0c", b"", id="12-last-nibble"),
    pytest.param(13, b"\x0d", b"\x00", id="13-first-one-byte"),
    pytest.param(14, b"\x0d", b"\x01", id="14"),
    pytest.param(268, b"\x0d", b"\xff", id="268-last-one-byte"),
    pytest.param(269, b"\x0e", b"\x00\x00", id="269-first-two-byte"),
    pytest.param(270, b"\x0e", b"\x00\x01", id="270"),
    pytest.param(524, b"\x0e", b"\x00\xff", id="524"),
    pytest.param(525, b"\x0e", b"\x01\x00", id="525"),
    pytest.param(65804, b"\x0e", b"\xff\xff", id="65804-max"),
]


@pytest.mark.parametrize(("delta", "nibble", "extension"), EXTENDED)
def test_extended_option_delta(delta: int, nibble: bytes, extension: bytes) -> None:
    data = header(CON, GET, 1) + bytes((nibble[0] << 4,)) + extension
    assert encode_parts(CON, GET, 1, b"", [(delta, b"")], b"") == data
    assert decode(data).options == [(delta, b"")]


@pytest.mark.parametrize(("length", "nibble", "extension"), EXTENDED)
def test_extended_option_length(length: int, nibble: bytes, extension: bytes) -> None:
    value = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    data = header(CON, GET, 1) + bytes((0x10 | nibble[0],)) + extension + value
    assert encode_parts(CON, GET, 1, b"", [(1, value)], b"") == data
    assert decode(data).options == [(1, value)]


def test_extended_delta_and_length_together() -> None:
    # Delta extension precedes length extension (§3.1, Figure 8).
    value = b"v" * 300
    data = header(CON, GET, 1) + b"\xee\x00\x00\x00\x1f" + value + b"\xff!"
    message = Message(CON, GET, 1, b"", [(269, value)], b"!")
    assert encode(message) == data
    assert decode(data) == message


def test_option_numbers_accumulate_deltas() -> None:
    # 11 → 60 (delta 49, one-byte extension) → 65000 (delta 64940, two-byte extension).
    message = Message(CON, GET, 1, b"", [(11, b"a"), (60, b"\x01"), (65000, b"")])
    data = encode(message)
    assert data == header(CON, GET, 1) + b"\xb1a\xd1\x24\x01\xe0\xfc\x9f"
    assert decode(data) == message


# --- option ordering on encode ---------------------------------------------------------------


def test_encode_sorts_options_and_keeps_repeats_in_order() -> None:
    message = Message(
        CON,
        GET,
        1,
        b"",
        [(15, b"q2"), (11, b"b"), (3, b"h"), (11, b"a"), (15, b"q1"), (1, b"")],
    )
    data = encode(message)
    assert data == header(CON, GET, 1) + b"\x10\x21h\x81b\x01a\x42q2\x02q1"
    assert decode(data).options == [
        (1, b""),
        (3, b"h"),
        (11, b"b"),
        (11, b"a"),
        (15, b"q2"),
        (15, b"q1"),
    ]


def test_encode_does_not_reorder_the_callers_list() -> None:
    given_options = [(15, b"q"), (11, b"p")]
    encode(Message(CON, GET, 1, b"", given_options))
    assert given_options == [(15, b"q"), (11, b"p")]


def test_encode_parts_matches_encode_for_sorted_options() -> None:
    opts = [(11, b"data"), (12, b"\x32"), (60, b"\x04\x00")]
    assert encode_parts(NON, POST, 99, b"tok", opts, b"body") == encode(
        Message(NON, POST, 99, b"tok", opts, b"body")
    )


def test_no_payload_marker_without_payload() -> None:
    assert encode(Message(ACK, CHANGED, 1, b"t", [], b"")) == header(ACK, CHANGED, 1, 1) + b"t"


# --- empty ACK / RST (§4.2) ---------------------------------------------------------------------

EMPTY = [
    pytest.param(ACK, 0x1234, b"\x60\x00\x12\x34", id="ack"),
    pytest.param(RST, 0x1234, b"\x70\x00\x12\x34", id="rst"),
    pytest.param(ACK, 0, b"\x60\x00\x00\x00", id="ack-mid-0"),
    pytest.param(RST, 0xFFFF, b"\x70\x00\xff\xff", id="rst-mid-max"),
    pytest.param(CON, 7, b"\x40\x00\x00\x07", id="con-ping"),
]


@pytest.mark.parametrize(("mtype", "mid", "data"), EMPTY)
def test_encode_empty(mtype: int, mid: int, data: bytes) -> None:
    assert encode_empty(mtype, mid) == data
    assert decode(data) == Message(mtype, 0, mid)


# --- uint helpers (§3.2) -------------------------------------------------------------------------

UINTS = [
    pytest.param(0, b"", id="0-is-empty"),
    pytest.param(1, b"\x01", id="1"),
    pytest.param(255, b"\xff", id="255"),
    pytest.param(256, b"\x01\x00", id="256"),
    pytest.param(65535, b"\xff\xff", id="65535"),
    pytest.param(65536, b"\x01\x00\x00", id="65536"),
    pytest.param(2**32 - 1, b"\xff\xff\xff\xff", id="uint32-max"),
]


@pytest.mark.parametrize(("value", "data"), UINTS)
def test_uint_bytes(value: int, data: bytes) -> None:
    assert uint_bytes(value) == data
    assert parse_uint(data) == value


@pytest.mark.parametrize(
    ("data", "value"),
    [
        pytest.param(b"\x00", 0, id="zero-byte"),
        pytest.param(b"\x00\x05", 5, id="leading-zero"),
        pytest.param(b"\x00\x00\x01\x00", 256, id="two-leading-zeros"),
    ],
)
def test_parse_uint_accepts_non_minimal(data: bytes, value: int) -> None:
    assert parse_uint(data) == value


@given(st.integers(min_value=0, max_value=2**64))
def test_uint_round_trip_is_minimal(value: int) -> None:
    data = uint_bytes(value)
    assert parse_uint(data) == value
    assert not data.startswith(b"\x00")


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(Message(NON, GET, 1, b"t", [(11, b"a")], b"p"), id="mtype"),
        pytest.param(Message(CON, POST, 1, b"t", [(11, b"a")], b"p"), id="code"),
        pytest.param(Message(CON, GET, 2, b"t", [(11, b"a")], b"p"), id="mid"),
        pytest.param(Message(CON, GET, 1, b"u", [(11, b"a")], b"p"), id="token"),
        pytest.param(Message(CON, GET, 1, b"t", [(11, b"b")], b"p"), id="options"),
        pytest.param(Message(CON, GET, 1, b"t", [(11, b"a")], b"q"), id="payload"),
    ],
)
def test_message_equality_covers_every_field(other: Message) -> None:
    assert Message(CON, GET, 1, b"t", [(11, b"a")], b"p") != other


# --- properties ----------------------------------------------------------------------------------

tokens = st.binary(max_size=8)
option_lists = st.lists(st.tuples(st.integers(0, 65804), st.binary(max_size=300)), max_size=6).map(
    lambda opts: sorted(opts, key=lambda option: option[0])
)
codes = st.one_of(st.integers(1, 31), st.integers(0x40, 0xBF))


@st.composite
def messages(draw: st.DrawFn) -> Message:
    code = draw(st.one_of(st.just(0), codes))
    mtype, mid = draw(st.integers(0, 3)), draw(st.integers(0, 0xFFFF))
    if code == 0:
        return Message(mtype, 0, mid)
    # Sorted numbers up to 65804 keep every delta within the two-byte extension.
    opts = draw(option_lists)
    return Message(mtype, code, mid, draw(tokens), opts, draw(st.binary(max_size=64)))


@settings(max_examples=300, deadline=None)
@given(messages())
def test_decode_inverts_encode(message: Message) -> None:
    assert decode(encode(message)) == message


@st.composite
def version_1_datagrams(draw: st.DrawFn) -> bytes:
    first = 0x40 | draw(st.integers(0, 0x3F))
    return bytes((first,)) + draw(st.binary(max_size=63))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=64), version_1_datagrams()))
def test_decode_classifies_every_datagram(data: bytes) -> None:
    """Every datagram decodes, is Unreadable, or is a FormatError with its header's type/MID;
    and the encoding of a datagram we accept is unique, so re-encoding gives it back."""
    if len(data) < 4 or data[0] >> 6 != 1:
        with pytest.raises(Unreadable):
            decode(data)
        return
    outcome: Message | FormatError
    try:
        outcome = decode(data)
    except FormatError as error:
        outcome = error
    if isinstance(outcome, FormatError):
        assert (outcome.mtype, outcome.mid) == ((data[0] >> 4) & 3, int.from_bytes(data[2:4]))
    else:
        assert encode(outcome) == data
