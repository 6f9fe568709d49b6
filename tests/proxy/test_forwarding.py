"""The proxy's forwarding over real sockets: CoAP datagrams in, a real HTTP backend behind.

The backend is a small Starlette app of the test's own that records what it received and
answers whatever status/headers the test asks for, so each row of the docs/CONTRACT.md §10
table and each header of the §11 contract is checked through the real proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from policies import forwarding
from policies.routes import PolicyError, load_policy
from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, Message, encode_parts, parse_uint
from proxy.coap.requests import Request
from proxy.forward import ProxyHandler
from proxy.http1 import Http1Upstream
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from tests.support.coap import RawClient, request_datagram
from tests.support.http import free_port, serve_app

POLICY = """
[[route]]
path = "/"
methods = ["POST"]
target = "/ingest"
topic_query = true

[[route]]
path = "/data"
methods = ["POST"]
target = "/ingest"
topic_query = true

[[route]]
path = "/thing"
methods = ["GET", "PUT", "DELETE", "POST"]
target = "/thing"
"""


@dataclass
class Backend:
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0

    async def endpoint(self, request: HttpRequest) -> HttpResponse:
        body = await request.body()
        self.requests.append(
            (
                request.method,
                str(request.url),
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        return HttpResponse(self.body, status_code=self.status, headers=self.headers)


@dataclass
class Rig:
    backend: Backend
    proxy: RunningProxy
    client: RawClient
    mid: int = 1000

    async def send(self, code: int, path: str, *, queries=(), payload=b"", extra=()) -> object:
        self.mid += 1
        datagram = request_datagram(
            code, self.mid, path, token=b"\x0a\x0b", queries=queries, payload=payload, extra=extra
        )
        return await self.client.request(datagram, timeout=5.0)


@pytest.fixture
async def rig(tmp_path) -> AsyncIterator[Rig]:
    backend = Backend()
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    app = Starlette(
        routes=[
            Route("/ingest", backend.endpoint, methods=methods),
            Route("/thing", backend.endpoint, methods=methods),
        ]
    )
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    async with serve_app(app) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            upstream=base_url,
            policy=str(policy),
            proxy_token="s3cret",
            upstream_timeout=1.0,
            ack_window=3.0,
        )
        proxy = await start_proxy(settings)
        client = await RawClient.connect(*proxy.address)
        rig = Rig(backend, proxy, client)
        yield rig
        client.close()
        await rig.proxy.close()


async def test_internal_contract_headers_are_sent(rig: Rig) -> None:
    reply = await rig.send(
        status.POST,
        "/",
        queries=["t=a/b"],
        payload=b"\x00\x01raw",
        extra=[(opt.CONTENT_FORMAT, bytes([42]))],
    )
    assert reply.code == status.CHANGED
    method, url, headers, body = rig.backend.requests[0]
    assert method == "POST"
    assert url.endswith("/ingest?t=a/b")
    assert body == b"\x00\x01raw"
    port = rig.client.port
    assert headers["forwarded"] == f'for="127.0.0.1:{port}";proto=coap'
    assert headers[forwarding.TOKEN_HEADER.lower()] == "s3cret"
    assert headers[forwarding.IDEMPOTENCY_HEADER.lower()] == forwarding.idempotency_key(
        "127.0.0.1", port, rig.mid, b"\x0a\x0b"
    )
    assert headers["content-type"] == "application/octet-stream"


async def test_accept_is_carried_and_content_type_becomes_content_format(rig: Rig) -> None:
    rig.backend.status = 200
    rig.backend.headers = {"content-type": "application/json"}
    rig.backend.body = b'{"a":1}'
    reply = await rig.send(status.GET, "/thing", extra=[(opt.ACCEPT, bytes([50]))])
    assert rig.backend.requests[0][2]["accept"] == "application/json"
    assert reply.code == status.CONTENT
    assert reply.payload == b'{"a":1}'
    assert [parse_uint(v) for n, v in reply.options if n == opt.CONTENT_FORMAT] == [50]


@pytest.mark.parametrize(
    ("http_status", "coap_method", "expected"),
    [
        (200, status.GET, status.CONTENT),
        (200, status.POST, status.CHANGED),
        (200, status.PUT, status.CHANGED),
        (201, status.POST, status.CREATED),
        (204, status.POST, status.CHANGED),
        (204, status.DELETE, status.DELETED),
        (200, status.DELETE, status.DELETED),
        (202, status.DELETE, status.DELETED),
        (204, status.GET, status.CONTENT),
        (202, status.GET, status.CONTENT),
        # A 304 is 2.03 Valid only with an ETag the request named (test_translation.py); to a
        # GET that named none it means nothing to a CoAP client.
        (304, status.GET, status.BAD_GATEWAY),
        (400, status.POST, status.BAD_REQUEST),
        (401, status.POST, status.UNAUTHORIZED),
        (403, status.POST, status.FORBIDDEN),
        (404, status.GET, status.NOT_FOUND),
        (405, status.PUT, status.METHOD_NOT_ALLOWED),
        (406, status.GET, status.NOT_ACCEPTABLE),
        (409, status.POST, status.BAD_REQUEST),
        (412, status.PUT, status.PRECONDITION_FAILED),
        (413, status.POST, status.REQUEST_ENTITY_TOO_LARGE),
        (415, status.POST, status.UNSUPPORTED_CONTENT_FORMAT),
        (429, status.POST, status.TOO_MANY_REQUESTS),
        (500, status.POST, status.INTERNAL_SERVER_ERROR),
        (501, status.POST, status.NOT_IMPLEMENTED),
        (502, status.POST, status.BAD_GATEWAY),
        (503, status.POST, status.SERVICE_UNAVAILABLE),
        (504, status.POST, status.GATEWAY_TIMEOUT),
        (507, status.POST, status.INTERNAL_SERVER_ERROR),
        (302, status.GET, status.BAD_GATEWAY),
    ],
)
async def test_status_translation_through_real_http(
    rig: Rig, http_status, coap_method, expected
) -> None:
    rig.backend.status = http_status
    rig.backend.body = b"error details" if http_status >= 400 else b""
    reply = await rig.send(coap_method, "/thing")
    assert reply.mtype == ACK
    assert reply.code == expected
    if http_status >= 400:
        assert reply.payload == b""  # errors never carry a payload (docs/CONTRACT.md §3)


@pytest.mark.parametrize(
    ("http_status", "expected"),
    [(503, status.SERVICE_UNAVAILABLE), (429, status.TOO_MANY_REQUESTS)],
)
async def test_retry_after_becomes_max_age(rig: Rig, http_status: int, expected: int) -> None:
    rig.backend.status = http_status
    rig.backend.headers = {"retry-after": "7"}
    reply = await rig.send(status.GET, "/thing")
    assert (reply.code, reply.payload) == (expected, b"")
    assert [parse_uint(v) for n, v in reply.options if n == opt.MAX_AGE] == [7]


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("a//b", status.BAD_REQUEST),
        ("a-b", status.BAD_REQUEST),
        ("ä", status.BAD_REQUEST),
        ("", status.BAD_REQUEST),
        # t= and 254 characters: a Uri-Query of 256 bytes, over the option's 255 (RFC 7252
        # §5.10, §5.4.3): the critical option is unrecognized before the topic rule is asked.
        ("a" * 254, status.BAD_OPTION),
    ],
)
async def test_bad_topic_is_rejected_before_forwarding(rig: Rig, topic: str, expected) -> None:
    reply = await rig.send(status.POST, "/", queries=[f"t={topic}"])
    assert (reply.code, reply.payload) == (expected, b"")
    assert rig.backend.requests == []


async def test_longest_valid_topic_is_forwarded(rig: Rig) -> None:
    reply = await rig.send(status.POST, "/", queries=["t=" + "a" * 253])
    assert reply.code == status.CHANGED
    assert len(rig.backend.requests) == 1


async def test_wrong_method_and_unknown_path(rig: Rig) -> None:
    assert (await rig.send(status.GET, "/")).code == status.METHOD_NOT_ALLOWED
    assert (await rig.send(status.POST, "/nope")).code == status.NOT_FOUND
    assert rig.backend.requests == []


async def test_well_known_core_is_served_by_the_proxy(rig: Rig) -> None:
    reply = await rig.send(status.GET, "/.well-known/core")
    assert reply.code == status.CONTENT
    assert reply.payload == b"</>,</data>,</thing>"
    assert [parse_uint(v) for n, v in reply.options if n == opt.CONTENT_FORMAT] == [40]
    assert rig.backend.requests == []


async def test_payload_over_the_limit_is_4_13_with_size1(rig: Rig, tmp_path) -> None:
    await rig.proxy.close()
    settings = ProxySettings(
        coap_host="127.0.0.1", coap_port=0, upstream="http://127.0.0.1:9", max_payload=16
    )
    rig.proxy = await start_proxy(settings)
    client = await RawClient.connect(*rig.proxy.address)
    reply = await client.request(encode_parts(CON, status.POST, 7, b"", [], b"x" * 17))
    client.close()
    assert reply.code == status.REQUEST_ENTITY_TOO_LARGE
    assert [parse_uint(v) for n, v in reply.options if n == opt.SIZE1] == [16]


async def test_upstream_timeout_is_5_04(rig: Rig) -> None:
    rig.backend.delay = 1.5  # the proxy's upstream_timeout is 1.0 s
    reply = await rig.send(status.POST, "/data")
    assert reply.code == status.GATEWAY_TIMEOUT
    assert reply.payload == b""


async def test_upstream_unreachable_is_5_02() -> None:
    settings = ProxySettings(
        coap_host="127.0.0.1", coap_port=0, upstream=f"http://127.0.0.1:{free_port()}"
    )
    proxy = await start_proxy(settings)
    client = await RawClient.connect(*proxy.address)
    reply = await client.request(encode_parts(CON, status.POST, 9, b"", [], b"x"))
    client.close()
    await proxy.close()
    assert reply.code == status.BAD_GATEWAY


async def test_production_mode_serves_only_bootstrap_on_plain_coap() -> None:
    # docs/CONTRACT.md §6: with require_dtls, plain CoAP is for fetching a PSK and nothing else.
    calls: list[str] = []

    async def bootstrap(request: HttpRequest) -> HttpResponse:
        calls.append(request.url.path)
        return HttpResponse(b"8988280666000000001,key,coaps://h:5684", media_type="text/plain")

    app = Starlette(
        routes=[Route("/bootstrap", bootstrap), Route("/ingest/batch", bootstrap, methods=["POST"])]
    )
    async with serve_app(app) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port="off",
            upstream=base_url,
            require_dtls=True,
        )
        proxy = await start_proxy(settings)
        client = await RawClient.connect(*proxy.address)
        try:
            fetched = await client.request(
                encode_parts(CON, status.GET, 1, b"", [(opt.URI_PATH, b"bootstrap")], b"")
            )
            telemetry = await client.request(encode_parts(CON, status.POST, 2, b"", [], b"x"))
            discovery = await client.request(
                encode_parts(
                    CON,
                    status.GET,
                    3,
                    b"",
                    [(opt.URI_PATH, b".well-known"), (opt.URI_PATH, b"core")],
                    b"",
                )
            )
        finally:
            await client.aclose()
            await proxy.close()
    assert (fetched.code, fetched.payload) == (
        status.CONTENT,
        b"8988280666000000001,key,coaps://h:5684",
    )
    assert (telemetry.code, telemetry.payload) == (status.UNAUTHORIZED, b"")
    assert discovery.code == status.UNAUTHORIZED
    assert calls == ["/bootstrap"]


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        pytest.param("down", status.BAD_GATEWAY, id="5.02"),
        pytest.param("slow", status.GATEWAY_TIMEOUT, id="5.04"),
    ],
)
async def test_location_with_the_backend_down_or_slow(backend: str, expected: int) -> None:
    # Issue #6's table: 5.02 when the backend is down, 5.04 when it is slow; empty payloads.
    async def slow(request: HttpRequest) -> HttpResponse:
        await asyncio.sleep(2)
        return HttpResponse(b"too late", media_type="text/plain")

    async with contextlib.AsyncExitStack() as stack:
        if backend == "slow":
            base_url = await stack.enter_async_context(
                serve_app(Starlette(routes=[Route("/location", slow)]))
            )
        else:
            base_url = f"http://127.0.0.1:{free_port()}"
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port="off",
            upstream=base_url,
            upstream_timeout=0.5,
        )
        proxy = await start_proxy(settings)
        client = await RawClient.connect(*proxy.address)
        try:
            reply = await client.request(
                encode_parts(CON, status.GET, 7, b"\x01", [(opt.URI_PATH, b"location")], b""),
                timeout=5,
            )
        finally:
            await client.aclose()
            await proxy.close()
    assert (reply.mtype, reply.code, reply.payload) == (ACK, expected, b"")


async def test_internal_headers_go_only_to_the_upstream_and_trusted_origins(tmp_path) -> None:
    # The proxy token lets its holder claim any device identity at the API (GET /bootstrap
    # with a forged X-Bridge-Identity hands out that device's PSK): it must never reach an
    # origin the operator did not trust. A third-party origin gets what a public reverse proxy
    # sends: Forwarded and the content headers.
    upstream, third_party, partner = Backend(), Backend(), Backend()

    def app(backend: Backend) -> Starlette:
        return Starlette(routes=[Route("/hook", backend.endpoint, methods=["POST"])])

    async with contextlib.AsyncExitStack() as stack:
        upstream_url = await stack.enter_async_context(serve_app(app(upstream)))
        third_party_url = await stack.enter_async_context(serve_app(app(third_party)))
        partner_url = await stack.enter_async_context(serve_app(app(partner)))
        policy = tmp_path / "policy.toml"
        policy.write_text(
            f'trusted_origins = ["{partner_url.upper()}/"]\n'  # origins compare case-blind
            '[[route]]\npath = "/relative"\nmethods = ["POST"]\ntarget = "/hook"\n'
            f'[[route]]\npath = "/same"\nmethods = ["POST"]\ntarget = "{upstream_url}/hook"\n'
            f'[[route]]\npath = "/other"\nmethods = ["POST"]\ntarget = "{third_party_url}/hook"\n'
            f'[[route]]\npath = "/partner"\nmethods = ["POST"]\ntarget = "{partner_url}/hook"\n'
        )
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port="off",
            upstream=upstream_url,
            policy=str(policy),
            proxy_token="s3cret",
        )
        proxy = await start_proxy(settings)
        stack.push_async_callback(proxy.close)
        client = await RawClient.connect(*proxy.address)
        stack.push_async_callback(client.aclose)
        rig = Rig(upstream, proxy, client)
        for path in ("/relative", "/same", "/other", "/partner"):
            reply = await rig.send(
                status.POST, path, payload=b"{}", extra=[(opt.CONTENT_FORMAT, bytes([50]))]
            )
            assert reply.code == status.CHANGED, path

    internal = {
        forwarding.TOKEN_HEADER.lower(),
        forwarding.IDEMPOTENCY_HEADER.lower(),
        forwarding.TIMEOUT_HEADER.lower(),
    }
    assert len(upstream.requests) == 2
    for _method, _url, headers, _body in upstream.requests + partner.requests:
        assert internal <= set(headers)
        assert headers[forwarding.TOKEN_HEADER.lower()] == "s3cret"
    [(_method, _url, headers, body)] = third_party.requests
    assert not internal & set(headers)
    assert not any(name.startswith("x-bridge") for name in headers)
    assert headers["forwarded"] == f'for="127.0.0.1:{client.port}";proto=coap'
    assert headers["content-type"] == "application/json"
    assert body == b"{}"


async def test_a_batch_target_outside_the_trusted_origins_is_refused_at_start(tmp_path) -> None:
    # A batch carries every device's identity and exchange key: not for a third party.
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[route]]\npath = "/"\nmethods = ["POST"]\ntarget = "/ingest"\n'
        'batch_target = "https://elsewhere.example:8443/ingest/batch"\n'
    )
    settings = ProxySettings(
        coap_host="127.0.0.1", coap_port=0, coaps_port="off", policy=str(policy)
    )
    with pytest.raises(PolicyError, match="trusted_origins"):
        await start_proxy(settings)


@pytest.mark.parametrize(
    ("method", "path", "plain_only", "needed"),
    [
        pytest.param(status.GET, "/.well-known/core", False, False, id="discovery"),
        pytest.param(status.POST, "/nope", False, False, id="no-route-4.04"),
        pytest.param(status.GET, "/data", False, False, id="wrong-method-4.05"),
        pytest.param(status.POST, "/data", True, False, id="production-4.01"),
        pytest.param(status.GET, "/location", False, False, id="idempotent-GET"),
        pytest.param(status.GET, "/bootstrap", False, True, id="GET-that-rotates-a-key"),
        pytest.param(status.GET, "/bootstrap", True, True, id="plain-route-in-production"),
        pytest.param(status.POST, "/data", False, True, id="telemetry"),
    ],
)
def test_which_requests_need_the_cross_replica_claim(
    method: int, path: str, plain_only: bool, needed: bool
) -> None:
    handler = ProxyHandler(
        policy=load_policy(),
        upstream=Http1Upstream(timeout=1.0),  # never called: nothing is forwarded
        base_url="http://127.0.0.1:9",
        proxy_token=None,
        plain_only=plain_only,
    )
    request = Request(method, path, [], Message(0, method, 1), ("127.0.0.1", 1))
    assert handler.needs_claim(request) is needed
