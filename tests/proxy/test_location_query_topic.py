"""The topic ``t`` as a Location-Query option (issue 17; docs/CONTRACT.md §3), over real UDP.

Devices of the SIM platform name their topic as Uri-Query ``t=`` or as Location-Query ``t=``
(option 20). Both follow the same rules (policies/topics.py), a bad one is 4.00 either way,
and ``t`` in both options is 4.00 (ambiguous) even when the two are equal. The origin sees the
topic as the query ``t`` (plain routes) or in the batch item (batch routes), so it needs no
rule of its own. Each request here is a raw datagram sent to a running proxy with a real HTTP
backend behind it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from policies.batch import BatchItem, decode_batch, encode_statuses
from policies.topics import TopicError, topic_from_options
from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import Message
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from tests.support.coap import RawClient, request_datagram
from tests.support.http import serve_app

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
batch_target = "/ingest/batch"
topic_query = true

[[route]]
path = "/thing"
methods = ["POST"]
target = "/thing"
"""


@dataclass
class Backend:
    # (path, query pairs) of each plain call; the items of each batch call.
    calls: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    items: list[BatchItem] = field(default_factory=list)

    async def plain(self, request: HttpRequest) -> HttpResponse:
        url = urlsplit(str(request.url))
        self.calls.append((url.path, parse_qsl(url.query, keep_blank_values=True)))
        return HttpResponse(status_code=204)

    async def batch(self, request: HttpRequest) -> HttpResponse:
        items = decode_batch(await request.body())
        self.items += items
        return HttpResponse(encode_statuses([204] * len(items)), media_type="application/json")

    def forwarded(self) -> int:
        return len(self.calls) + len(self.items)


@dataclass
class Rig:
    backend: Backend
    proxy: RunningProxy
    client: RawClient
    mid: int = 2000

    async def post(
        self, path: str, *, queries: tuple[str, ...] = (), located: tuple[bytes, ...] = ()
    ) -> Message:
        """POST ``path`` with Uri-Query ``queries`` and Location-Query values ``located``."""
        self.mid += 1
        datagram = request_datagram(
            status.POST,
            self.mid,
            path,
            token=b"\x51",
            queries=queries,
            payload=b"\x01\x02",
            extra=[(opt.LOCATION_QUERY, value) for value in located],
        )
        return await self.client.request(datagram, timeout=5.0)


@pytest.fixture
async def rig(tmp_path) -> AsyncIterator[Rig]:
    backend = Backend()
    app = Starlette(
        routes=[
            Route("/ingest", backend.plain, methods=["POST"]),
            Route("/thing", backend.plain, methods=["POST"]),
            Route("/ingest/batch", backend.batch, methods=["POST"]),
        ]
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
            proxy_token="s3cret",
            upstream_timeout=2.0,
            ack_window=3.0,
        )
        proxy = await start_proxy(settings)
        client = await RawClient.connect(*proxy.address)
        try:
            yield Rig(backend, proxy, client)
        finally:
            client.close()
            await proxy.close()


async def test_location_query_topic_is_forwarded_as_the_query_t(rig: Rig) -> None:
    reply = await rig.post("/", located=(b"t=sensors/room_1",))
    assert (reply.code, reply.payload) == (status.CHANGED, b"")
    assert rig.backend.calls == [("/ingest", [("t", "sensors/room_1")])]


async def test_location_query_topic_travels_in_the_batch_item(rig: Rig) -> None:
    reply = await rig.post("/data", located=(b"t=a/b",))
    assert reply.code == status.CHANGED
    [item] = rig.backend.items
    assert (item.topic, item.payload) == ("a/b", b"\x01\x02")


async def test_uri_query_topic_is_unchanged(rig: Rig) -> None:
    assert (await rig.post("/", queries=("t=a", "x=1"))).code == status.CHANGED
    assert (await rig.post("/data", queries=("t=b",))).code == status.CHANGED
    assert rig.backend.calls == [("/ingest", [("t", "a"), ("x", "1")])]
    assert [item.topic for item in rig.backend.items] == ["b"]


async def test_other_location_query_parameters_are_not_a_topic(rig: Rig) -> None:
    # Only `t` is read; the rest of a request's Location-Query (a response option in RFC 7252
    # §5.10.7) is ignored like any elective option this server does not read (§5.4.1).
    assert (await rig.post("/", located=(b"x=1", b"y"))).code == status.CHANGED
    assert (await rig.post("/data", located=(b"x=1",))).code == status.CHANGED
    assert rig.backend.calls == [("/ingest", [])]
    assert [item.topic for item in rig.backend.items] == [""]


@pytest.mark.parametrize(
    "located",
    [
        pytest.param((b"t=a//b",), id="double-slash"),
        pytest.param((b"t=a-b",), id="bad-character"),
        pytest.param((b"t=",), id="empty"),
        pytest.param((b"t",), id="no-value"),
        pytest.param((b"t=a", b"t=b"), id="twice"),
        pytest.param((b"t=\xff",), id="not-utf8"),
    ],
)
@pytest.mark.parametrize("path", ["/", "/data"])
async def test_bad_location_query_topic_is_4_00_and_not_forwarded(
    rig: Rig, path: str, located: tuple[bytes, ...]
) -> None:
    reply = await rig.post(path, located=located)
    assert (reply.code, reply.payload) == (status.BAD_REQUEST, b"")
    assert rig.backend.forwarded() == 0


@pytest.mark.parametrize(
    ("queries", "located"),
    [
        pytest.param(("t=a",), (b"t=b",), id="different"),
        pytest.param(("t=a",), (b"t=a",), id="equal"),
    ],
)
@pytest.mark.parametrize("path", ["/", "/data"])
async def test_topic_in_both_options_is_4_00(
    rig: Rig, path: str, queries: tuple[str, ...], located: tuple[bytes, ...]
) -> None:
    reply = await rig.post(path, queries=queries, located=located)
    assert (reply.code, reply.payload) == (status.BAD_REQUEST, b"")
    assert rig.backend.forwarded() == 0


async def test_longest_valid_location_query_topic_is_forwarded(rig: Rig) -> None:
    topic = "a" * 253  # `t=` + 253 characters: the option's 255 bytes (RFC 7252 §5.10)
    assert (await rig.post("/", located=(f"t={topic}".encode(),))).code == status.CHANGED
    assert rig.backend.calls == [("/ingest", [("t", topic)])]


async def test_location_query_over_255_bytes_is_ignored_as_an_elective_option(rig: Rig) -> None:
    # RFC 7252 §5.4.3: an option outside its length range is treated like an unrecognized
    # option; Location-Query is elective, so it is skipped and the default topic applies.
    assert (await rig.post("/", located=(b"t=" + b"a" * 254,))).code == status.CHANGED
    assert rig.backend.calls == [("/ingest", [])]


async def test_location_query_on_a_route_without_topic_is_ignored(rig: Rig) -> None:
    reply = await rig.post("/thing", located=(b"t=a//b",))
    assert reply.code == status.CHANGED
    assert rig.backend.calls == [("/thing", [])]


@pytest.mark.parametrize(
    ("uri", "located", "expected"),
    [
        ([], [], None),
        (["t=a"], [], "a"),
        ([], ["t=a"], "a"),
        (["x=1"], ["y=2", "t=a/b"], "a/b"),
        (["t=a"], ["x=1"], "a"),
    ],
)
def test_topic_from_options(uri: list[str], located: list[str], expected: str | None) -> None:
    assert topic_from_options(uri, located) == expected


@pytest.mark.parametrize(
    ("uri", "located", "message"),
    [
        (["t=a"], ["t=a"], "both as Uri-Query and as Location-Query"),
        ([], ["t=a", "t=b"], "more than once"),
        ([], ["t"], "no value"),
        ([], ["t=a//b"], "two slashes"),
    ],
)
def test_topic_from_options_errors_say_why(
    uri: list[str], located: list[str], message: str
) -> None:
    with pytest.raises(TopicError, match=message):
        topic_from_options(uri, located)
