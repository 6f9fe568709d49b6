"""The option table (RFC 7252 §5.10 and the RFCs that add options) and its enforcement.

First the table itself, row by row against a transcription of the RFCs' tables kept here.
Then what a device sees through a real proxy with a real HTTP backend that counts its calls:
an option of the wrong length or a supernumerary occurrence of a non-repeatable option is
treated like an unrecognized option (§5.4.3, §5.4.5): critical → 4.02, elective → ignored;
Block SZX 7 → 4.00 (RFC 7959 §2.2). If-Match / If-None-Match are understood and forwarded as
HTTP preconditions (§5.10.8, never run unconditionally); malformed ones are 4.02.
No refused request reaches the backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, NON, Message, encode_parts
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from tests.support.coap import RawClient
from tests.support.http import serve_app

# (number, name, min length, max length, repeatable, format), transcribed from
# RFC 7252 §5.10 Table 4, RFC 7959 §2.1 Table 1 and §4 Table 3, RFC 7641 §2 Table 1,
# RFC 7967 §2 Table 1, RFC 9175 §2.2.1 Table 1 and §3.2 Table 2.
RFC_TABLE = [
    (1, "If-Match", 0, 8, True, "opaque"),
    (3, "Uri-Host", 1, 255, False, "string"),
    (4, "ETag", 1, 8, True, "opaque"),
    (5, "If-None-Match", 0, 0, False, "empty"),
    (6, "Observe", 0, 3, False, "uint"),
    (7, "Uri-Port", 0, 2, False, "uint"),
    (8, "Location-Path", 0, 255, True, "string"),
    (11, "Uri-Path", 0, 255, True, "string"),
    (12, "Content-Format", 0, 2, False, "uint"),
    (14, "Max-Age", 0, 4, False, "uint"),
    (15, "Uri-Query", 0, 255, True, "string"),
    (17, "Accept", 0, 2, False, "uint"),
    (20, "Location-Query", 0, 255, True, "string"),
    (23, "Block2", 0, 3, False, "uint"),
    (27, "Block1", 0, 3, False, "uint"),
    (28, "Size2", 0, 4, False, "uint"),
    (35, "Proxy-Uri", 1, 1034, False, "string"),
    (39, "Proxy-Scheme", 1, 255, False, "string"),
    (60, "Size1", 0, 4, False, "uint"),
    (252, "Echo", 1, 40, False, "opaque"),
    (258, "No-Response", 0, 1, False, "uint"),
    (292, "Request-Tag", 0, 8, True, "opaque"),
]

# Critical (C) column of the same tables: odd numbers (RFC 7252 §5.4.6).
RFC_CRITICAL = {1, 3, 5, 7, 11, 15, 17, 23, 27, 35, 39}


@pytest.mark.parametrize(
    ("number", "name", "min_length", "max_length", "repeatable", "value_format"),
    RFC_TABLE,
    ids=[row[1] for row in RFC_TABLE],
)
def test_option_format_row(
    number: int, name: str, min_length: int, max_length: int, repeatable: bool, value_format: str
) -> None:
    row = opt.FORMATS[number]
    assert (row.number, row.name, row.min_length, row.max_length) == (
        number,
        name,
        min_length,
        max_length,
    )
    assert (row.repeatable, row.format) == (repeatable, value_format)
    assert opt.is_critical(number) == (number in RFC_CRITICAL)


def test_option_table_has_no_rows_beyond_the_rfcs() -> None:
    assert set(opt.FORMATS) == {row[0] for row in RFC_TABLE}


def test_understood_options_are_in_the_table_with_the_right_class() -> None:
    assert opt.UNDERSTOOD_CRITICAL <= RFC_CRITICAL
    assert not opt.UNDERSTOOD_ELECTIVE & RFC_CRITICAL
    assert set(opt.FORMATS) >= opt.UNDERSTOOD_CRITICAL | opt.UNDERSTOOD_ELECTIVE


def test_preconditions_are_understood() -> None:
    # Issue 13 §3: forwarded as HTTP If-Match / If-None-Match (proxy/forward.py), so
    # understood; the ETag of a GET is read for validation (§5.10.6.2).
    assert {opt.IF_MATCH, opt.IF_NONE_MATCH} <= opt.UNDERSTOOD_CRITICAL
    assert opt.ETAG in opt.UNDERSTOOD_ELECTIVE


@pytest.mark.parametrize(
    "number", sorted(opt.UNDERSTOOD_CRITICAL | opt.UNDERSTOOD_ELECTIVE), ids=str
)
def test_request_rule_follows_the_table(number: int) -> None:
    lengths, repeatable = opt.REQUEST_RULES[number]
    row = opt.FORMATS[number]
    assert (lengths.start, lengths.stop - 1, repeatable) == (
        row.min_length,
        row.max_length,
        row.repeatable,
    )


def test_request_rules_cover_exactly_the_options_read() -> None:
    assert set(opt.REQUEST_RULES) == opt.UNDERSTOOD_CRITICAL | opt.UNDERSTOOD_ELECTIVE


# -- through a real proxy ---------------------------------------------------------------------

POLICY = """
[[route]]
path = "/thing"
methods = ["GET", "PUT", "DELETE", "POST"]
target = "/thing"
"""


@dataclass
class Backend:
    calls: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    async def endpoint(self, request: HttpRequest) -> HttpResponse:
        await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.calls.append((request.method, str(request.url), headers))
        return HttpResponse(status_code=204)


@dataclass
class Rig:
    backend: Backend
    proxy: RunningProxy
    client: RawClient
    mid: int = 2000

    async def send(
        self, code: int, extra: list[tuple[int, bytes]], mtype: int = CON, token: bytes = b"\x5a"
    ) -> tuple[int, Message]:
        """Send ``code /thing`` with ``extra`` options; return (MID sent, answer)."""
        self.mid += 1
        options = sorted([(opt.URI_PATH, b"thing"), *extra], key=lambda o: o[0])
        datagram = encode_parts(mtype, code, self.mid, token, options, b"body")
        return self.mid, await self.client.request(datagram, timeout=5.0)


@pytest.fixture
async def rig(tmp_path) -> AsyncIterator[Rig]:
    backend = Backend()
    app = Starlette(
        routes=[Route("/thing", backend.endpoint, methods=["GET", "PUT", "DELETE", "POST"])]
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    async with serve_app(app) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port="off",
            upstream=base_url,
            policy=str(policy),
            upstream_timeout=2.0,
        )
        proxy = await start_proxy(settings)
        client = await RawClient.connect(*proxy.address)
        rig = Rig(backend, proxy, client)
        try:
            yield rig
        finally:
            await client.aclose()
            await rig.proxy.close()


BAD_OPTION, BAD_REQUEST = status.BAD_OPTION, status.BAD_REQUEST

REFUSED = [
    # §5.4.3: a critical option of a length outside its range.
    pytest.param([(opt.URI_PATH, b"a" * 256)], BAD_OPTION, id="uri-path-256"),
    pytest.param([(opt.URI_QUERY, b"t=" + b"a" * 254)], BAD_OPTION, id="uri-query-256"),
    pytest.param([(opt.URI_HOST, b"")], BAD_OPTION, id="uri-host-empty"),
    pytest.param([(opt.URI_HOST, b"h" * 256)], BAD_OPTION, id="uri-host-256"),
    pytest.param([(opt.URI_PORT, b"\x00\x16\x33")], BAD_OPTION, id="uri-port-3-bytes"),
    pytest.param([(opt.ACCEPT, b"\x00\x00\x32")], BAD_OPTION, id="accept-3-bytes"),
    pytest.param([(opt.BLOCK2, b"\x00\x00\x00\x06")], BAD_OPTION, id="block2-4-bytes"),
    pytest.param([(opt.BLOCK1, b"\x00\x00\x00\x00")], BAD_OPTION, id="block1-4-bytes"),
    pytest.param([(opt.PROXY_URI, b"")], BAD_OPTION, id="proxy-uri-empty"),
    pytest.param([(opt.PROXY_URI, b"coap://h/" + b"a" * 1026)], BAD_OPTION, id="proxy-uri-1035"),
    pytest.param([(opt.PROXY_SCHEME, b"")], BAD_OPTION, id="proxy-scheme-empty"),
    pytest.param([(opt.PROXY_SCHEME, b"c" * 256)], BAD_OPTION, id="proxy-scheme-256"),
    # §5.4.5: a second occurrence of a critical option that is not repeatable.
    pytest.param([(opt.ACCEPT, b"\x32"), (opt.ACCEPT, b"\x32")], BAD_OPTION, id="accept-twice"),
    pytest.param([(opt.URI_HOST, b"a"), (opt.URI_HOST, b"b")], BAD_OPTION, id="uri-host-twice"),
    pytest.param([(opt.URI_PORT, b"\x16"), (opt.URI_PORT, b"")], BAD_OPTION, id="uri-port-twice"),
    pytest.param([(opt.BLOCK2, b""), (opt.BLOCK2, b"")], BAD_OPTION, id="block2-twice"),
    pytest.param([(opt.BLOCK1, b""), (opt.BLOCK1, b"")], BAD_OPTION, id="block1-twice"),
    # RFC 7959 §2.2: SZX 7 is reserved → 4.00, whatever NUM and M say.
    pytest.param([(opt.BLOCK1, b"\x07")], BAD_REQUEST, id="block1-szx7"),
    pytest.param([(opt.BLOCK1, b"\x1f")], BAD_REQUEST, id="block1-num1-more-szx7"),
    pytest.param([(opt.BLOCK2, b"\x07")], BAD_REQUEST, id="block2-szx7"),
    pytest.param([(opt.BLOCK2, b"\x01\x02\x0f")], BAD_REQUEST, id="block2-3-bytes-szx7"),
    # Preconditions are understood critical options: a malformed one is 4.02 (§5.4.3, §5.4.5).
    pytest.param([(opt.IF_MATCH, b"123456789")], BAD_OPTION, id="if-match-9-bytes"),
    pytest.param([(opt.IF_NONE_MATCH, b"x")], BAD_OPTION, id="if-none-match-not-empty"),
    pytest.param(
        [(opt.IF_NONE_MATCH, b""), (opt.IF_NONE_MATCH, b"")], BAD_OPTION, id="if-none-match-twice"
    ),
]


@pytest.mark.parametrize(("extra", "expected"), REFUSED)
async def test_refused_in_con_piggybacked_empty_and_never_forwarded(
    rig: Rig, extra: list[tuple[int, bytes]], expected: int
) -> None:
    await _refused_and_never_forwarded(rig, status.POST, extra, expected)


@pytest.mark.parametrize(
    ("extra", "header", "value"),
    [
        pytest.param([(opt.IF_MATCH, b"v2")], "if-match", '"v2"', id="if-match"),
        pytest.param([(opt.IF_MATCH, b"")], "if-match", "*", id="if-match-empty"),
        pytest.param(
            [(opt.IF_MATCH, b"a"), (opt.IF_MATCH, b"b")], "if-match", '"a", "b"', id="if-match-two"
        ),
        pytest.param([(opt.IF_NONE_MATCH, b"")], "if-none-match", "*", id="if-none-match"),
    ],
)
@pytest.mark.parametrize("method", [status.PUT, status.POST], ids=["PUT", "POST"])
async def test_conditional_request_is_forwarded_with_its_precondition(
    rig: Rig, method: int, extra: list[tuple[int, bytes]], header: str, value: str
) -> None:
    # §5.10.8: a conditional request is never run unconditionally: its precondition goes to
    # the origin as the HTTP header of the same meaning (RFC 9110 §13.1.1, §13.1.2), which
    # decides (412 → 4.12, tests/proxy/test_translation.py).
    _, reply = await rig.send(method, extra)
    assert reply.code == status.CHANGED
    [(_, _, headers)] = rig.backend.calls
    assert headers[header] == value


async def _refused_and_never_forwarded(
    rig: Rig, method: int, extra: list[tuple[int, bytes]], expected: int
) -> None:
    mid, reply = await rig.send(method, extra, token=b"\x01\x02\x03")
    assert (reply.mtype, reply.mid, reply.token) == (ACK, mid, b"\x01\x02\x03")
    assert (reply.code, reply.options, reply.payload) == (expected, [], b"")
    # The same request without the defect is forwarded: the refusal is about the option.
    _, control = await rig.send(method, [])
    assert control.code < status.BAD_REQUEST
    assert len(rig.backend.calls) == 1


@pytest.mark.parametrize(("extra", "expected"), REFUSED)
async def test_refused_in_non_gets_a_non_answer(
    rig: Rig, extra: list[tuple[int, bytes]], expected: int
) -> None:
    _, reply = await rig.send(status.PUT, extra, mtype=NON, token=b"\x0e")
    assert (reply.mtype, reply.code, reply.token, reply.payload) == (NON, expected, b"\x0e", b"")
    assert rig.backend.calls == []


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([(opt.URI_QUERY, b"t=" + b"a" * 253)], id="uri-query-255"),
        pytest.param([(opt.URI_HOST, b"h" * 255)], id="uri-host-255"),
        pytest.param([(opt.URI_HOST, b"h")], id="uri-host-1"),
        pytest.param([(opt.URI_PORT, b"\x16\x33")], id="uri-port-2-bytes"),
        pytest.param([(opt.URI_PORT, b"")], id="uri-port-empty"),
        pytest.param([(opt.BLOCK2, b"\x00\x00\x06")], id="block2-3-bytes"),
        pytest.param([(opt.BLOCK1, b"")], id="block1-single-block"),
        pytest.param([(opt.BLOCK1, b"\x06")], id="block1-single-block-szx6"),
        pytest.param([(opt.URI_QUERY, b"a"), (opt.URI_QUERY, b"b")], id="uri-query-twice"),
        # Elective options never fail a request: unknown, wrong length or repeated → ignored.
        pytest.param([(opt.ETAG, b"")], id="etag-empty"),
        pytest.param([(opt.SIZE1, b"\x00" * 5)], id="size1-5-bytes"),
        pytest.param([(opt.OBSERVE, b""), (opt.OBSERVE, b"")], id="observe-twice"),
        pytest.param([(opt.NO_RESPONSE, b"\x00\x00")], id="no-response-2-bytes"),
        pytest.param([(98, b"x"), (98, b"y")], id="unknown-elective-twice"),
    ],
)
async def test_accepted_and_forwarded(rig: Rig, extra: list[tuple[int, bytes]]) -> None:
    _, reply = await rig.send(status.POST, extra)
    assert reply.code == status.CHANGED
    assert len(rig.backend.calls) == 1


async def test_uri_query_of_255_bytes_arrives_whole(rig: Rig) -> None:
    await rig.send(status.POST, [(opt.URI_QUERY, b"t=" + b"a" * 253)])
    assert rig.backend.calls[0][1].endswith("/thing?t=" + "a" * 253)


async def test_accept_with_a_leading_zero_byte_is_read(rig: Rig) -> None:
    # A uint may carry leading zeros (§3.2); two bytes are within Accept's 0-2.
    await rig.send(status.POST, [(opt.ACCEPT, b"\x00\x32")])
    assert rig.backend.calls[0][2]["accept"] == "application/json"


async def test_content_format_of_a_wrong_length_is_ignored(rig: Rig) -> None:
    # Content-Format is elective: wrong length → as if absent (§5.4.3, §5.4.1).
    _, reply = await rig.send(status.POST, [(opt.CONTENT_FORMAT, b"\x00\x00\x2a")])
    assert reply.code == status.CHANGED
    assert "content-type" not in rig.backend.calls[0][2]


async def test_repeated_content_format_keeps_the_first(rig: Rig) -> None:
    # §5.4.5: each supernumerary occurrence is treated like an unrecognized (elective) option.
    await rig.send(status.POST, [(opt.CONTENT_FORMAT, b"\x2a"), (opt.CONTENT_FORMAT, b"\x32")])
    assert rig.backend.calls[0][2]["content-type"] == "application/octet-stream"


async def test_proxy_uri_within_its_length_is_still_5_05(rig: Rig) -> None:
    _, reply = await rig.send(status.GET, [(opt.PROXY_URI, b"coap://h/" + b"a" * 1025)])
    assert (reply.code, reply.payload) == (status.PROXYING_NOT_SUPPORTED, b"")
    assert rig.backend.calls == []
