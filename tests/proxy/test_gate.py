"""The gate (proxy/gate.py): the cross-replica claim between the endpoint and the handler.

Unit rows against a store of the test's own (pure logic: what the gate does with each answer
of the store, and with a store that is down); then the proxy itself with a real redis-server
and a real HTTP origin: which requests take a claim (issue 13 §4), and a second replica
replaying the first one's answer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, NON, decode, encode_parts
from proxy.coap.endpoint import Endpoint, MessagingStats
from proxy.coap.exchanges import Exchange
from proxy.coap.requests import Request, Response
from proxy.gate import Gate
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from stores.ledger import ANSWERED, Claim, LedgerUnavailable, Outcome
from tests.support.coap import PortClient, request_datagram
from tests.support.http import serve_app
from tests.support.services import RedisServer

PEER = ("192.0.2.9", 41000)


class Handler:
    def __init__(self, claim: bool = True) -> None:
        self.claim = claim

    async def handle(self, request: Request) -> Response:
        return Response(status.CHANGED)

    def answer_now(self, request: Request) -> Response | None:
        return None  # everything through handle()

    def needs_claim(self, request: Request) -> bool:
        return self.claim


@dataclass
class FakeStore:
    """Answers claims from a script; records what is written."""

    answers: list[Outcome | Exception] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)
    written: list[tuple[str, bytes, float]] = field(default_factory=list)

    async def claim(self, keys: Sequence[str], lease: float) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for key in keys:
            self.claims.append(key)
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            outcomes.append(answer)
        return outcomes

    def record(self, key: str, answer: bytes, lifetime: float) -> None:
        self.written.append((key, answer, lifetime))

    def release(self, key: str) -> None:
        raise AssertionError("the proxy never releases a claim")

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate_for(store: FakeStore, *, claim: bool = True, clock: Clock | None = None) -> Gate:
    return Gate(
        Handler(claim),
        store,
        lambda ip, port, mid, identity: f"k:{identity or ip}:{port}:{mid}",
        retry_after=1.0,
        stats=MessagingStats(),
        clock=clock or Clock(),
    )


def new_exchange(mid: int, mtype: int = CON, identity: str | None = None) -> Exchange:
    datagram = encode_parts(mtype, status.POST, mid, b"\x01", [(opt.URI_PATH, b"x")], b"")
    event = Endpoint(claims=True).receive(datagram, PEER, 0.0, identity)
    assert isinstance(event, Exchange)
    return event


async def test_a_request_that_needs_no_claim_never_reaches_the_store() -> None:
    store = FakeStore()
    gate = gate_for(store, claim=False)
    exchange = new_exchange(1)
    assert exchange.request is not None
    assert gate.key_for(exchange.request) is None
    gate.answered(exchange)
    assert store.claims == []
    assert store.written == []
    assert gate.stats.claims_skipped == 1


@pytest.mark.parametrize(
    ("identity", "key"), [(None, "k:192.0.2.9:41000:2"), ("dev", "k:dev:41000:2")]
)
def test_the_key_names_the_peer_or_its_identity_and_the_mid(identity: str | None, key: str) -> None:
    exchange = new_exchange(2, identity=identity)
    assert exchange.request is not None
    assert gate_for(FakeStore()).key_for(exchange.request) == key


@pytest.mark.parametrize(("mtype", "lifetime"), [(CON, 247.0), (NON, 145.0)])
async def test_owned_is_handled_here_and_the_answer_written_for_its_lifetime(
    mtype: int, lifetime: float
) -> None:
    store = FakeStore([Claim.OWNED])
    gate = gate_for(store)
    exchange = new_exchange(3, mtype)
    assert await gate.claim(exchange, "k") is Claim.OWNED
    exchange.record = b"answer"
    gate.answered(exchange)
    assert store.written == [("k", b"answer", lifetime)]


@pytest.mark.parametrize(
    ("verdict", "counter"), [(Claim.BUSY, "shared_busy"), (b"\x60\x44", "shared_replays")]
)
async def test_busy_and_replayed_are_counted(verdict: Outcome, counter: str) -> None:
    gate = gate_for(FakeStore([verdict]))
    assert await gate.claim(new_exchange(4), "k") == verdict
    assert getattr(gate.stats, counter) == 1


async def test_a_store_that_is_down_means_local_dedup_logged_once_and_asked_again_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = LedgerUnavailable("connection refused")
    store = FakeStore([down, down, Claim.OWNED])
    clock = Clock()
    gate = gate_for(store, clock=clock)
    caplog.set_level(logging.WARNING, logger="proxy.gate")
    first = new_exchange(5)
    assert await gate.claim(first, "k5") is Claim.OWNED
    first.record = b"a5"
    gate.answered(first)  # not written: the store is down
    clock.now += 0.5
    assert await gate.claim(new_exchange(6), "k6") is Claim.OWNED  # not asked within 1 s
    assert store.claims == ["k5"]
    clock.now += 0.6
    assert await gate.claim(new_exchange(7), "k7") is Claim.OWNED  # asked again: still down
    clock.now += 1.1
    back = new_exchange(8)
    assert await gate.claim(back, "k8") is Claim.OWNED
    back.record = b"a8"
    gate.answered(back)
    assert store.claims == ["k5", "k7", "k8"]
    assert store.written == [("k8", b"a8", 247.0)]
    assert gate.stats.shared_unavailable == 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("available again" in m for m in messages) == 1


# -- the proxy with a real redis-server ---------------------------------------------------------

POLICY = """
[[route]]
path = "/thing"
methods = ["GET", "POST"]
target = "/thing"

[[route]]
path = "/cached"
methods = ["GET", "POST"]
target = "/thing"
idempotent = true
"""


@dataclass
class Origin:
    calls: list[str] = field(default_factory=list)

    async def endpoint(self, request: HttpRequest) -> HttpResponse:
        self.calls.append(f"{request.method} {request.url.path}")
        return HttpResponse(b"v", status_code=200, headers={"content-type": "text/plain"})


@dataclass
class Replicas:
    origin: Origin
    proxies: list[RunningProxy]
    redis: aioredis.Redis
    device: PortClient

    def port(self, n: int) -> int:
        return self.proxies[n].address[1]

    async def dedup_keys(self) -> list[bytes]:
        for proxy in self.proxies:
            if proxy.dedup is not None:
                await proxy.dedup.flush()
        return sorted(await self.redis.keys("cb:dd:*"))


@pytest.fixture
async def replicas(tmp_path, redis_server: RedisServer) -> AsyncIterator[Replicas]:
    origin = Origin()
    app = Starlette(routes=[Route("/thing", origin.endpoint, methods=["GET", "POST"])])
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    async with serve_app(app) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port=None,
            upstream=base_url,
            policy=str(policy),
            proxy_token="s3cret",
            redis_url=redis_server.url,
        )
        proxies = [await start_proxy(settings), await start_proxy(settings)]
        redis = aioredis.Redis.from_url(redis_server.url)
        device = await PortClient.open()
        try:
            yield Replicas(origin, proxies, redis, device)
        finally:
            await device.aclose()
            await redis.aclose()
            for proxy in proxies:
                await proxy.close()


def request(mid: int, code: int, path: str) -> bytes:
    return request_datagram(code, mid, path, token=b"\x0c")


@pytest.mark.parametrize(
    ("code", "path", "answer"),
    [
        pytest.param(status.GET, "/.well-known/core", status.CONTENT, id="discovery"),
        pytest.param(status.GET, "/nowhere", status.NOT_FOUND, id="no-route"),
        pytest.param(status.DELETE, "/thing", status.METHOD_NOT_ALLOWED, id="wrong-method"),
        pytest.param(status.GET, "/cached", status.CONTENT, id="get-on-idempotent-route"),
    ],
)
async def test_what_needs_no_claim_takes_none_in_redis(
    replicas: Replicas, code: int, path: str, answer: int
) -> None:
    """Issue 13 §4: before, every confirmable request took a claim (and wrote an answer)."""
    reply = decode(await replicas.device.request(request(0x100, code, path), replicas.port(0)))
    assert (reply.mtype, reply.code) == (ACK, answer)
    assert await replicas.dedup_keys() == []
    assert replicas.proxies[0].driver.stats.claims_skipped == 1


@pytest.mark.parametrize(
    "path",
    [pytest.param("/thing", id="post"), pytest.param("/cached", id="post-on-idempotent-route")],
)
async def test_a_claimed_answer_is_replayed_by_the_other_replica(
    replicas: Replicas, path: str
) -> None:
    datagram = request(0x200, status.POST, path)
    first = await replicas.device.request(datagram, replicas.port(0))
    assert decode(first).code == status.CHANGED
    [key] = await replicas.dedup_keys()
    assert await replicas.redis.get(key) == ANSWERED + first
    # The device's retransmission reaches the other replica: the same bytes, no second call.
    again = await replicas.device.request(datagram, replicas.port(1))
    assert again == first
    assert replicas.origin.calls == ["POST /thing"]  # both routes target /thing
    assert replicas.proxies[1].driver.stats.shared_replays == 1
