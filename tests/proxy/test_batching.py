"""Group commit (proxy/batching.py) against a real HTTP server implementing the batch form."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from policies import forwarding
from policies.batch import BatchItem, decode_batch, encode_statuses
from policies.routes import parse_policy
from proxy.batching import GroupCommit
from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import CON, Message, uint_bytes
from proxy.coap.requests import interpret
from proxy.errors import UpstreamUnreachable
from proxy.forward import ProxyHandler
from proxy.http1 import Http1Upstream
from proxy.upstream import UpstreamResponse
from tests.support.http import free_port, serve_app


@dataclass
class BatchBackend:
    sizes: list[int] = field(default_factory=list)
    delay: float = 0.0
    whole_status: int | None = None
    garbage: bool = False
    seen_token: list[str | None] = field(default_factory=list)

    async def endpoint(self, request: Request) -> Response:
        items = decode_batch(await request.body())
        self.sizes.append(len(items))
        self.seen_token.append(request.headers.get("x-bridge-token"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.whole_status is not None:
            return Response(status_code=self.whole_status, headers={"Retry-After": "3"})
        if self.garbage:
            return Response(b"not json", media_type="application/json")
        # The status of each item is written in its payload, so the order can be checked.
        return Response(
            encode_statuses([int(i.payload) for i in items]), media_type="application/json"
        )


def item(status: int) -> BatchItem:
    return BatchItem("127.0.0.1", 1, "coap", "", "k", "", None, str(status).encode())


@pytest.fixture
async def backend() -> AsyncIterator[tuple[BatchBackend, str]]:
    state = BatchBackend()
    app = Starlette(routes=[Route("/batch", state.endpoint, methods=["POST"])])
    async with serve_app(app) as base:
        yield state, base + "/batch"


@pytest.fixture
async def upstream() -> AsyncIterator[Http1Upstream]:
    client = Http1Upstream(timeout=5)
    yield client
    await client.aclose()


async def test_a_lone_request_goes_out_at_once_alone(backend, upstream) -> None:
    state, url = backend
    group = GroupCommit(upstream, url, {"X-Bridge-Token": "tok"}, max_concurrency=1)
    assert await group.call(item(204)) == (204, None)
    assert state.sizes == [1]
    assert state.seen_token == ["tok"]


async def test_requests_arriving_during_a_call_travel_together(backend, upstream) -> None:
    state, url = backend
    state.delay = 0.3
    group = GroupCommit(upstream, url, {}, max_concurrency=1)
    first = asyncio.create_task(group.call(item(204)))
    await asyncio.sleep(0.05)  # the first call is now in flight
    statuses = [204, 401, 400, 503, 413] * 8
    rest = [asyncio.create_task(group.call(item(s))) for s in statuses]
    assert (await first) == (204, None)
    assert [outcome[0] for outcome in await asyncio.gather(*rest)] == statuses
    assert state.sizes == [1, len(statuses)]
    assert (group.calls, group.items) == (2, 1 + len(statuses))


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_requests_of_one_event_loop_turn_travel_together_when_nothing_is_in_flight(
    backend, upstream, concurrency
) -> None:
    # A burst of datagrams, or the answers of one batch resuming their callers, submit in one
    # turn of the loop: launching the first at once would send it alone and make the rest wait
    # for its round trip.
    state, url = backend
    group = GroupCommit(upstream, url, {}, max_concurrency=concurrency)
    statuses = [204, 401] * 10
    results = await asyncio.gather(*(group.call(item(s)) for s in statuses))
    assert [outcome[0] for outcome in results] == statuses
    assert state.sizes == [len(statuses)]


async def test_batches_are_capped_at_max_batch(backend, upstream) -> None:
    state, url = backend
    state.delay = 0.2
    group = GroupCommit(upstream, url, {}, max_batch=10, max_concurrency=1)
    results = await asyncio.gather(*(group.call(item(204)) for _ in range(35)))
    assert all(r == (204, None) for r in results)
    assert sum(state.sizes) == 35
    assert max(state.sizes) <= 10


async def test_a_refused_batch_gives_every_item_its_status(backend, upstream) -> None:
    state, url = backend
    state.whole_status = 503
    group = GroupCommit(upstream, url, {})
    results = await asyncio.gather(*(group.call(item(204)) for _ in range(3)))
    assert results == [(503, "3")] * 3


@pytest.mark.parametrize("whole_status", [400, 401, 403, 404, 413, 415, 429, 500, 504])
async def test_a_refused_batch_is_bad_gateway_for_every_device(
    backend, upstream, whole_status: int
) -> None:
    # A 403 (wrong token) or 400/413 (the proxy and the backend disagree on the format or the
    # limits) is about the internal hop, not about any device's request: 5.02 for each.
    state, url = backend
    state.whole_status = whole_status
    group = GroupCommit(upstream, url, {})
    results = await asyncio.gather(*(group.call(item(204)) for _ in range(3)))
    assert results == [(502, None)] * 3


async def test_a_garbled_answer_is_bad_gateway(backend, upstream) -> None:
    state, url = backend
    state.garbage = True
    group = GroupCommit(upstream, url, {})
    assert await group.call(item(204)) == (502, None)


async def test_unreachable_upstream_fails_every_waiting_request(upstream) -> None:
    group = GroupCommit(upstream, f"http://127.0.0.1:{free_port()}/batch", {}, max_concurrency=1)
    results = await asyncio.gather(
        *(group.call(item(204)) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, UpstreamUnreachable) for r in results)
    await group.drain()


async def test_the_next_flush_leaves_before_the_last_ones_callers_resume() -> None:
    # Pure logic of the coalescer (no I/O): the order of events on one event loop.
    from proxy.coalesce import Coalescer

    events: list[str] = []
    release = asyncio.Event()

    async def flush(items: list[str]) -> list[str]:
        events.append("flush " + ",".join(items))
        if items == ["a"]:
            await release.wait()
        return items

    batches: Coalescer[str, str] = Coalescer(flush, max_concurrency=1)

    async def caller(name: str) -> None:
        await batches.submit(name)
        events.append("resumed " + name)

    first = asyncio.create_task(caller("a"))
    await asyncio.sleep(0)  # the first flush is in flight
    await asyncio.sleep(0)
    second = asyncio.create_task(caller("b"))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, second)
    assert events == ["flush a", "flush b", "resumed a", "resumed b"]


class RecordingUpstream:
    """Answers every batch call 204 per item and keeps the items it was sent."""

    def __init__(self) -> None:
        self.items: list[BatchItem] = []

    async def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes
    ) -> UpstreamResponse:
        items = decode_batch(content)
        self.items += items
        return UpstreamResponse(200, "application/json", None, encode_statuses([204] * len(items)))


BATCH_POLICY = """
[[route]]
path = "/"
methods = ["POST"]
target = "/ingest"
batch_target = "/ingest/batch"
topic_query = true

[[route]]
path = "/unchecked"
methods = ["POST"]
target = "/ingest"
batch_target = "/ingest/batch"
"""


def _request(path: str, queries: list[str], peer: tuple[str, int], identity: str | None = None):
    options = [(opt.URI_PATH, path.encode())] if path else []
    options += [(opt.URI_QUERY, q.encode()) for q in queries]
    options.append((opt.CONTENT_FORMAT, uint_bytes(50)))
    message = Message(CON, status.POST, 7, b"\x0a\x0b", options, b"{}")
    return interpret(message, peer, identity)


async def test_the_item_carries_the_request_as_typed_fields() -> None:
    # The topic is checked by the proxy on every batch route (with or without topic_query),
    # the address written canonically: the backend uses both as they come (policies/batch.py).
    upstream = RecordingUpstream()
    handler = ProxyHandler(
        policy=parse_policy(BATCH_POLICY),
        upstream=upstream,
        base_url="http://api",
        proxy_token="tok",
        proto="coaps",
    )
    ok = await handler.handle(_request("", ["t=a/b", "x=1"], ("::ffff:10.0.0.1", 5683), "id-1"))
    assert ok.code == status.CHANGED
    assert upstream.items == [
        BatchItem(
            "::ffff:a00:1",
            5683,
            "coaps",
            "id-1",
            forwarding.idempotency_key("::ffff:10.0.0.1", 5683, 7, b"\x0a\x0b", "id-1"),
            "a/b",
            50,
            b"{}",
        )
    ]
    for path in ("", "unchecked"):
        for queries in (["t=a//b"], ["t=a", "t=b"], ["t"]):
            refused = await handler.handle(_request(path, queries, ("10.0.0.2", 1)))
            assert refused.code == status.BAD_REQUEST
    plain = await handler.handle(_request("unchecked", [], ("10.0.0.2", 1)))
    assert plain.code == status.CHANGED
    assert [(i.ip, i.topic) for i in upstream.items[1:]] == [("10.0.0.2", "")]
    await handler.drain()
