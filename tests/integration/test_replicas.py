"""Issue #4 acceptance: proxy replicas share one memory (dedup in Redis).

Two ``coap-bridge proxy`` processes (A, B) on different ports share a real redis-server; a
``coap-bridge api`` process publishes to a real mosquitto. Between the proxies and the API sits
a small relay of the test's own that counts upstream calls (and can hold them, to make the
upstream slow): MQTT alone could not show "one upstream call", since the API also refuses to
publish an Idempotency-Key twice. One client socket plays a device whose datagrams a load
balancer sends to different replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from policies.batch import decode_batch
from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, encode_parts
from tests.support.coap import PortClient
from tests.support.http import serve_app
from tests.support.mqtt import subscribed
from tests.support.processes import Processes, register
from tests.support.services import MosquittoServer, RedisServer

pytestmark = pytest.mark.integration

ICCID = "8988280666000000077"


@dataclass
class Relay:
    """Counts the device messages that reach the upstream, then passes each call on."""

    target: str = ""
    items: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        self.items += len(decode_batch(body)) if request.url.path.endswith("/batch") else 1
        self.arrived.set()
        await self.gate.wait()
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(
                self.target
                + request.url.path
                + ("?" + request.url.query if request.url.query else ""),
                content=body,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            )
        return Response(
            answer.content, answer.status_code, media_type=answer.headers.get("content-type")
        )


@dataclass
class Cluster:
    procs: Processes
    relay: Relay
    relay_url: str
    redis: RedisServer
    mosquitto: MosquittoServer


@pytest.fixture
async def cluster(tmp_path, redis_server, mosquitto) -> AsyncIterator[Cluster]:
    procs = Processes(tmp_path)
    relay = Relay()
    relay.gate.set()
    app = Starlette(
        routes=[Route("/ingest", relay.endpoint, methods=["POST"]),
                Route("/ingest/batch", relay.endpoint, methods=["POST"])]
    )  # fmt: skip
    try:
        async with serve_app(app) as relay_url:
            api = await procs.api(mqtt_url=mosquitto.url)
            relay.target = f"http://127.0.0.1:{api.port}"
            await register(api, ICCID, "127.0.0.1")
            yield Cluster(procs, relay, relay_url, redis_server, mosquitto)
    finally:
        procs.stop_all()


def con(mid: int, payload: bytes = b"reading", topic: str = "rep/x") -> bytes:
    return encode_parts(
        CON, status.POST, mid, b"\x0b\x0c", [(opt.URI_QUERY, f"t={topic}".encode())], payload
    )


async def test_a_retransmission_on_any_replica_is_answered_from_the_first(cluster: Cluster) -> None:
    a = await cluster.procs.proxy("A", upstream=cluster.relay_url, redis_url=cluster.redis.url)
    b = await cluster.procs.proxy("B", upstream=cluster.relay_url, redis_url=cluster.redis.url)
    device = await PortClient.open()
    datagram = con(0x1111)
    async with subscribed(cluster.mosquitto.url, "rep/#") as sub:
        first = await device.request(datagram, a.port)
        second = await device.request(datagram, b.port)
        third = await device.request(datagram, a.port)
        await sub.wait_for(1)
        await sub.assert_silent(0.5)
    await device.aclose()
    assert first == encode_parts(ACK, status.CHANGED, 0x1111, b"\x0b\x0c", [], b"")
    assert second == first
    assert third == first
    assert cluster.relay.items == 1


async def test_the_same_request_at_two_replicas_at_once_makes_one_upstream_call(
    cluster: Cluster,
) -> None:
    # A wide ACK window: the held call must still be answered piggybacked, so that the
    # replayed record is the 2.04 itself (the ACK window has tests of its own).
    wide = {"COAP_BRIDGE_ACK_WINDOW": "10"}
    a = await cluster.procs.proxy(
        "A", upstream=cluster.relay_url, redis_url=cluster.redis.url, env=wide
    )
    b = await cluster.procs.proxy(
        "B", upstream=cluster.relay_url, redis_url=cluster.redis.url, env=wide
    )
    cluster.relay.gate.clear()  # the upstream is slow: calls wait here
    device = await PortClient.open()
    datagram = con(0x2222, topic="rep/both")
    async with subscribed(cluster.mosquitto.url, "rep/#") as sub:
        device.send(datagram, a.port)
        device.send(datagram, b.port)
        await asyncio.wait_for(cluster.relay.arrived.wait(), 5)
        await asyncio.sleep(0.5)  # time for a second call, if one were coming
        cluster.relay.gate.set()
        # The replica that won the claim answers the request it holds; the other stayed silent,
        # so the device retransmits there, and it replays the winner's answer.
        first, winner = await device.recv_any(5)
        other = b.port if winner == a.port else a.port
        answers = [first, await device.request(datagram, other)]
        await sub.wait_for(1)
        await sub.assert_silent(0.5)
    await device.aclose()
    assert cluster.relay.items == 1
    assert answers[0] == answers[1]
    assert answers[0][1] == status.CHANGED


async def test_a_replica_killed_after_its_claim_is_taken_over_after_the_lease(
    cluster: Cluster,
) -> None:
    lease = {"COAP_BRIDGE_DEDUP_LEASE": "1.5"}
    a = await cluster.procs.proxy(
        "A", upstream=cluster.relay_url, redis_url=cluster.redis.url, env=lease
    )
    b = await cluster.procs.proxy(
        "B", upstream=cluster.relay_url, redis_url=cluster.redis.url, env=lease
    )
    cluster.relay.gate.clear()
    device = await PortClient.open()
    datagram = con(0x3333, payload=b"exactly once", topic="rep/kill")
    async with subscribed(cluster.mosquitto.url, "rep/#") as sub:
        device.send(datagram, a.port)
        await asyncio.wait_for(cluster.relay.arrived.wait(), 5)  # A claimed and forwarded
        a.kill()  # SIGKILL: no answer, no cleanup; its call is still in flight upstream
        # Within the lease, B leaves the exchange alone (A might still answer).
        device.send(datagram, b.port)
        with pytest.raises(TimeoutError):
            await device.recv_from(b.port, 0.8)
        cluster.relay.gate.set()  # A's orphaned call now reaches the API and is published
        await asyncio.sleep(1.0)  # the lease has run out
        answer = await device.request(datagram, b.port)
        messages = await sub.wait_for(1)
        await sub.assert_silent(0.8)
    await device.aclose()
    assert answer[1] == status.CHANGED
    assert [m.payload for m in messages] == [b"exactly once"]
    assert cluster.relay.items == 2  # B forwarded again; the API recognised the key


async def test_redis_outage_falls_back_to_local_dedup_and_recovers(cluster: Cluster) -> None:
    a = await cluster.procs.proxy("A", upstream=cluster.relay_url, redis_url=cluster.redis.url)
    b = await cluster.procs.proxy("B", upstream=cluster.relay_url, redis_url=cluster.redis.url)
    device = await PortClient.open()
    cluster.redis.stop()
    during = con(0x4444, payload=b"during outage", topic="rep/outage")
    answer = await device.request(during, a.port, tries=6)
    assert answer[1] == status.CHANGED
    # Local dedup still holds on the same replica.
    assert await device.request(during, a.port) == answer
    cluster.redis.start()
    await asyncio.sleep(1.5)  # the proxies ask Redis again after retry_after (1 s)
    after = con(0x5555, payload=b"after outage", topic="rep/after")
    async with subscribed(cluster.mosquitto.url, "rep/after") as sub:
        first = await device.request(after, a.port, tries=6)
        second = await device.request(after, b.port, tries=6)
        await sub.wait_for(1)
        await sub.assert_silent(0.5)
    await device.aclose()
    assert first == second
    assert "shared dedup unavailable" in a.log()
    assert "shared dedup available again" in a.log()
