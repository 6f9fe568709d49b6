"""CoAP ↔ HTTP translation (issue 13 §3) through a real proxy and a real HTTP origin.

The origin is a small Starlette app of the test's own: it records what it received and answers
what the test sets, and, when given a current entity-tag, evaluates If-Match / If-None-Match
the way RFC 9110 §13.1 says an origin does (and Range, RFC 9110 §14). Each translation row is
one case: ETag, Location, Max-Age, preconditions and validation both ways, per-route status
overrides, route templates, resource discovery with query filtering, and the Block2 range
contract of the forwarder (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from policies.routes import parse_policy
from policies.translation import coap_etag
from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import CON, Message, parse_uint
from proxy.coap.requests import Request
from proxy.forward import ProxyHandler
from proxy.http1 import Http1Upstream
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from tests.support.coap import RawClient, request_datagram
from tests.support.http import serve_app

POLICY = """
[[route]]
path = "/thing"
methods = ["GET", "PUT", "POST", "DELETE"]
target = "/thing"

[[route]]
path = "/things"
methods = ["POST"]
target = "/api/things"

[[route]]
path = "/custom"
methods = ["GET", "POST", "DELETE"]
target = "/thing"
status = { "404" = "4.00", "2xx.POST" = "2.01", "204.DELETE" = "2.04", "5xx" = "5.03" }

[[route]]
path = "/commands/{device}"
methods = ["GET", "POST"]
target = "/api/commands/{device}"

[[route]]
path = "/commands/all"
methods = ["GET"]
target = "/api/all-commands"

[[route]]
path = "/auth/{pk}/{dk}"
methods = ["GET"]
target = "/auth?pk={pk}&dk={dk}"

[[route]]
path = "/sensors/temp"
methods = ["GET"]
target = "/thing"
link = { rt = "temperature-c", if = "sensor", ct = 50, obs = true }

[[route]]
path = "/sensors/light"
methods = ["GET"]
target = "/thing"
link = { rt = "light-lux illuminance", if = "sensor", ct = [0, 50], sz = 64 }
"""


@dataclass
class Origin:
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # The current entity-tag (a full field value, e.g. '"v1"'): the origin then evaluates
    # preconditions itself (RFC 9110 §13.2.2); None: it has no representation to compare.
    etag: str | None = None

    async def endpoint(self, request: HttpRequest) -> HttpResponse:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        # The target as sent (raw_path): Starlette's request.url has it percent-decoded.
        query = request.scope["query_string"].decode()
        target = request.scope["raw_path"].decode() + (f"?{query}" if query else "")
        self.requests.append((request.method, target, headers, body))
        if self.etag is not None or "if-match" in headers or "if-none-match" in headers:
            refused = self._preconditions(request.method, headers)
            if refused is not None:
                return refused
        extra = dict(self.headers)
        if self.etag is not None:
            extra["etag"] = self.etag
        return HttpResponse(self.body, status_code=self.status, headers=extra)

    def _preconditions(self, method: str, headers: dict[str, str]) -> HttpResponse | None:
        current = self.etag
        if_match = headers.get("if-match")
        if if_match is not None:
            tags = [t.strip() for t in if_match.split(",")]
            strong = current is not None and not current.startswith("W/")
            if current is None or not ("*" in tags or (strong and current in tags)):
                return HttpResponse(status_code=412)
        if_none_match = headers.get("if-none-match")
        if if_none_match is not None:
            tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
            weak_current = (current or "").removeprefix("W/")
            if current is not None and ("*" in tags or weak_current in tags):
                if method in ("GET", "HEAD"):
                    # RFC 9110 §15.4.5: a 304 carries the headers a 200 would (ETag,
                    # Cache-Control, Expires).
                    return HttpResponse(status_code=304, headers={**self.headers, "etag": current})
                return HttpResponse(status_code=412)
        return None


@dataclass
class Rig:
    origin: Origin
    proxy: RunningProxy
    client: RawClient
    base_url: str
    mid: int = 3000

    async def send(self, code: int, path: str, *, queries=(), payload=b"", extra=()) -> Message:
        self.mid += 1
        datagram = request_datagram(
            code, self.mid, path, token=b"\x0c", queries=queries, payload=payload, extra=extra
        )
        return await self.client.request(datagram, timeout=5.0)

    def sent(self, index: int = -1) -> tuple[str, str, dict[str, str], bytes]:
        return self.origin.requests[index]


def values(reply: Message, number: int) -> list[bytes]:
    return [v for n, v in reply.options if n == number]


def uints(reply: Message, number: int) -> list[int]:
    return [parse_uint(v) for v in values(reply, number)]


@pytest.fixture
async def rig(tmp_path) -> AsyncIterator[Rig]:
    origin = Origin()
    methods = ["GET", "POST", "PUT", "DELETE"]
    app = Starlette(routes=[Route("/{rest:path}", origin.endpoint, methods=methods)])
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    # No Date header of uvicorn's own: the Max-Age rows set Date themselves.
    async with serve_app(app, date_header=False) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port="off",
            upstream=base_url,
            policy=str(policy),
            upstream_timeout=2.0,
            ack_window=3.0,
        )
        proxy = await start_proxy(settings)
        client = await RawClient.connect(*proxy.address)
        rig = Rig(origin, proxy, client, base_url)
        try:
            yield rig
        finally:
            await client.aclose()
            await proxy.close()


# -- HTTP → CoAP: ETag -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param('"abc"', b"abc", id="strong-short"),
        pytest.param('"12345678"', b"12345678", id="strong-8-bytes"),
        pytest.param('"!#~"', b"!#~", id="strong-etagc-edges"),
    ],
)
async def test_a_short_strong_etag_travels_as_its_opaque_value(
    rig: Rig, header: str, expected: bytes
) -> None:
    rig.origin.headers = {"etag": header}
    rig.origin.body = b"x"
    reply = await rig.send(status.GET, "/thing")
    assert reply.code == status.CONTENT
    assert values(reply, opt.ETAG) == [expected]


@pytest.mark.parametrize(
    "header",
    [
        pytest.param('"123456789"', id="strong-9-bytes"),
        pytest.param('"d41d8cd98f00b204e9800998ecf8427e"', id="strong-md5"),
        pytest.param('W/"abc"', id="weak"),
        pytest.param('""', id="empty-opaque"),
    ],
)
async def test_any_other_etag_is_a_stable_8_byte_hash(rig: Rig, header: str) -> None:
    rig.origin.headers = {"etag": header}
    first = await rig.send(status.GET, "/thing")
    second = await rig.send(status.GET, "/thing")
    [etag] = values(first, opt.ETAG)
    assert len(etag) == 8
    assert etag[0] == 0
    assert values(second, opt.ETAG) == [etag]
    rig.origin.headers = {"etag": '"other-representation"'}
    assert values(await rig.send(status.GET, "/thing"), opt.ETAG) != [etag]


async def test_weak_and_strong_tags_of_one_value_differ(rig: Rig) -> None:
    rig.origin.headers = {"etag": '"abc"'}
    strong = values(await rig.send(status.GET, "/thing"), opt.ETAG)
    rig.origin.headers = {"etag": 'W/"abc"'}
    weak = values(await rig.send(status.GET, "/thing"), opt.ETAG)
    assert strong == [b"abc"]
    assert weak != strong


async def test_no_etag_header_no_etag_option(rig: Rig) -> None:
    rig.origin.body = b"x"
    assert values(await rig.send(status.GET, "/thing"), opt.ETAG) == []


async def test_errors_carry_no_etag(rig: Rig) -> None:
    rig.origin.status, rig.origin.headers = 404, {"etag": '"abc"'}
    reply = await rig.send(status.GET, "/thing")
    assert (reply.code, values(reply, opt.ETAG), reply.payload) == (status.NOT_FOUND, [], b"")


# -- HTTP → CoAP: Max-Age --------------------------------------------------------------------

DATE = 4_000_000_000  # a fixed Date (2096): Expires rows compare against it, not the clock
_HTTP_DATE = formatdate(DATE, usegmt=True)


@pytest.mark.parametrize(
    ("http_status", "headers", "expected"),
    [
        pytest.param(200, {"cache-control": "max-age=30"}, [30], id="max-age"),
        pytest.param(200, {"cache-control": "public, max-age=0"}, [0], id="max-age-0"),
        pytest.param(200, {"cache-control": "s-maxage=10, max-age=30"}, [10], id="s-maxage"),
        pytest.param(200, {"cache-control": "max-age=5, s-maxage=10"}, [5], id="smaller-wins"),
        pytest.param(200, {"cache-control": "no-store"}, [0], id="no-store"),
        pytest.param(200, {"cache-control": "no-cache"}, [0], id="no-cache"),
        pytest.param(200, {"cache-control": "private, max-age=60"}, [0], id="private"),
        pytest.param(200, {"cache-control": "max-age=soon"}, [0], id="invalid-max-age"),
        pytest.param(
            200, {"cache-control": "max-age=99999999999"}, [0xFFFFFFFF], id="max-age-clamped"
        ),
        pytest.param(
            200,
            {"date": _HTTP_DATE, "expires": formatdate(DATE + 120, usegmt=True)},
            [120],
            id="expires-minus-date",
        ),
        pytest.param(
            200,
            {"date": _HTTP_DATE, "expires": formatdate(DATE - 5, usegmt=True)},
            [0],
            id="expires-past",
        ),
        pytest.param(200, {"expires": "0"}, [0], id="expires-invalid"),
        pytest.param(
            200,
            {
                "cache-control": "max-age=7",
                "date": _HTTP_DATE,
                "expires": formatdate(DATE + 120, usegmt=True),
            },
            [7],
            id="max-age-beats-expires",
        ),
        # No freshness information: absent (CoAP's 60 s) where HTTP lets a cache keep the
        # response by heuristics (RFC 9110 §15.1), else 0.
        pytest.param(200, {}, [], id="none-200"),
        pytest.param(202, {}, [0], id="none-202"),
        pytest.param(404, {}, [], id="none-404"),
        pytest.param(400, {}, [0], id="none-400"),
        pytest.param(500, {}, [0], id="none-500"),
        pytest.param(404, {"cache-control": "max-age=5"}, [5], id="error-with-max-age"),
        pytest.param(403, {"cache-control": "no-store"}, [0], id="error-no-store"),
    ],
)
async def test_max_age_from_the_origins_freshness(
    rig: Rig, http_status: int, headers: dict[str, str], expected: list[int]
) -> None:
    rig.origin.status, rig.origin.headers = http_status, headers
    reply = await rig.send(status.GET, "/thing")
    assert uints(reply, opt.MAX_AGE) == expected


@pytest.mark.parametrize(
    ("method", "http_status", "code"),
    [
        pytest.param(status.POST, 200, status.CHANGED, id="2.04"),
        pytest.param(status.POST, 201, status.CREATED, id="2.01"),
        pytest.param(status.DELETE, 200, status.DELETED, id="2.02"),
    ],
)
async def test_no_max_age_on_codes_that_are_not_cacheable(
    rig: Rig, method: int, http_status: int, code: int
) -> None:
    # RFC 7252 §5.9.1.1, .2, .4: 2.01, 2.02 and 2.04 are not cacheable; Max-Age says nothing.
    rig.origin.status, rig.origin.headers = http_status, {"cache-control": "max-age=30"}
    reply = await rig.send(method, "/thing")
    assert (reply.code, uints(reply, opt.MAX_AGE)) == (code, [])


async def test_retry_after_still_wins_on_5_03(rig: Rig) -> None:
    rig.origin.status, rig.origin.headers = 503, {"retry-after": "9", "cache-control": "no-store"}
    reply = await rig.send(status.GET, "/thing")
    assert (reply.code, uints(reply, opt.MAX_AGE)) == (status.SERVICE_UNAVAILABLE, [9])


# -- HTTP → CoAP: Location -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "paths", "queries"),
    [
        pytest.param("/api/things/42", ["things", "42"], [], id="under-the-target"),
        pytest.param("/api/things", ["things"], [], id="the-target-itself"),
        pytest.param(
            "/api/things/42?x=1&y=a%20b", ["things", "42"], ["x=1", "y=a b"], id="with-query"
        ),
        pytest.param("/api/things/a%2Fb", ["things", "a/b"], [], id="percent-decoded-segment"),
        pytest.param("/elsewhere/7", ["elsewhere", "7"], [], id="same-origin-elsewhere"),
        pytest.param("other/9", ["api", "other", "9"], [], id="relative-reference"),
        pytest.param("/", [], [], id="root"),
        pytest.param("/?q=1", [], ["q=1"], id="query-only"),
        pytest.param("http://other.example/x", [], [], id="other-origin-left-out"),
    ],
)
async def test_location_becomes_location_path_and_query_on_2_01(
    rig: Rig, location: str, paths: list[str], queries: list[str]
) -> None:
    rig.origin.status, rig.origin.headers = 201, {"location": location}
    reply = await rig.send(status.POST, "/things", payload=b"{}")
    assert reply.code == status.CREATED
    assert [v.decode() for v in values(reply, opt.LOCATION_PATH)] == paths
    assert [v.decode() for v in values(reply, opt.LOCATION_QUERY)] == queries


async def test_an_absolute_location_on_the_same_origin_is_mapped(rig: Rig) -> None:
    rig.origin.status = 201
    rig.origin.headers = {"location": f"{rig.base_url}/api/things/9"}
    reply = await rig.send(status.POST, "/things")
    assert values(reply, opt.LOCATION_PATH) == [b"things", b"9"]


async def test_location_on_a_template_route_maps_back_onto_the_devices_path(rig: Rig) -> None:
    rig.origin.status, rig.origin.headers = 201, {"location": "/api/commands/dev-1/77"}
    reply = await rig.send(status.POST, "/commands/dev-1")
    assert values(reply, opt.LOCATION_PATH) == [b"commands", b"dev-1", b"77"]


async def test_location_only_on_2_01(rig: Rig) -> None:
    rig.origin.status, rig.origin.headers = 200, {"location": "/api/things/42"}
    reply = await rig.send(status.POST, "/things")
    assert reply.code == status.CHANGED
    assert values(reply, opt.LOCATION_PATH) == []


# -- CoAP → HTTP: validation (ETag in a GET) -------------------------------------------------


async def test_conditional_get_with_the_current_etag_is_2_03_valid(rig: Rig) -> None:
    rig.origin.etag, rig.origin.body = '"v1"', b"representation"
    reply = await rig.send(status.GET, "/thing", extra=[(opt.ETAG, b"v1")])
    assert rig.sent()[2]["if-none-match"] == '"v1"'
    assert (reply.code, values(reply, opt.ETAG), reply.payload) == (status.VALID, [b"v1"], b"")
    assert uints(reply, opt.CONTENT_FORMAT) == []


async def test_conditional_get_with_several_etags_names_the_valid_one(rig: Rig) -> None:
    rig.origin.etag = '"v1"'
    reply = await rig.send(status.GET, "/thing", extra=[(opt.ETAG, b"v0"), (opt.ETAG, b"v1")])
    assert rig.sent()[2]["if-none-match"] == '"v0", "v1"'
    assert (reply.code, values(reply, opt.ETAG)) == (status.VALID, [b"v1"])


async def test_conditional_get_with_a_stale_etag_gets_the_representation(rig: Rig) -> None:
    rig.origin.etag, rig.origin.body = '"v2"', b"new"
    reply = await rig.send(status.GET, "/thing", extra=[(opt.ETAG, b"v1")])
    assert (reply.code, values(reply, opt.ETAG), reply.payload) == (status.CONTENT, [b"v2"], b"new")


async def test_a_304_keeps_max_age(rig: Rig) -> None:
    rig.origin.etag, rig.origin.headers = '"v1"', {"cache-control": "max-age=40"}
    reply = await rig.send(status.GET, "/thing", extra=[(opt.ETAG, b"v1")])
    assert (reply.code, uints(reply, opt.MAX_AGE)) == (status.VALID, [40])


async def test_conditional_get_with_a_hashed_etag_is_validated_by_the_proxy(rig: Rig) -> None:
    # The origin's tag is too long for CoAP: the device holds the proxy's hash, which cannot
    # be named to the origin; the proxy compares the answer's tag itself.
    rig.origin.etag, rig.origin.body = '"d41d8cd98f00b204e9800998ecf8427e"', b"big"
    [hashed] = values(await rig.send(status.GET, "/thing"), opt.ETAG)
    reply = await rig.send(status.GET, "/thing", extra=[(opt.ETAG, hashed)])
    assert "if-none-match" not in rig.sent()[2]
    assert (reply.code, values(reply, opt.ETAG), reply.payload) == (status.VALID, [hashed], b"")


async def test_a_304_to_a_get_without_etags_is_5_02(rig: Rig) -> None:
    # 2.03 without an ETag tells a CoAP client nothing (RFC 7252 §5.9.1.3).
    rig.origin.status = 304
    reply = await rig.send(status.GET, "/thing")
    assert (reply.code, reply.payload) == (status.BAD_GATEWAY, b"")


async def test_an_etag_of_a_wrong_length_is_ignored(rig: Rig) -> None:
    # ETag is elective: out of its 1-8 bytes it is as if absent (RFC 7252 §5.4.3).
    rig.origin.etag, rig.origin.body = '"v1"', b"x"
    reply = await rig.send(status.GET, "/thing", extra=[(opt.ETAG, b"")])
    assert "if-none-match" not in rig.sent()[2]
    assert reply.code == status.CONTENT


# -- CoAP → HTTP: preconditions (If-Match, If-None-Match) ------------------------------------


@pytest.mark.parametrize(
    ("if_match", "header", "code"),
    [
        pytest.param([b"v1"], '"v1"', status.CHANGED, id="current"),
        pytest.param([b"v0"], '"v0"', status.PRECONDITION_FAILED, id="stale"),
        pytest.param([b"v0", b"v1"], '"v0", "v1"', status.CHANGED, id="one-of-two"),
        pytest.param([b""], "*", status.CHANGED, id="empty-is-any"),
    ],
)
async def test_if_match_is_forwarded(
    rig: Rig, if_match: list[bytes], header: str, code: int
) -> None:
    rig.origin.etag = '"v1"'
    rig.origin.status = 204
    reply = await rig.send(
        status.PUT, "/thing", payload=b"new", extra=[(opt.IF_MATCH, v) for v in if_match]
    )
    assert rig.sent()[0] == "PUT"
    assert rig.sent()[2]["if-match"] == header
    assert (reply.code, reply.payload) == (code, b"")


async def test_if_match_with_a_hashed_etag_asks_the_origin_for_its_tag_first(rig: Rig) -> None:
    long_tag = '"d41d8cd98f00b204e9800998ecf8427e"'
    rig.origin.etag, rig.origin.status = long_tag, 204
    hashed = coap_etag(long_tag)
    assert hashed is not None
    reply = await rig.send(status.PUT, "/thing", payload=b"new", extra=[(opt.IF_MATCH, hashed)])
    assert reply.code == status.CHANGED
    (probe_method, _, probe, _), (method, _, sent, body) = rig.origin.requests
    assert probe_method == "GET"
    assert "if-match" not in probe
    assert "idempotency-key" not in probe
    assert "idempotency-key" in sent  # the real request keeps its own
    assert (method, sent["if-match"], body) == ("PUT", long_tag, b"new")


async def test_if_match_with_a_hashed_etag_that_is_stale_is_4_12_unforwarded(rig: Rig) -> None:
    rig.origin.etag = '"d41d8cd98f00b204e9800998ecf8427e"'
    stale = coap_etag('"00000000000000000000000000000000"')
    assert stale is not None
    reply = await rig.send(status.PUT, "/thing", payload=b"new", extra=[(opt.IF_MATCH, stale)])
    assert (reply.code, reply.payload) == (status.PRECONDITION_FAILED, b"")
    assert [m for m, *_ in rig.origin.requests] == ["GET"]


@pytest.mark.parametrize(
    ("current", "code"),
    [
        pytest.param('"v1"', status.PRECONDITION_FAILED, id="exists-4.12"),
        pytest.param(None, status.CREATED, id="absent-created"),
    ],
)
async def test_if_none_match_is_forwarded_as_star(rig: Rig, current: str | None, code) -> None:
    rig.origin.etag, rig.origin.status = current, 201
    reply = await rig.send(status.PUT, "/thing", payload=b"x", extra=[(opt.IF_NONE_MATCH, b"")])
    assert rig.sent()[2]["if-none-match"] == "*"
    assert reply.code == code


async def test_an_unconditional_request_carries_no_precondition(rig: Rig) -> None:
    rig.origin.status = 204
    await rig.send(status.PUT, "/thing", payload=b"x")
    assert not {"if-match", "if-none-match", "range"} & set(rig.sent()[2])


async def test_size1_adds_nothing_to_the_http_request(rig: Rig) -> None:
    # The body travels whole with its own Content-Length; Size1 is only a hint (RFC 7959 §4).
    rig.origin.status = 204
    await rig.send(status.PUT, "/thing", payload=b"abc", extra=[(opt.SIZE1, b"\x03")])
    assert rig.sent()[2]["content-length"] == "3"


# -- status overrides per route ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "http_status", "custom", "default"),
    [
        pytest.param(status.GET, 404, status.BAD_REQUEST, status.NOT_FOUND, id="404"),
        pytest.param(status.POST, 200, status.CREATED, status.CHANGED, id="2xx.POST"),
        pytest.param(status.POST, 204, status.CREATED, status.CHANGED, id="2xx.POST-204"),
        pytest.param(status.DELETE, 204, status.CHANGED, status.DELETED, id="204.DELETE"),
        pytest.param(status.DELETE, 200, status.DELETED, status.DELETED, id="200.DELETE-default"),
        pytest.param(
            status.GET, 500, status.SERVICE_UNAVAILABLE, status.INTERNAL_SERVER_ERROR, id="5xx"
        ),
        pytest.param(status.GET, 200, status.CONTENT, status.CONTENT, id="200.GET-default"),
    ],
)
async def test_a_routes_status_rows_override_the_table(
    rig: Rig, method: int, http_status: int, custom: int, default: int
) -> None:
    rig.origin.status = http_status
    assert (await rig.send(method, "/custom")).code == custom
    assert (await rig.send(method, "/thing")).code == default  # other routes: the table


# -- route templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path_segments", "url_tail"),
    [
        pytest.param(["commands", "dev-1"], "/api/commands/dev-1", id="one-variable"),
        pytest.param(["commands", "a/b c"], "/api/commands/a%2Fb%20c", id="percent-encoded"),
        pytest.param(["commands", "all"], "/api/all-commands", id="exact-path-wins"),
        pytest.param(["auth", "pk1", "dk 2"], "/auth?pk=pk1&dk=dk%202", id="into-the-query"),
    ],
)
async def test_a_template_route_is_substituted_into_the_target(
    rig: Rig, path_segments: list[str], url_tail: str
) -> None:
    rig.origin.body = b"ok"
    extra = [(opt.URI_PATH, s.encode()) for s in path_segments]
    reply = await rig.send(status.GET, "/", extra=extra)
    assert reply.code == status.CONTENT
    assert rig.sent()[1] == url_tail


@pytest.mark.parametrize(
    ("path", "method", "code"),
    [
        pytest.param("/commands", status.GET, status.NOT_FOUND, id="too-few-segments"),
        pytest.param("/commands/a/b", status.GET, status.NOT_FOUND, id="too-many-segments"),
        pytest.param("/commands/x", status.PUT, status.METHOD_NOT_ALLOWED, id="wrong-method"),
        pytest.param("/auth/x", status.GET, status.NOT_FOUND, id="missing-variable"),
    ],
)
async def test_a_path_the_templates_do_not_fit(rig: Rig, path: str, method: int, code) -> None:
    assert (await rig.send(method, path)).code == code
    assert rig.origin.requests == []


async def test_an_empty_segment_fills_no_variable(rig: Rig) -> None:
    reply = await rig.send(
        status.GET, "/", extra=[(opt.URI_PATH, b"commands"), (opt.URI_PATH, b"")]
    )
    assert reply.code == status.NOT_FOUND


# -- resource discovery ------------------------------------------------------------------------

ALL_LINKS = (
    b"</thing>,</things>,</custom>,</commands/all>,"
    b'</sensors/temp>;rt="temperature-c";if="sensor";ct=50;obs,'
    b'</sensors/light>;rt="light-lux illuminance";if="sensor";ct="0 50";sz=64'
)


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        pytest.param([], ALL_LINKS, id="unfiltered-no-templates"),
        pytest.param(["rt=temperature-c"], [b"/sensors/temp"], id="rt"),
        pytest.param(["rt=illuminance"], [b"/sensors/light"], id="rt-one-of-several"),
        pytest.param(["rt=l*"], [b"/sensors/light"], id="rt-prefix"),
        pytest.param(["if=sensor"], [b"/sensors/temp", b"/sensors/light"], id="if"),
        pytest.param(["ct=0"], [b"/sensors/light"], id="ct-one-of-several"),
        pytest.param(["ct=50"], [b"/sensors/temp", b"/sensors/light"], id="ct"),
        pytest.param(["sz=64"], [b"/sensors/light"], id="sz"),
        pytest.param(["obs"], [b"/sensors/temp"], id="obs-flag"),
        pytest.param(["href=/thing"], [b"/thing"], id="href"),
        pytest.param(["href=/things*"], [b"/thing", b"/things"][1:], id="href-prefix"),
        pytest.param(["href=/sensors/*"], [b"/sensors/temp", b"/sensors/light"], id="href-dir"),
        pytest.param(["rt=*"], [b"/sensors/temp", b"/sensors/light"], id="rt-any"),
        pytest.param(["if=sensor", "ct=0"], [b"/sensors/light"], id="two-filters-both"),
        pytest.param(["rt=nothing"], [], id="no-match-empty"),
        pytest.param(["title=x"], [], id="unknown-attribute"),
    ],
)
async def test_discovery_lists_routes_with_attributes_and_filters(
    rig: Rig, queries: list[str], expected: bytes | list[bytes]
) -> None:
    reply = await rig.send(status.GET, "/.well-known/core", queries=queries)
    assert reply.code == status.CONTENT
    assert uints(reply, opt.CONTENT_FORMAT) == [40]
    if isinstance(expected, bytes):
        assert reply.payload == expected
    else:
        hrefs = [link.split(b">")[0][1:] for link in reply.payload.split(b",") if link]
        assert hrefs == expected
    assert rig.origin.requests == []


# -- the Block2 range contract (docs/ARCHITECTURE.md) ------------------------------------------

REPRESENTATION = bytes(range(256)) * 10  # 2560 bytes


@dataclass
class RangeOrigin:
    mode: str  # "ranges", "ignores", "bad-206"
    ranges_asked: list[str | None] = field(default_factory=list)

    async def endpoint(self, request: HttpRequest) -> HttpResponse:
        asked = request.headers.get("range")
        self.ranges_asked.append(asked)
        tag = {"etag": '"rep-1"', "content-type": "application/octet-stream"}
        if asked is None or self.mode == "ignores":
            return HttpResponse(REPRESENTATION, headers=tag)
        first_text, last_text = asked.removeprefix("bytes=").split("-")
        first, last = int(first_text), min(int(last_text), len(REPRESENTATION) - 1)
        if first >= len(REPRESENTATION):
            return HttpResponse(
                status_code=416, headers={"content-range": f"bytes */{len(REPRESENTATION)}"}
            )
        if self.mode == "bad-206":
            return HttpResponse(b"??", status_code=206, headers={**tag, "content-range": "x"})
        return HttpResponse(
            REPRESENTATION[first : last + 1],
            status_code=206,
            headers={**tag, "content-range": f"bytes {first}-{last}/{len(REPRESENTATION)}"},
        )


@contextlib.asynccontextmanager
async def range_handler(mode: str) -> AsyncIterator[tuple[ProxyHandler, RangeOrigin]]:
    origin = RangeOrigin(mode)
    app = Starlette(routes=[Route("/fw/{version}", origin.endpoint)])
    policy = parse_policy(
        '[[route]]\npath = "/firmware/{version}"\nmethods = ["GET"]\ntarget = "/fw/{version}"\n'
    )
    async with serve_app(app) as base_url:
        upstream = Http1Upstream(timeout=2.0)
        handler = ProxyHandler(
            policy=policy, upstream=upstream, base_url=base_url, proxy_token=None
        )
        try:
            yield handler, origin
        finally:
            await upstream.aclose()


def block_request(first: int, last: int) -> Request:
    options = [(opt.URI_PATH, b"firmware"), (opt.URI_PATH, b"1.2")]
    message = Message(CON, status.GET, 1, b"\x01", options)
    request = Request(status.GET, "/firmware/1.2", [], message, ("127.0.0.1", 5683))
    request.byte_range = (first, last)
    return request


async def test_a_range_the_origin_serves_is_a_slice_with_the_total_size() -> None:
    async with range_handler("ranges") as (handler, origin):
        response = await handler.handle(block_request(1024, 2047))
    assert origin.ranges_asked == ["bytes=1024-2047"]
    assert (response.code, response.payload, response.size) == (
        status.CONTENT,
        REPRESENTATION[1024:2048],
        len(REPRESENTATION),
    )
    assert (opt.ETAG, b"rep-1") in response.options


async def test_the_last_short_block_is_a_short_slice() -> None:
    async with range_handler("ranges") as (handler, _):
        response = await handler.handle(block_request(2048, 3071))
    assert (response.payload, response.size) == (REPRESENTATION[2048:], len(REPRESENTATION))


async def test_an_origin_ignoring_range_gives_the_whole_body_and_no_size() -> None:
    async with range_handler("ignores") as (handler, _):
        response = await handler.handle(block_request(1024, 2047))
    assert (response.code, response.payload, response.size) == (
        status.CONTENT,
        REPRESENTATION,
        None,
    )


async def test_a_range_past_the_end_is_4_02_with_the_size() -> None:
    async with range_handler("ranges") as (handler, _):
        response = await handler.handle(block_request(4096, 5119))
    assert (response.code, response.payload, response.size) == (
        status.BAD_OPTION,
        b"",
        len(REPRESENTATION),
    )


async def test_a_206_that_is_not_the_asked_slice_is_fetched_again_whole() -> None:
    async with range_handler("bad-206") as (handler, origin):
        response = await handler.handle(block_request(0, 1023))
    assert origin.ranges_asked == ["bytes=0-1023", None]
    assert (response.payload, response.size) == (REPRESENTATION, None)


async def test_without_a_byte_range_no_range_header_is_sent() -> None:
    async with range_handler("ranges") as (handler, origin):
        request = block_request(0, 0)
        request.byte_range = None
        response = await handler.handle(request)
    assert origin.ranges_asked == [None]
    assert (response.payload, response.size) == (REPRESENTATION, None)
