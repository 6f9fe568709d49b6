"""The HTTP → CoAP status table (docs/CONTRACT.md §10), one case per row and per fallback class:
the rules in RFC notation (policies/status.py) and the proxy's compiled form of them
(proxy/forward.py), with the CoAP numbers they compile into (proxy/coap/codes.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.status import (
    ANY,
    HTTP_TO_COAP,
    METHODS,
    is_response_code,
    lookup,
    lookup_with,
)
from proxy.coap.codes import (
    DELETE,
    FETCH,
    GET,
    IPATCH,
    METHOD_NAME_OF,
    METHOD_NAMES,
    PATCH,
    POST,
    PUT,
    code,
    code_text,
    parse_code_text,
)
from proxy.forward import StatusTable, coap_code_for

ALL_METHODS = sorted(METHOD_NAMES)

# (HTTP status, CoAP request method, expected CoAP code as "c.dd"): docs/CONTRACT.md §10 with
# RFC 7252 §5.9.1 for the 2.xx codes. Every method for every success status.
_SUCCESS = {
    #      GET     POST    PUT     DELETE  FETCH   PATCH   iPATCH
    200: ("2.05", "2.04", "2.04", "2.02", "2.05", "2.04", "2.04"),
    201: ("2.05", "2.01", "2.01", "2.02", "2.05", "2.04", "2.04"),
    202: ("2.05", "2.04", "2.04", "2.02", "2.05", "2.04", "2.04"),
    203: ("2.05", "2.04", "2.04", "2.02", "2.05", "2.04", "2.04"),
    204: ("2.05", "2.04", "2.04", "2.02", "2.05", "2.04", "2.04"),
    206: ("2.05", "2.04", "2.04", "2.02", "2.05", "2.04", "2.04"),
    304: ("2.03", "5.02", "5.02", "5.02", "2.03", "5.02", "5.02"),
}
METHOD_DEPENDENT_ROWS = [
    pytest.param(http, method, codes[i], id=f"{http}-{METHOD_NAMES[method]}")
    for http, codes in _SUCCESS.items()
    for i, method in enumerate((GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH))
]

# Rows that do not depend on the method.
FIXED_ROWS = [
    pytest.param(400, "4.00", id="400"),
    pytest.param(401, "4.01", id="401"),
    pytest.param(403, "4.03", id="403"),
    pytest.param(404, "4.04", id="404"),
    pytest.param(405, "4.05", id="405"),
    pytest.param(406, "4.06", id="406"),
    pytest.param(412, "4.12", id="412"),
    pytest.param(413, "4.13", id="413"),
    pytest.param(415, "4.15", id="415"),
    pytest.param(429, "4.29", id="429"),
    pytest.param(500, "5.00", id="500"),
    pytest.param(501, "5.01", id="501"),
    pytest.param(502, "5.02", id="502"),
    pytest.param(503, "5.03", id="503"),
    pytest.param(504, "5.04", id="504"),
]

# Fallback classes: other 4xx → 4.00, other 5xx → 5.00, 1xx and other 3xx → 5.02.
FALLBACK_ROWS = [
    pytest.param(402, "4.00", id="other-4xx-402"),
    pytest.param(407, "4.00", id="other-4xx-407"),
    pytest.param(408, "4.00", id="other-4xx-408"),
    pytest.param(409, "4.00", id="other-4xx-409"),
    pytest.param(410, "4.00", id="other-4xx-410"),
    pytest.param(411, "4.00", id="other-4xx-411"),
    pytest.param(414, "4.00", id="other-4xx-414"),
    pytest.param(422, "4.00", id="other-4xx-422"),
    pytest.param(428, "4.00", id="other-4xx-428"),
    pytest.param(431, "4.00", id="other-4xx-431"),
    pytest.param(499, "4.00", id="other-4xx-499"),
    pytest.param(505, "5.00", id="other-5xx-505"),
    pytest.param(507, "5.00", id="other-5xx-507"),
    pytest.param(511, "5.00", id="other-5xx-511"),
    pytest.param(599, "5.00", id="other-5xx-599"),
    pytest.param(100, "5.02", id="1xx-100"),
    pytest.param(101, "5.02", id="1xx-101"),
    pytest.param(103, "5.02", id="1xx-103"),
    pytest.param(300, "5.02", id="other-3xx-300"),
    pytest.param(301, "5.02", id="other-3xx-301"),
    pytest.param(302, "5.02", id="other-3xx-302"),
    pytest.param(303, "5.02", id="other-3xx-303"),
    pytest.param(307, "5.02", id="other-3xx-307"),
    pytest.param(308, "5.02", id="other-3xx-308"),
]


@pytest.mark.parametrize(("http_status", "method", "expected"), METHOD_DEPENDENT_ROWS)
def test_method_dependent_rows(http_status: int, method: int, expected: str) -> None:
    assert code_text(coap_code_for(http_status, method)) == expected


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize(("http_status", "expected"), FIXED_ROWS + FALLBACK_ROWS)
def test_method_independent_rows(http_status: int, expected: str, method: int) -> None:
    assert code_text(coap_code_for(http_status, method)) == expected


@pytest.mark.parametrize(("http_status", "expected"), FIXED_ROWS)
def test_explicit_rows_are_data(http_status: int, expected: str) -> None:
    # The table itself (not only the function) carries each explicit row, so a policy that
    # reads or overrides the table sees the same mapping.
    assert HTTP_TO_COAP[(http_status, ANY)] == expected


@pytest.mark.parametrize(("http_status", "method", "expected"), METHOD_DEPENDENT_ROWS)
def test_compiled_table_agrees_with_the_readable_lookup(
    http_status: int, method: int, expected: str
) -> None:
    assert lookup(HTTP_TO_COAP, http_status, METHOD_NAMES[method]) == expected


def test_method_dependent_rows_live_in_the_table() -> None:
    # Issue: DELETE answered 200/202 became 2.05; a body-less 2xx to GET became 2.04. Rows, not
    # code around the table, decide that.
    assert HTTP_TO_COAP[("2xx", "DELETE")] == "2.02"
    assert HTTP_TO_COAP[("2xx", "GET")] == "2.05"
    assert HTTP_TO_COAP[(201, "POST")] == "2.01"


def test_a_profile_can_compile_its_own_table() -> None:
    table = StatusTable({**HTTP_TO_COAP, (204, "POST"): "2.01"})
    assert code_text(table.code_for(204, POST)) == "2.01"
    assert code_text(table.code_for(204, PUT)) == "2.04"
    assert code_text(coap_code_for(204, POST)) == "2.04"  # the default is untouched


@pytest.mark.parametrize("http_status", [-1, 0, 99, 600, 999, 1000, 10**6])
def test_statuses_outside_the_registry_are_5_02(http_status: int) -> None:
    assert code_text(coap_code_for(http_status, GET)) == "5.02"


@given(st.integers(100, 599), st.sampled_from(ALL_METHODS))
def test_error_classes_stay_error_classes(http_status: int, method: int) -> None:
    coap_class = coap_code_for(http_status, method) >> 5
    if 400 <= http_status < 500:
        assert coap_class == 4
    elif 500 <= http_status < 600:
        assert coap_class == 5
    elif http_status < 200 or 300 <= http_status < 400:
        # 3xx is unmapped but for 304 to a GET or FETCH (2.03 Valid).
        valid = http_status == 304 and method in (GET, FETCH)
        assert coap_code_for(http_status, method) == (code(2, 3) if valid else code(5, 2))
    else:
        assert coap_class == 2


@pytest.mark.parametrize(
    ("cls", "detail", "value", "text"),
    [
        pytest.param(0, 0, 0, "0.00", id="empty"),
        pytest.param(0, 1, 1, "0.01", id="GET"),
        pytest.param(2, 5, 69, "2.05", id="content"),
        pytest.param(4, 4, 132, "4.04", id="not-found"),
        pytest.param(4, 29, 157, "4.29", id="too-many-requests"),
        pytest.param(5, 4, 164, "5.04", id="gateway-timeout"),
        pytest.param(7, 31, 255, "7.31", id="max"),
    ],
)
def test_code_helpers(cls: int, detail: int, value: int, text: str) -> None:
    assert code(cls, detail) == value
    assert code_text(value) == text


@pytest.mark.parametrize(
    ("method", "number", "name"),
    [
        pytest.param(GET, 1, "GET", id="GET"),
        pytest.param(POST, 2, "POST", id="POST"),
        pytest.param(PUT, 3, "PUT", id="PUT"),
        pytest.param(DELETE, 4, "DELETE", id="DELETE"),
        pytest.param(FETCH, 5, "FETCH", id="FETCH"),
        pytest.param(PATCH, 6, "PATCH", id="PATCH"),
        pytest.param(IPATCH, 7, "iPATCH", id="iPATCH"),
    ],
)
def test_method_numbers(method: int, number: int, name: str) -> None:
    # RFC 7252 §12.1.1 and RFC 8132 §6.
    assert method == number
    assert METHOD_NAMES[number] == METHOD_NAME_OF[number] == name
    assert name in METHODS  # the rules spell it the same way


# -- a route's own rows (policies/routes.py: `status = { ... }`) -------------------------------

# Overrides: "2xx" (any method) → 2.04, 201 for POST → 2.01, 404 → 4.00, 5xx → 5.03.
_OVERRIDES: dict[tuple[int | str, str], str] = {
    ("2xx", ANY): "2.04",
    (201, "POST"): "2.01",
    (404, ANY): "4.00",
    ("5xx", ANY): "5.03",
}


@pytest.mark.parametrize(
    ("http_status", "method", "expected"),
    [
        # The route's class row beats the default's exact rows (overrides win as a whole).
        pytest.param(200, GET, "2.04", id="2xx-beats-default-2xx.GET"),
        pytest.param(200, DELETE, "2.04", id="2xx-beats-default-2xx.DELETE"),
        pytest.param(201, PUT, "2.04", id="2xx-beats-default-201.PUT"),
        # Within the overrides, the lookup order holds: (201, POST) before ("2xx", ANY).
        pytest.param(201, POST, "2.01", id="exact-override-beats-class-override"),
        pytest.param(404, GET, "4.00", id="404"),
        pytest.param(500, POST, "5.03", id="5xx-500"),
        pytest.param(504, GET, "5.03", id="5xx-beats-default-504"),
        # What the overrides do not name: the default table.
        pytest.param(403, GET, "4.03", id="default-403"),
        pytest.param(304, GET, "2.03", id="default-304"),
        pytest.param(302, GET, "5.02", id="default-unmapped"),
    ],
)
def test_overrides_win_over_the_table(http_status: int, method: int, expected: str) -> None:
    table = StatusTable(HTTP_TO_COAP, _OVERRIDES)
    assert code_text(table.code_for(http_status, method)) == expected
    assert lookup_with(_OVERRIDES, HTTP_TO_COAP, http_status, METHOD_NAMES[method]) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        pytest.param("2.05", code(2, 5), id="2.05"),
        pytest.param("4.29", code(4, 29), id="4.29"),
        pytest.param("5.31", code(5, 31), id="5.31"),
        pytest.param("2.5", None, id="one-digit-detail"),
        pytest.param("3.00", None, id="class-3"),
        pytest.param("0.01", None, id="a-method"),
        pytest.param("4.32", None, id="detail-over-31"),
        pytest.param("205", None, id="no-dot"),
        pytest.param("x.yz", None, id="not-digits"),
    ],
)
def test_parse_code_text(text: str, value: int | None) -> None:
    assert parse_code_text(text) == value
    assert is_response_code(text) is (value is not None)


@given(st.text(alphabet="0123456789.x", max_size=5))
def test_the_rules_notation_is_what_the_proxy_compiles(text: str) -> None:
    # policies/status.py checks the "c.dd" notation as text; proxy/coap/codes.py parses it
    # into a number: every text one accepts, the other compiles, and no other.
    assert is_response_code(text) is (parse_code_text(text) is not None)


def test_every_rule_compiles() -> None:
    assert all(is_response_code(text) for text in HTTP_TO_COAP.values())
    assert sorted(METHOD_NAMES.values()) == sorted(METHODS)
