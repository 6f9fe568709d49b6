"""Issue 15 acceptance: downlink commands reach observing devices, end to end on real parts.

``coap-bridge up`` runs against a real ``redis-server`` and a real ``mosquitto``; the device is
libcoap's ``coap-client-notls -s`` observing ``/commands/{iccid}`` (or raw datagrams where the
test must see each message); commands are queued over HTTP (the management API) and over MQTT
(``mosquitto_pub`` on ``devices/{iccid}/commands``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, RST, Message, decode, encode_empty, encode_parts
from tests.support.bridge import Bridge, running_bridge
from tests.support.coap import PortClient, RawClient
from tests.support.dtls import DtlsClient, dtls_ready
from tests.support.http import free_port
from tests.support.processes import API_KEY, Processes, register
from tests.support.services import MosquittoServer

pytestmark = pytest.mark.integration

_iccids = (f"89882806661500{n:05d}" for n in itertools.count(1))


@pytest.fixture
async def bridge(tmp_path, redis_server, mosquitto) -> AsyncIterator[Bridge]:
    async with running_bridge(tmp_path, redis_url=redis_server.url, mqtt_url=mosquitto.url) as b:
        yield b


@pytest.fixture
async def device(bridge: Bridge) -> str:
    iccid = next(_iccids)
    await bridge.register(iccid, "127.0.0.1")
    return iccid


@dataclass
class Observer:
    """A running ``coap-client-notls -s``: what it printed so far, line by line."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def position(self, payload: str) -> int:
        """Where ``payload`` was shown (libcoap's ``-v 6`` dump: ``<<hex>>`` on its own line;
        the raw payload it prints after it ends with no newline, so it is not read in time)."""
        return self.text.index(f"<<{payload.encode().hex()}>>")

    async def wait_for(self, needle: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline, f"{needle!r} never arrived:\n{self.text}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def observing(url: str, seconds: int = 30) -> AsyncIterator[Observer]:
    exe = shutil.which("coap-client-notls")
    assert exe is not None, "coap-client-notls not found: install libcoap3-bin"
    # stdbuf: line-buffered output, so each notification is read as it arrives.
    process = await asyncio.create_subprocess_exec(
        "stdbuf", "-oL", "-eL",
        exe, "-s", str(seconds), "-B", str(seconds + 2), "-v", "6", "-m", "get", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    observer = Observer(process)

    async def read() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            observer.lines.append(raw.decode(errors="replace").rstrip("\n"))

    reader = asyncio.create_task(read())
    try:
        yield observer
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        await reader


def _shown(payload: str) -> str:
    return f"<<{payload.encode().hex()}>>"


async def _queue_http(bridge: Bridge, iccid: str, text: str) -> str:
    async with bridge.api() as api:
        answer = await api.post(
            f"/devices/{iccid}/commands", json={"payload_base64": _b64(text.encode())}
        )
    assert answer.status_code == 201, answer.text
    command_id: str = answer.json()["id"]
    return command_id


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _queue_mqtt(mosquitto: MosquittoServer, iccid: str, text: str) -> None:
    exe = shutil.which("mosquitto_pub")
    assert exe is not None, "mosquitto_pub not found: install mosquitto-clients"
    process = await asyncio.create_subprocess_exec(
        exe, "-h", "127.0.0.1", "-p", str(mosquitto.port), "-V", "mqttv5", "-q", "1",
        "-t", f"devices/{iccid}/commands", "-m", text,
    )  # fmt: skip
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def _commands(bridge: Bridge, iccid: str) -> list[dict[str, Any]]:
    async with bridge.api() as api:
        answer = await api.get(f"/devices/{iccid}/commands")
    assert answer.status_code == 200, answer.text
    listed: list[dict[str, Any]] = answer.json()["commands"]
    return listed


async def _states(bridge: Bridge, iccid: str, wanted: list[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = [c["state"] for c in await _commands(bridge, iccid)]
        if states == wanted:
            return
        assert time.monotonic() < deadline, f"states {states}, wanted {wanted}"
        await asyncio.sleep(0.1)


async def test_commands_over_http_and_mqtt_reach_an_observing_device_in_order(
    bridge: Bridge, device: str, mosquitto: MosquittoServer
) -> None:
    async with observing(f"{bridge.coap_url}/commands/{device}") as observer:
        # The registration's answer: 2.05 with Observe (empty: nothing is queued yet).
        await observer.wait_for("c:2.05")
        first = await _queue_http(bridge, device, "first-over-http")
        await observer.wait_for(_shown("first-over-http"))
        await _queue_mqtt(mosquitto, device, "second-over-mqtt")
        await observer.wait_for(_shown("second-over-mqtt"))
        # Delivered means the device acknowledged the CON notification.
        await _states(bridge, device, ["delivered", "delivered"])
    assert observer.position("first-over-http") < observer.position("second-over-mqtt")
    listed = await _commands(bridge, device)
    assert listed[0]["id"] == first


async def test_commands_queued_before_the_device_observes_arrive_after_it_registers(
    bridge: Bridge, device: str
) -> None:
    for n in range(3):
        await _queue_http(bridge, device, f"waiting-{n}")
    await _states(bridge, device, ["queued", "queued", "queued"])
    async with observing(f"{bridge.coap_url}/commands/{device}") as observer:
        await observer.wait_for(_shown("waiting-2"))
        await _states(bridge, device, ["delivered"] * 3)
    positions = [observer.position(f"waiting-{n}") for n in range(3)]
    assert positions == sorted(positions)


async def _register(client: RawClient, path: list[str], token: bytes, mid: int) -> Message:
    options = [(opt.OBSERVE, b"")] + [(opt.URI_PATH, p.encode()) for p in path]
    client.send(encode_parts(CON, status.GET, mid, token, options, b""))
    deadline = time.monotonic() + 5
    while True:
        message = decode(await client.recv(max(0.1, deadline - time.monotonic())))
        if message.mtype == ACK and message.code == 0:
            continue  # empty ACK: the answer follows as a separate CON
        if message.mtype == CON:
            client.send(encode_empty(ACK, message.mid))
        return message


async def _next_notification(client: RawClient, timeout: float) -> Message:
    return decode(await client.recv(timeout))


async def test_a_reset_cancels_the_observation_and_the_command_stays_queued(
    bridge: Bridge, device: str
) -> None:
    client = await RawClient.connect("127.0.0.1", bridge.coap_port)
    try:
        answer = await _register(client, ["commands", device], b"\x0b\x01", 0x2001)
        assert answer.code == status.CONTENT
        assert any(number == opt.OBSERVE for number, _ in answer.options)
        await _queue_http(bridge, device, "refused")
        notification = await _next_notification(client, 10)
        assert notification.mtype == CON
        assert notification.payload == b"refused"
        client.send(encode_empty(RST, notification.mid))  # RFC 7641 §3.6: not interested
        await _queue_http(bridge, device, "never-sent")
        with pytest.raises(TimeoutError):
            await _next_notification(client, 3.0)
    finally:
        client.close()
    await _states(bridge, device, ["sent", "queued"])


async def test_a_replica_killed_while_holding_the_relation_loses_no_command(
    tmp_path, redis_server, mosquitto
) -> None:
    """The device observes on replica A; A is SIGKILLed; a command is queued; the device
    re-registers (its notifications stopped) on replica B and receives it. Relations live on
    the replica that holds them, the queue in Redis (docs/SCALING.md)."""
    procs = Processes(tmp_path)
    try:
        api = await procs.api(mqtt_url=mosquitto.url, redis_url=redis_server.url)
        upstream = f"http://127.0.0.1:{api.port}"
        await register(api, ICCID_KILL, "127.0.0.1")
        # Relation records refreshed every 0.3 s: a silent replica's are dropped after ~1 s.
        fast = {"COAP_BRIDGE_OBSERVE_HEARTBEAT": "0.3"}
        a = await procs.proxy("A", upstream=upstream, redis_url=redis_server.url, env=fast)
        b = await procs.proxy("B", upstream=upstream, redis_url=redis_server.url, env=fast)
        device = await PortClient.open()
        register_a = _observe(0x3001, b"\x0c\x01", ICCID_KILL)
        answer = decode(await device.request(register_a, a.port))
        assert answer.code == status.CONTENT, answer
        assert any(number == opt.OBSERVE for number, _ in answer.options)
        async with httpx.AsyncClient(
            base_url=upstream, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as client:
            # The API sees the relation A holds (its record in Redis) ...
            await _observers(client, ICCID_KILL, 1)
            a.kill()
            # ... and, once A's liveness lapsed, B's heartbeat drops it.
            await _observers(client, ICCID_KILL, 0)
            queued = await client.post(
                f"/devices/{ICCID_KILL}/commands", json={"payload_base64": _b64(b"survives")}
            )
            assert queued.status_code == 201, queued.text
            command_id = queued.json()["id"]
            # Re-registration on B: the command comes as a separate CON response (the device's
            # ACK of it is the delivery), after an empty ACK.
            device.send(_observe(0x3002, b"\x0c\x02", ICCID_KILL), b.port)
            got = await _first_with_payload(device, b.port)
            assert got.payload == b"survives"
            assert got.mtype == CON
            device.send(encode_empty(ACK, got.mid), b.port)
            await _observers(client, ICCID_KILL, 1)  # now held by B
            deadline = time.monotonic() + 10
            while True:
                listed = (await client.get(f"/devices/{ICCID_KILL}/commands")).json()["commands"]
                if [(c["id"], c["state"]) for c in listed] == [(command_id, "delivered")]:
                    break
                assert time.monotonic() < deadline, listed
                await asyncio.sleep(0.1)
        await device.aclose()
    finally:
        procs.stop_all()


ICCID_KILL = "8988280666150099999"


async def _observers(client: httpx.AsyncClient, iccid: str, wanted: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        listed = (await client.get(f"/devices/{iccid}/commands")).json()
        if listed["observers"] == wanted:
            return
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.1)


def _observe(mid: int, token: bytes, iccid: str) -> bytes:
    options = [(opt.OBSERVE, b""), (opt.URI_PATH, b"commands"), (opt.URI_PATH, iccid.encode())]
    return encode_parts(CON, status.GET, mid, token, options, b"")


async def _first_with_payload(device: PortClient, port: int, timeout: float = 10) -> Message:
    deadline = time.monotonic() + timeout
    while True:
        message = decode(await device.recv_from(port, max(0.1, deadline - time.monotonic())))
        if message.payload:
            return message
        if message.mtype == CON:
            device.send(encode_empty(ACK, message.mid), port)


async def test_over_dtls_a_device_observes_its_own_commands_only(
    tmp_path, redis_server, mosquitto
) -> None:
    coaps_port = free_port(kind=2)
    async with running_bridge(
        tmp_path,
        redis_url=redis_server.url,
        mqtt_url=mosquitto.url,
        extra=["--coaps-port", str(coaps_port)],
    ) as bridge:
        own, other = next(_iccids), next(_iccids)
        async with bridge.api() as api:
            for iccid, ip in ((own, "10.99.0.1"), (other, "10.99.0.2")):
                await bridge.register(iccid, ip)
                keyed = await api.put(
                    f"/devices/{iccid}/psk", json={"psk": f"key-of-{iccid[-5:]}", "format": "plain"}
                )
                assert keyed.status_code < 300, keyed.text
        await dtls_ready(coaps_port)
        client = DtlsClient(own, f"key-of-{own[-5:]}".encode())
        assert await client.connect("127.0.0.1", coaps_port, timeout=10)
        try:
            # Someone else's commands: 4.03, and no relation.
            client.send(_observe(0x4001, b"\x0d\x01", other))
            refused = decode(await client.recv(5))
            assert refused.code == status.FORBIDDEN
            assert not any(number == opt.OBSERVE for number, _ in refused.options)
            # Its own: registered (the identity, not the address, names the device).
            client.send(_observe(0x4002, b"\x0d\x02", own))
            answer = decode(await client.recv(5))
            assert answer.code == status.CONTENT
            assert any(number == opt.OBSERVE for number, _ in answer.options)
            await _queue_http(bridge, own, "over-dtls")
            notification = decode(await client.recv(10))
            assert notification.mtype == CON
            assert notification.token == b"\x0d\x02"
            assert notification.payload == b"over-dtls"
            client.send(encode_empty(ACK, notification.mid))
            await _states(bridge, own, ["delivered"])
        finally:
            client.close()
