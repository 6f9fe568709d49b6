"""Issue #4, the real topology: a kube-proxy-style UDP balancer in front of proxy replicas.

Network namespaces (``tests/support/netns.py``): a device namespace, a balancer namespace
running ``deploy/lb/udp-dnat.sh`` (nftables DNAT of VIP:5683/5684, jhash of the source address
and port, no SNAT), three namespaces with one ``coap-bridge proxy`` each (default route via the
balancer, set by ``deploy/lb/route-via.py``), and the root namespace with redis-server and
``coap-bridge api`` on its veth address. The device is registered under its own address, so a
2.04 proves the source survived the balancer all the way to the API.

Several device flows (one source port each) send CON requests and retransmit like a device on
timeout. Mid-stream the replica with the most flows is SIGKILLed, and a moment later taken out
of the balancer the way kube-proxy retires a UDP endpoint (map rewritten without it, its
conntrack entries deleted), so its flows land on the survivors, with retransmissions of
requests the dead replica had claimed. In the end every request was answered 2.04 and every
message reached MQTT exactly once.

Skipped, with the reason, only where the machine refuses (not root, no ``ip netns``, nftables
or conntrack missing and not installable), after trying.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from policies.batch import decode_batch
from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, NON, RST, Message, decode, encode_empty, encode_parts
from stores.ledger import ANSWERED
from tests.support import netns
from tests.support.bridge import bridge_command
from tests.support.dtls import DtlsClient, _ClientSocket
from tests.support.http import free_port
from tests.support.mqtt import subscribed
from tests.support.processes import Proc, api_healthy, coap_ready
from tests.support.services import MosquittoServer, RedisServer

pytestmark = pytest.mark.integration

TOKEN = "topology-test-token"
API_KEY = "topology-test-key"
ICCID = "8988280666000000099"
FLOWS = 6  # device source ports
PER_FLOW = 10  # requests per flow, one after the other
TAKE_OUT_AFTER = 20  # answered requests before a replica dies
DETECTION = 0.3  # seconds between the crash and the balancer dropping the replica
LEASE = "1.5"  # COAP_BRIDGE_DEDUP_LEASE: how long a dead replica's claim blocks the others
FIRST_TIMEOUT = 0.4  # device retransmission: 0.4 s, doubling (RFC 7252 §4.2 with a short base)
MAX_SENDS = 7


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


@dataclass
class Device:
    """One source port in the device namespace, talking to the service address."""

    transport: asyncio.DatagramTransport
    inbox: _Inbox
    server: tuple[str, int]
    sends: int = 0

    @property
    def port(self) -> int:
        return int(self.transport.get_extra_info("sockname")[1])

    async def post(self, mid: int, token: bytes, topic: str, payload: bytes) -> int:
        """CON POST; retransmitted on timeout, the separate response awaited after an empty
        ACK (and acknowledged). Returns the response code."""
        datagram = encode_parts(
            CON, status.POST, mid, token, [(opt.URI_QUERY, f"t={topic}".encode())], payload
        )
        loop = asyncio.get_running_loop()
        timeout = FIRST_TIMEOUT
        for _ in range(MAX_SENDS):
            self.transport.sendto(datagram, self.server)
            self.sends += 1
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    message = decode(await asyncio.wait_for(self.inbox.queue.get(), left))
                except TimeoutError:
                    break
                if message.mtype == ACK and message.mid == mid:
                    if message.code != status.EMPTY:
                        assert message.token == token
                        return message.code
                    return await self._separate(token)
                if message.mtype == RST and message.mid == mid:
                    raise AssertionError(f"RST for MID {mid}")
                if message.mtype in (CON, NON) and message.token == token:
                    self._ack(message)
                    return message.code
                # else: a late answer to an earlier retransmission; ignore it
            timeout *= 2
        raise AssertionError(f"no answer to MID {mid} after {MAX_SENDS} sends")

    async def _separate(self, token: bytes) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            left = deadline - loop.time()
            message = decode(await asyncio.wait_for(self.inbox.queue.get(), max(left, 0)))
            if message.mtype in (CON, NON) and message.token == token:
                self._ack(message)
                return message.code

    def _ack(self, message: Message) -> None:
        if message.mtype == CON:
            self.transport.sendto(encode_empty(ACK, message.mid), self.server)


@dataclass
class Stream:
    topic: str
    answered: int = 0
    codes: dict[bytes, int] = field(default_factory=dict)
    half_way: asyncio.Event = field(default_factory=asyncio.Event)

    async def flow(self, index: int, device: Device) -> None:
        base = int.from_bytes(os.urandom(2), "big")
        for i in range(PER_FLOW):
            payload = f"flow{index}-msg{i}".encode()
            token = bytes([index, i]) + os.urandom(2)
            code = await device.post((base + i) & 0xFFFF, token, self.topic, payload)
            self.codes[payload] = code
            self.answered += 1
            if self.answered >= TAKE_OUT_AFTER:
                self.half_way.set()
            await asyncio.sleep(0.05)


@dataclass
class Relay:
    """Between the replicas and the API: counts upstream calls per message (by payload) and,
    once told, holds the calls of one replica (as if the API were slow for it) until released.
    Each call is then passed on to the API as it came."""

    target: str = ""
    calls: collections.Counter[bytes] = field(default_factory=collections.Counter)
    hold: str | None = None  # replica address whose calls wait
    held: list[bytes] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    client: httpx.AsyncClient | None = None

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        batch = request.url.path.endswith("/batch")
        payloads = [item.payload for item in decode_batch(body)] if batch else [body]
        self.calls.update(payloads)
        if request.client is not None and request.client.host == self.hold:
            self.held += payloads
            self.arrived.set()
            await self.release.wait()
        assert self.client is not None
        answer = await self.client.post(
            self.target + request.url.path + ("?" + request.url.query if request.url.query else ""),
            content=body,
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
        )
        return Response(
            answer.content, answer.status_code, media_type=answer.headers.get("content-type")
        )


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(relay: Relay, host: str) -> AsyncIterator[str]:
    """The relay on ``host`` (the root namespace's veth address), in the test's loop."""
    app = Starlette(
        routes=[Route("/ingest", relay.endpoint, methods=["POST"]),
                Route("/ingest/batch", relay.endpoint, methods=["POST"])]
    )  # fmt: skip
    port = free_port()
    server = _QuietServer(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            relay.client = client
            yield f"http://{host}:{port}"
    finally:
        relay.release.set()
        server.should_exit = True
        await task


class NamespacedDtlsClient(DtlsClient):
    """:class:`DtlsClient` on a socket made in the device's namespace."""

    def __init__(self, identity: str, psk: bytes, sock: socket.socket) -> None:
        super().__init__(identity, psk)
        self._sock = sock

    async def connect(self, host: str, port: int, timeout: float = 2.0) -> bool:
        loop = asyncio.get_running_loop()
        self._server = (host, port)
        self._sock.connect((host, port))
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _ClientSocket(self), sock=self._sock
        )
        self._ticker = loop.create_task(self._tick())
        self._connection = self._dtls.connect("::ffff:" + host, port)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), timeout)
        return self.connected.is_set()


async def _open_device(ns: str, server: tuple[str, int]) -> Device:
    loop = asyncio.get_running_loop()
    transport, inbox = await loop.create_datagram_endpoint(_Inbox, sock=netns.udp_socket_in(ns))
    return Device(transport, inbox, server)


async def _api(topo: netns.Topology, tmp: Path, mqtt_url: str, redis_url: str) -> Proc:
    port = free_port()
    proc = netns.spawn(
        tmp,
        "api",
        [*bridge_command(), "api", f"--api-host={topo.backend_ip}", f"--api-port={port}",
         f"--mqtt-url={mqtt_url}", f"--redis-url={redis_url}", f"--proxy-token={TOKEN}",
         f"--api-key={API_KEY}", "--log-level=warning"],
    )  # fmt: skip
    proc.port = port
    await api_healthy(proc, f"http://{topo.backend_ip}:{port}")
    return proc


async def test_a_replica_taken_out_mid_stream_loses_and_duplicates_nothing(
    tmp_path: Path, mosquitto: MosquittoServer
) -> None:
    started = time.monotonic()
    reason = await asyncio.to_thread(netns.probe)
    if reason is not None:
        pytest.skip(f"no real topology on this machine: {reason}")
    topo = netns.Topology(replicas=3)
    procs: list[Proc] = []
    redis_server: RedisServer | None = None
    devices: list[Device] = []
    dtls: NamespacedDtlsClient | None = None
    try:
        await asyncio.to_thread(topo.build)
        redis_server = RedisServer(tmp_path / "redis", host=topo.backend_ip)
        redis_server.start()
        api = await _api(topo, tmp_path, mosquitto.url, redis_server.url)
        procs.append(api)
        api_url = f"http://{topo.backend_ip}:{api.port}"
        management = httpx.AsyncClient(
            base_url=api_url, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        async with management:
            created = await management.post(
                "/devices", json={"iccid": ICCID, "ip": topo.client_ip, "status": "active"}
            )
            assert created.status_code == 201, created.text
            psk = "topologyPsk0123x"
            reply = await management.put(
                f"/devices/{ICCID}/psk", json={"psk": psk, "format": "plain"}
            )
            assert reply.status_code < 300, reply.text

        relay = Relay(target=api_url)
        async with serving(relay, topo.backend_ip) as relay_url:
            replicas: dict[str, Proc] = {}
            for i, address in enumerate(topo.replica_ips):
                replicas[address] = netns.spawn(
                    tmp_path,
                    f"replica{i + 1}",
                    [*bridge_command(), "proxy", "--coap-host=0.0.0.0", "--coap-port=5683",
                     "--coaps-port=5684", f"--upstream={relay_url}",
                     f"--redis-url={redis_server.url}", f"--proxy-token={TOKEN}",
                     "--log-level=info"],
                    netns=topo.replica_ns(i),
                    env={"COAP_BRIDGE_DEDUP_LEASE": LEASE},
                )  # fmt: skip
                procs.append(replicas[address])
            await asyncio.gather(*(coap_ready(p, a, 5683) for a, p in replicas.items()))
            print(await asyncio.to_thread(topo.balance, *replicas))

            stream = Stream(topic=f"topo/{topo.suffix}")
            for _ in range(FLOWS):
                devices.append(await _open_device(topo.client_ns, (topo.vip, 5683)))
            ports = {d.port for d in devices}
            async with subscribed(mosquitto.url, stream.topic) as sub:
                flows = [asyncio.create_task(stream.flow(i, d)) for i, d in enumerate(devices)]
                await asyncio.wait_for(stream.half_way.wait(), 15)

                # The crash. The replica holding the most device flows gets slow answers from
                # upstream, so that it has claimed requests in flight; then it dies (SIGKILL),
                # and the balancer notices a moment later and takes it out: map rewritten, its
                # conntrack entries deleted. Its orphaned calls still reach the API.
                before = await asyncio.to_thread(topo.flows)
                per_replica = collections.Counter(f.replica for f in before)
                victim = per_replica.most_common(1)[0][0]
                moved = {f.sport for f in before if f.replica == victim}
                relay.hold = victim
                await asyncio.wait_for(relay.arrived.wait(), 5)
                await asyncio.sleep(0.1)  # its other flows' requests, if they come now
                replicas[victim].kill()
                answered_at_kill = stream.answered
                relay.release.set()
                await asyncio.sleep(DETECTION)
                survivors = [a for a in replicas if a != victim]
                print(await asyncio.to_thread(topo.balance, *survivors))

                await asyncio.wait_for(asyncio.gather(*flows), 25)
                messages = await sub.wait_for(FLOWS * PER_FLOW, timeout=10)
                await sub.assert_silent(1.0)
            after = await asyncio.to_thread(topo.flows)

            # CoAPS through the same balancer (VIP:5684), identity by PSK.
            dtls = NamespacedDtlsClient(ICCID, psk.encode(), netns.udp_socket_in(topo.client_ns))
            assert await dtls.connect(topo.vip, 5684, timeout=5), "DTLS handshake via the VIP"
            well_known = await dtls.get(".well-known", "core")

        retransmitted = sum(d.sends for d in devices) - FLOWS * PER_FLOW
        print(
            f"flows per replica before the crash: {dict(per_replica)}; victim {victim} had "
            f"ports {sorted(moved)}, {answered_at_kill} answers at the crash, "
            f"{len(relay.held)} claimed requests in flight {sorted(relay.held)}; "
            f"retransmissions {retransmitted}; took {time.monotonic() - started:.1f} s"
        )
        # Every request answered 2.04, every message published exactly once.
        assert len(stream.codes) == FLOWS * PER_FLOW
        assert set(stream.codes.values()) == {status.CHANGED}, collections.Counter(
            stream.codes.values()
        )
        published = collections.Counter(bytes(m.payload) for m in messages)
        assert published == collections.Counter(stream.codes.keys()), published
        # One upstream call per request, whichever replica each retransmission reached;
        # two for the requests the dead replica had claimed: its orphaned call, and the
        # survivor's after the lease (the API recognised the Idempotency-Key).
        assert relay.held
        expected = collections.Counter(stream.codes.keys()) + collections.Counter(relay.held)
        assert relay.calls == expected, relay.calls - expected
        # The victim served device flows before the crash; afterwards they all ran on the
        # survivors (new conntrack entries), while the survivors' own flows stayed put.
        assert moved
        assert {f.sport for f in before} == ports
        assert {f.replica for f in after if f.sport in ports} <= set(survivors)
        assert {f.sport for f in after if f.replica in survivors} >= moved
        for f in before:
            if f.replica != victim:
                assert f in after
        # The replicas saw the device's own address and port: the shared dedup records are
        # keyed by them, one answered record per request.
        with redis.Redis.from_url(redis_server.url) as r:
            keys = [k.decode() for k in r.keys(f"cb:dd:{topo.client_ip}:*")]
            assert len(keys) == FLOWS * PER_FLOW
            assert {int(k.split(":")[3]) for k in keys} == ports
            values = r.mget(keys)
            assert all(v is not None and v.startswith(ANSWERED) for v in values)
        assert well_known.code == status.CONTENT
    finally:
        if dtls is not None:
            dtls.close()
        for device in devices:
            device.transport.close()
        await asyncio.sleep(0)
        for proc in reversed(procs):
            if proc.name.startswith("replica"):
                proc.kill()
            else:
                proc.stop()
        if redis_server is not None:
            redis_server.stop()
        await asyncio.to_thread(topo.close)
