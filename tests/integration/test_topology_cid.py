"""Issue 19, the real topology: DTLS Connection ID (RFC 9146) through the reference balancer.

The same network namespaces as tests/integration/test_topology.py (``tests/support/netns.py``):
a device namespace, a balancer namespace running ``deploy/lb/udp-dnat.sh`` (DNAT of
VIP:5683/5684 by jhash of the source address and port, no SNAT), three replica namespaces with
one ``coap-bridge proxy --redis-url … --metrics-port …`` each, and redis-server and
``coap-bridge api`` in the root namespace. The device is our RFC 9146 client
(tests/support/dtls_cid_client.py) on sockets made in the device namespace.

1. NAT rebinding: a CID session continues from a new source port (one the balancer sends to
   the same replica) with no new handshake.
2. The replica holding a CID session is SIGKILLed and taken out of the balancer (map rewritten,
   its conntrack entries deleted, as kube-proxy retires a UDP endpoint): the next record reaches
   a survivor, which loads the session from Redis and answers, with no new handshake.
3. A client without CID, after the same kind of SIGKILL, gets silence and must handshake again:
   what docs/SCALING.md says such clients see.

Handshakes are counted twice: by the client (``stats.handshakes``) and by the replicas'
``coap_bridge_dtls_handshakes`` / ``coap_bridge_dtls_handshakes_completed`` counters
(proxy/metrics.py). Skipped, with the reason, only where the machine refuses network namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import CON, RST, Message, decode, encode_empty, encode_parts
from stores.keys import dtls_session_key
from tests.support import netns
from tests.support.bridge import bridge_command
from tests.support.dtls_cid_client import CidClient, DtlsTimeout
from tests.support.http import free_port
from tests.support.processes import Proc, coap_ready
from tests.support.services import MosquittoServer, RedisServer

pytestmark = pytest.mark.integration

TOKEN = "topology-cid-token"
API_KEY = "topology-cid-key"
ICCID = "8988280666000000119"
PSK = "topologyCidPsk01"
METRICS_PORT = 9464  # the same in every replica namespace
# CoAP CON retransmission (RFC 7252 §4.2) with a short base: each send is a new DTLS record.
TIMEOUT = 0.6
SENDS = 4
SHARED = "coap_bridge_dtls_shared_sessions_total"


@dataclass
class World:
    """What every test of this module shares: the namespaces, Redis and the API."""

    topo: netns.Topology
    redis: RedisServer
    api_url: str
    log_dir: Path


@dataclass
class Replicas:
    """Three fresh proxies, one per replica namespace, all in the balancer."""

    world: World
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def topo(self) -> netns.Topology:
        return self.world.topo

    async def start(self, tag: str) -> None:
        for i, address in enumerate(self.topo.replica_ips):
            self.procs[address] = netns.spawn(
                self.world.log_dir,
                f"{tag}-replica{i + 1}",
                [*bridge_command(), "proxy", "--coap-host=0.0.0.0", "--coap-port=5683",
                 "--coaps-port=5684", f"--upstream={self.world.api_url}",
                 f"--redis-url={self.world.redis.url}", f"--proxy-token={TOKEN}",
                 f"--metrics-port={METRICS_PORT}", "--metrics-host=0.0.0.0", "--log-level=info"],
                netns=self.topo.replica_ns(i),
            )  # fmt: skip
        await asyncio.gather(*(coap_ready(p, a, 5683) for a, p in self.procs.items()))
        print(await asyncio.to_thread(self.topo.balance, *self.procs))

    async def kill_and_take_out(self, victim: str) -> list[str]:
        """SIGKILL, then ``udp-dnat.sh sync`` without it: the survivors' addresses."""
        self.procs[victim].kill()
        survivors = [a for a, p in self.procs.items() if p.process.poll() is None]
        print(await asyncio.to_thread(self.topo.balance, *survivors))
        return survivors

    async def replica_of(self, port: int) -> str:
        """The replica the balancer's conntrack sends this device port to."""
        flows = await asyncio.to_thread(self.topo.flows)
        held = {f.replica for f in flows if f.client == self.topo.client_ip and f.sport == port}
        assert len(held) == 1, f"port {port}: conntrack flows {flows}"
        return held.pop()

    async def counters(self, address: str) -> dict[str, float]:
        """The replica's DTLS counters and gauges from /metrics, by sample name and labels as
        written there: ``coap_bridge_dtls_shared_sessions_total{event="imported"}``."""
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"http://{address}:{METRICS_PORT}/metrics")).text
        samples = {}
        for family in text_string_to_metric_families(text):
            if family.name.startswith("coap_bridge_dtls"):
                for sample in family.samples:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return samples

    async def handshakes(self, *addresses: str) -> tuple[int, int]:
        """(started, completed) summed over these replicas."""
        started = completed = 0
        for address in addresses:
            c = await self.counters(address)
            started += int(c["coap_bridge_dtls_handshakes_total"])
            completed += int(c["coap_bridge_dtls_handshakes_completed_total"])
        return started, completed

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()


def _api_healthy(proc: Proc, base_url: str) -> None:
    with httpx.Client(timeout=1) as client:
        for _ in range(200):
            assert proc.process.poll() is None, proc.log()
            with contextlib.suppress(httpx.HTTPError):
                health = client.get(f"{base_url}/healthz")
                if health.status_code == 200 and health.json()["mqtt"] == "connected":
                    return
            with contextlib.suppress(Exception):
                proc.process.wait(0.1)
    raise AssertionError(f"the API did not become healthy:\n{proc.log()}")


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, _mosquitto_process: MosquittoServer
) -> Iterator[World]:
    reason = netns.probe()
    if reason is not None:
        pytest.skip(f"no real topology on this machine: {reason}")
    tmp = tmp_path_factory.mktemp("topology-cid")
    topo = netns.Topology(replicas=3)
    redis_server: RedisServer | None = None
    api: Proc | None = None
    try:
        topo.build()
        redis_server = RedisServer(tmp / "redis", host=topo.backend_ip)
        redis_server.start()
        port = free_port()
        api = netns.spawn(
            tmp,
            "api",
            [*bridge_command(), "api", f"--api-host={topo.backend_ip}", f"--api-port={port}",
             f"--mqtt-url={_mosquitto_process.url}", f"--redis-url={redis_server.url}",
             f"--proxy-token={TOKEN}", f"--api-key={API_KEY}", "--log-level=warning"],
        )  # fmt: skip
        api_url = f"http://{topo.backend_ip}:{port}"
        _api_healthy(api, api_url)
        with httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
        ) as management:
            created = management.post(
                "/devices", json={"iccid": ICCID, "ip": topo.client_ip, "status": "active"}
            )
            assert created.status_code == 201, created.text
            reply = management.put(f"/devices/{ICCID}/psk", json={"psk": PSK, "format": "plain"})
            assert reply.status_code < 300, reply.text
        yield World(topo, redis_server, api_url, tmp)
    finally:
        if api is not None:
            api.stop()
        if redis_server is not None:
            redis_server.stop()
        topo.close()


@pytest.fixture
async def replicas(world: World, request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    group = Replicas(world)
    try:
        await group.start(request.node.name.removeprefix("test_")[:24])
        yield group
    finally:
        group.stop()


class DeviceSockets:
    """``socket_factory`` for :class:`CidClient`: UDP sockets made in the device namespace, or
    the one handed over with :meth:`next`."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._next: socket.socket | None = None

    def next(self, sock: socket.socket) -> None:
        self._next = sock

    def __call__(self) -> socket.socket:
        sock, self._next = self._next, None
        return sock if sock is not None else netns.udp_socket_in(self.ns)


def _client(sockets: Callable[[], socket.socket], cid: bytes | None) -> CidClient:
    return CidClient(
        ICCID.encode(), PSK.encode(), offer_cid=cid, retransmit=0.5, socket_factory=sockets
    )


_mids = iter(range(int.from_bytes(os.urandom(2), "big") % 0x8000, 0x10000))


def well_known_core() -> bytes:
    """A CON GET of /.well-known/core (RFC 6690), answered by the proxy itself."""
    mid = next(_mids)
    return encode_parts(
        CON, 1, mid, mid.to_bytes(2, "big"),
        [(opt.URI_PATH, b".well-known"), (opt.URI_PATH, b"core")], b"",
    )  # fmt: skip


async def request(client: CidClient, coap: bytes) -> Message:
    """One CoAP request over the session, retransmitted like a device's CON (each send a new
    record); DtlsTimeout when no send was answered."""
    for _ in range(SENDS):
        client.send(coap)
        with contextlib.suppress(DtlsTimeout):
            return decode(await client.recv(TIMEOUT))
    raise DtlsTimeout(f"no answer to {SENDS} sends of MID {decode(coap).mid}")


async def socket_at(world: World, replica: str, tries: int = 40) -> socket.socket:
    """A device-namespace socket whose flows the balancer sends to ``replica``: each candidate
    pings the VIP (an Empty CON on 5683, answered with RST, RFC 7252 §4.3) and the balancer's
    conntrack says where it went. The hash covers address and source port, not the
    destination port, so 5684 goes the same way."""
    topo = world.topo
    loop = asyncio.get_running_loop()
    for _ in range(tries):
        sock = netns.udp_socket_in(topo.client_ns)
        try:
            sock.sendto(encode_empty(CON, 0x4242), (topo.vip, 5683))
            assert decode(await asyncio.wait_for(loop.sock_recv(sock, 64), 2)).mtype == RST
            port = sock.getsockname()[1]
            flows = await asyncio.to_thread(topo.flows)
            if any(f.sport == port and f.replica == replica for f in flows):
                return sock
        except BaseException:
            sock.close()
            raise
        sock.close()
    raise AssertionError(f"no source port of {tries} went to {replica}")


async def wait_stored(world: World, cid: bytes) -> None:
    """Until the session is in Redis under its CID (the holder writes it once the handshake
    completed, stores/dtls_sessions.py)."""
    key = dtls_session_key(cid.hex())
    async with redis.asyncio.Redis.from_url(world.redis.url) as r:
        for _ in range(100):
            if await r.exists(key):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"the session was never stored in Redis ({key})")


async def test_a_cid_session_continues_after_nat_rebinding_through_the_vip(
    world: World, replicas: Replicas
) -> None:
    topo = world.topo
    sockets = DeviceSockets(topo.client_ns)
    client = _client(sockets, cid=b"")
    try:
        await client.connect(topo.vip, 5684)
        assert client.negotiated_cid, "the proxy gave no Connection ID"
        assert (await request(client, well_known_core())).code == status.CONTENT
        old_port = client.local_port
        holder = await replicas.replica_of(old_port)

        # The NAT maps the device to a new port; the balancer sends it to the same replica.
        sockets.next(await socket_at(world, holder))
        await client.rebind()
        assert client.local_port != old_port
        assert (await request(client, well_known_core())).code == status.CONTENT
        assert await replicas.replica_of(client.local_port) == holder

        assert client.stats.handshakes == 1
        assert await replicas.handshakes(*topo.replica_ips) == (1, 1)
        held = await replicas.counters(holder)
        assert held["coap_bridge_dtls_sessions"] == 1
        assert held["coap_bridge_dtls_cid_sessions"] == 1
    finally:
        client.close()


async def test_a_cid_session_survives_its_replica_being_killed(
    world: World, replicas: Replicas
) -> None:
    topo = world.topo
    client = _client(DeviceSockets(topo.client_ns), cid=b"")
    try:
        await client.connect(topo.vip, 5684)
        assert client.negotiated_cid, "the proxy gave no Connection ID"
        assert (await request(client, well_known_core())).code == status.CONTENT
        port = client.local_port
        holder = await replicas.replica_of(port)
        await wait_stored(world, client.negotiated_cid)
        assert await replicas.handshakes(*topo.replica_ips) == (1, 1)

        survivors = await replicas.kill_and_take_out(holder)
        # Same source port, new conntrack entry: the balancer now picks among the survivors.
        answer = await request(client, well_known_core())
        assert answer.code == status.CONTENT
        assert client.local_port == port
        taker = await replicas.replica_of(port)
        assert taker in survivors
        took = await replicas.counters(taker)
        assert took["coap_bridge_dtls_cid_sessions"] == 1
        assert took[f'{SHARED}{{event="imported"}}'] == 1

        assert client.stats.handshakes == 1
        assert await replicas.handshakes(*survivors) == (0, 0)
    finally:
        client.close()


async def test_a_client_without_cid_handshakes_again_after_its_replica_is_killed(
    world: World, replicas: Replicas
) -> None:
    topo = world.topo
    client = _client(DeviceSockets(topo.client_ns), cid=None)
    try:
        await client.connect(topo.vip, 5684)
        assert client.negotiated_cid is None
        assert (await request(client, well_known_core())).code == status.CONTENT
        port = client.local_port
        holder = await replicas.replica_of(port)

        survivors = await replicas.kill_and_take_out(holder)
        # docs/SCALING.md: the record belongs to no session on the survivor, which drops it;
        # the device hears nothing, and handshakes again.
        with pytest.raises(DtlsTimeout):
            await request(client, well_known_core())
        assert await replicas.replica_of(port) in survivors
        await client.connect(topo.vip, 5684)
        assert (await request(client, well_known_core())).code == status.CONTENT
        assert client.local_port == port

        assert client.stats.handshakes == 2
        assert await replicas.handshakes(*survivors) == (1, 1)
        for address in survivors:  # records without a CID are never looked up in Redis
            after = await replicas.counters(address)
            assert after[f'{SHARED}{{event="lookup"}}'] == 0
            assert after[f'{SHARED}{{event="imported"}}'] == 0
    finally:
        client.close()
