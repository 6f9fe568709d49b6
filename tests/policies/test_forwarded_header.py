"""The internal proxy → backend contract: Forwarded and idempotency key (docs/CONTRACT.md §11)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.forwarding import (
    Origin,
    backend_budget,
    canonical_ip,
    format_forwarded,
    idempotency_key,
    parse_forwarded,
    parse_timeout,
)

FORMAT_ROWS = [
    pytest.param("192.0.2.1", 5683, "coap", 'for="192.0.2.1:5683";proto=coap', id="ipv4"),
    pytest.param(
        "2001:db8::1", 5684, "coaps", 'for="[2001:db8::1]:5684";proto=coaps', id="ipv6-bracketed"
    ),
    pytest.param("::1", 1, "coap", 'for="[::1]:1";proto=coap', id="ipv6-loopback"),
]


@pytest.mark.parametrize(("ip", "port", "proto", "header"), FORMAT_ROWS)
def test_format_forwarded(ip: str, port: int, proto: str, header: str) -> None:
    assert format_forwarded(ip, port, proto) == header


def test_format_forwarded_defaults_to_coap() -> None:
    assert format_forwarded("192.0.2.1", 5683) == 'for="192.0.2.1:5683";proto=coap'


PARSE_ROWS = [
    pytest.param(
        'for="192.0.2.1:5683";proto=coap', Origin("192.0.2.1", 5683, "coap"), id="ipv4-port"
    ),
    pytest.param("for=192.0.2.1", Origin("192.0.2.1", 0, "coap"), id="ipv4-bare"),
    pytest.param('for="192.0.2.1"', Origin("192.0.2.1", 0, "coap"), id="ipv4-quoted-no-port"),
    pytest.param(
        'for="[2001:db8::1]:5684";proto=coaps',
        Origin("2001:db8::1", 5684, "coaps"),
        id="ipv6-port",
    ),
    pytest.param('for="[2001:db8::1]"', Origin("2001:db8::1", 0, "coap"), id="ipv6-no-port"),
    pytest.param('for="[2001:DB8:0::1]"', Origin("2001:db8::1", 0, "coap"), id="ipv6-normalised"),
    pytest.param(
        'For="192.0.2.1:1";Proto=COAPS', Origin("192.0.2.1", 1, "coaps"), id="case-insensitive"
    ),
    pytest.param(
        'proto=coaps;for="192.0.2.1:7"', Origin("192.0.2.1", 7, "coaps"), id="proto-first"
    ),
    pytest.param(
        'for="192.0.2.1:1";proto=coaps, for="198.51.100.9:2";proto=coap',
        Origin("192.0.2.1", 1, "coaps"),
        id="first-element-wins",
    ),
    pytest.param(
        'for="192.0.2.1:1", for="198.51.100.9:2";proto=coaps',
        Origin("192.0.2.1", 1, "coap"),
        id="proto-not-taken-from-later-element",
    ),
]


@pytest.mark.parametrize(("header", "origin"), PARSE_ROWS)
def test_parse_forwarded(header: str, origin: Origin) -> None:
    assert parse_forwarded(header) == origin


GARBAGE = [
    pytest.param("", id="empty"),
    pytest.param("proto=coap", id="no-for"),
    pytest.param("by=192.0.2.1", id="by-only"),
    pytest.param("for=unknown", id="unknown-node"),
    pytest.param("for=_hidden", id="obfuscated-node"),
    pytest.param('for="999.1.1.1:5"', id="bad-ipv4"),
    pytest.param('for="[not-an-ip]:1"', id="bad-ipv6"),
    pytest.param('for="example.com:5683"', id="hostname"),
    pytest.param("nofor=192.0.2.1", id="for-inside-another-name"),
    pytest.param('for="[::1"', id="unterminated-bracket"),
    pytest.param('for="192.0.2.1:99999"', id="port-out-of-range"),
    pytest.param('for="192.0.2.1:\u00b2"', id="superscript-digit-port"),
    pytest.param('for="192.0.2.1:\u0661"', id="arabic-indic-digit-port"),
    pytest.param('for="[::1]:\u0661"', id="arabic-indic-digit-port-ipv6"),
]


@pytest.mark.parametrize("header", GARBAGE)
def test_parse_forwarded_garbage(header: str) -> None:
    assert parse_forwarded(header) is None


@given(st.ip_addresses(v=4), st.integers(0, 65535), st.sampled_from(["coap", "coaps"]))
def test_ipv4_round_trip(ip: ipaddress.IPv4Address, port: int, proto: str) -> None:
    assert parse_forwarded(format_forwarded(str(ip), port, proto)) == Origin(str(ip), port, proto)


@given(st.ip_addresses(v=6), st.integers(0, 65535), st.sampled_from(["coap", "coaps"]))
def test_ipv6_round_trip(ip: ipaddress.IPv6Address, port: int, proto: str) -> None:
    assert parse_forwarded(format_forwarded(str(ip), port, proto)) == Origin(str(ip), port, proto)


def test_idempotency_key_shape() -> None:
    assert (
        idempotency_key("192.0.2.1", 5683, 0x1234, b"\xab\xcd") == "coap:192.0.2.1:5683:4660:abcd"
    )


def test_idempotency_key_is_stable_for_a_retransmission() -> None:
    assert idempotency_key("2001:db8::1", 5683, 7, b"t") == idempotency_key(
        "2001:db8::1", 5683, 7, b"t"
    )


BASE = ("192.0.2.1", 5683, 7, b"\x01")


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(("192.0.2.2", 5683, 7, b"\x01"), id="ip"),
        pytest.param(("192.0.2.1", 5684, 7, b"\x01"), id="port"),
        pytest.param(("192.0.2.1", 5683, 8, b"\x01"), id="mid"),
        pytest.param(("192.0.2.1", 5683, 7, b"\x02"), id="token"),
        pytest.param(("192.0.2.1", 5683, 7, b""), id="empty-token"),
    ],
)
def test_idempotency_key_differs_per_field(other: tuple[str, int, int, bytes]) -> None:
    assert idempotency_key(*BASE) != idempotency_key(*other)


exchanges = st.tuples(
    st.ip_addresses().map(str),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=8),
)


@given(exchanges, exchanges)
def test_idempotency_key_is_injective(
    first: tuple[str, int, int, bytes], second: tuple[str, int, int, bytes]
) -> None:
    # IPv6 addresses contain ':' too; the key must still tell exchanges apart.
    if first != second:
        assert idempotency_key(*first) != idempotency_key(*second)


def _oracle(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


@pytest.mark.parametrize(
    "text",
    ["10.0.0.1", "010.0.0.1", "10.1", "1.2.3.256", "::1", "0:0::1", "::ffff:10.0.0.1",
     "2001:DB8::1", "fe80::1%eth0", "1.2.3.4.5", "", " 1.2.3.4", "::", "1::2::3", "::ffff:1.2.3"],
)  # fmt: skip
def test_canonical_ip_agrees_with_ipaddress(text: str) -> None:
    assert canonical_ip(text) == _oracle(text)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF:.", max_size=24))
def test_canonical_ip_agrees_with_ipaddress_on_anything(text: str) -> None:
    assert canonical_ip(text) == _oracle(text)


@pytest.mark.parametrize(
    ("proxy_timeout", "budget"),
    [(5.0, 4.0), (10.0, 9.0), (2.0, 1.0), (1.0, 0.5), (0.4, 0.2)],
)
def test_the_backend_budget_leaves_the_proxy_time_to_hear_the_answer(
    proxy_timeout: float, budget: float
) -> None:
    assert backend_budget(proxy_timeout) == pytest.approx(budget)
    assert backend_budget(proxy_timeout) < proxy_timeout


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5", 5.0),
        (b"2.5", 2.5),
        ("0.25", 0.25),
        (None, None),
        ("", None),
        ("0", None),
        ("-1", None),
        ("nan", None),
        ("inf", None),
        ("1e999", None),
        ("five", None),
        ("1" * 17, None),
    ],
)
def test_timeout_header_values(value: str | bytes | None, seconds: float | None) -> None:
    assert parse_timeout(value) == seconds
