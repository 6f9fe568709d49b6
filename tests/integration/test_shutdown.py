"""SIGTERM drains (issue 12, item 11): what is in flight is answered, nothing new is taken.

Real ``coap-bridge`` processes, a real slow HTTP origin (uvicorn in the test's loop) or a real
Mosquitto that is paused (SIGSTOP) so that a publish waits for its PUBACK, and raw CoAP
datagrams. Before the fix the proxy closed its socket on SIGTERM and then waited for the
upstream call: the answer was computed and never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.cli import DEMO_ICCID
from policies.forwarding import TOKEN_HEADER, format_forwarded
from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, Message, decode, encode_empty, encode_parts
from tests.support.bridge import bridge_command, running_bridge
from tests.support.coap import RawClient
from tests.support.dtls import DtlsClient, client_hello
from tests.support.http import free_port, serve_app
from tests.support.mqtt import subscribed
from tests.support.processes import TOKEN, Processes, api_healthy, register
from tests.support.services import MosquittoServer

pytestmark = pytest.mark.integration

LOCATION = b"Longitude,Latitude,Source,SampleTime\n13.404954,52.520008,GPS,1700000000\n"


class SlowOrigin:
    """An ASGI origin that answers ``GET /location`` after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.paths: list[str] = []
        self.called = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.paths.append(scope["path"])
        self.called.set()
        await asyncio.sleep(self.delay)
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": LOCATION})


def location_get(mid: int, token: bytes) -> bytes:
    return encode_parts(CON, status.GET, mid, token, [(opt.URI_PATH, b"location")], b"")


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def pings_unanswered(port: int, timeout: float = 10.0) -> None:
    """Wait until the proxy stops answering a CoAP ping with RST: it takes nothing new, which
    is what a health check sees of a draining process."""
    probe = await RawClient.connect("127.0.0.1", port)
    deadline = time.monotonic() + timeout
    try:
        while True:
            probe.send(encode_empty(CON, 0x0F0F))
            try:
                await probe.recv(0.3)
            except TimeoutError:
                return
            assert time.monotonic() < deadline, "pings still answered after SIGTERM"
    finally:
        await probe.aclose()


async def exit_code(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit code, or None if the process still runs after ``timeout`` (a hang)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        return await asyncio.to_thread(process.wait, timeout)
    return None


async def separate_response(client: RawClient, token: bytes, timeout: float = 8.0) -> Message:
    """Read until the CON response carrying ``token`` arrives; ACK it (RFC 7252 §5.2.2)."""
    deadline = time.monotonic() + timeout
    while True:
        message = await client.recv_message(max(0.01, deadline - time.monotonic()))
        if message.mtype == CON and message.token == token:
            client.send(encode_empty(ACK, message.mid))
            return message


async def test_sigterm_answers_the_request_in_flight_and_takes_no_new_one(tmp_path: Path) -> None:
    origin = SlowOrigin(delay=2.0)
    processes = Processes(tmp_path)
    async with serve_app(origin) as url:
        try:
            proxy = await processes.proxy(
                "proxy", upstream=url, redis_url=None, env={"COAP_BRIDGE_DRAIN_TIMEOUT": "15"}
            )
            device = await RawClient.connect("127.0.0.1", proxy.port)
            late = await RawClient.connect("127.0.0.1", proxy.port)
            request = location_get(0x1234, b"\x0a\x0b")
            device.send(request)
            await asyncio.wait_for(origin.called.wait(), 5)
            os.kill(proxy.process.pid, signal.SIGTERM)
            await pings_unanswered(proxy.port)
            # A new request after SIGTERM: neither forwarded nor answered (the device will
            # retransmit it to whatever serves next).
            late.send(location_get(0x0777, b"\x07"))
            # The device retransmits its request: the exchange is known, so the empty ACK
            # (RFC 7252 §4.5) tells it to wait for the separate response.
            device.send(request)
            ack = await device.recv_message(5)
            assert (ack.mtype, ack.code, ack.mid) == (ACK, 0, 0x1234), proxy.log()
            answer = await separate_response(device, b"\x0a\x0b")
            assert answer.code == status.CONTENT
            assert answer.payload == LOCATION
            code = await exit_code(proxy.process, 15)
            assert code == 0, proxy.log()
            await late.expect_silence(0.2)
            assert origin.paths == ["/location"], "a request taken after SIGTERM was forwarded"
            await device.aclose()
            await late.aclose()
        finally:
            processes.stop_all()


async def test_sigterm_to_the_workers_parent_drains_each_worker(tmp_path: Path) -> None:
    origin = SlowOrigin(delay=2.0)
    port = free_port(2)
    log_path = tmp_path / "proxy.log"
    async with serve_app(origin) as url:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*bridge_command(), "proxy", "--coap-host=127.0.0.1", f"--coap-port={port}",
                 "--coaps-port=off", "--workers=2", f"--upstream={url}",
                 f"--proxy-token={TOKEN}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")},
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while "workers sharing the port" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.1)
            clients = [await RawClient.connect("127.0.0.1", port) for _ in range(8)]
            for client in clients:  # every worker ready: each source port reaches one
                for _ in range(100):
                    client.send(encode_empty(CON, 1))
                    with contextlib.suppress(TimeoutError):
                        await client.recv(0.2)
                        break
            # Several source ports, so that (by the kernel's hash) both workers hold some.
            for n, client in enumerate(clients):
                client.send(location_get(0x2000 + n, bytes([n])))
            await wait_for(lambda: len(origin.paths) == len(clients), "not all forwarded")
            os.kill(process.pid, signal.SIGTERM)
            answers = [await separate_response(c, bytes([n])) for n, c in enumerate(clients)]
            assert [a.code for a in answers] == [status.CONTENT] * len(clients)
            code = await exit_code(process, 15)
            assert code == 0, log_path.read_text()
            for client in clients:
                await client.aclose()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


async def test_sigterm_under_up_answers_a_message_whose_publish_is_waiting(
    tmp_path: Path, mosquitto: MosquittoServer
) -> None:
    async with (
        running_bridge(
            tmp_path, mqtt_url=mosquitto.url, env={"COAP_BRIDGE_DRAIN_TIMEOUT": "15"}
        ) as bridge,
        subscribed(mosquitto.url, "drain/up") as subscriber,
    ):
        device = await RawClient.connect("127.0.0.1", bridge.coap_port)
        post = [(opt.URI_QUERY, b"t=drain/up")]
        mosquitto.pause()  # the publish waits for its PUBACK
        try:
            device.send(encode_parts(CON, status.POST, 0x3000, b"\x30", post, b"hi"))
            ack = await device.recv_message(5)  # the ACK window passed: it is in flight
            assert (ack.mtype, ack.code) == (ACK, 0), bridge.log()
            bridge.process.send_signal(signal.SIGTERM)
            await pings_unanswered(bridge.coap_port)
        finally:
            mosquitto.resume()
        answer = await separate_response(device, b"\x30")
        assert answer.code == status.CHANGED, bridge.log()
        [message] = await subscriber.wait_for(1)
        assert message.payload == b"hi"
        code = await exit_code(bridge.process, 15)
        assert code == 0, bridge.log()
        await device.aclose()


async def _ingest(api_port: int, iccid_ip: str, topic: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"http://127.0.0.1:{api_port}/ingest",
            params={"t": topic},
            content=b"drained",
            headers={TOKEN_HEADER: TOKEN, "Forwarded": format_forwarded(iccid_ip, 40000)},
        )


async def _api_with_paused_broker(
    tmp_path: Path,
    mosquitto: MosquittoServer,
    env: dict[str, str],
    during: Callable[[Processes, Any, asyncio.Task[httpx.Response]], Awaitable[None]],
) -> None:
    processes = Processes(tmp_path)
    try:
        port = free_port()
        api = processes._spawn(
            "api",
            ["api", "--api-host=127.0.0.1", f"--api-port={port}", f"--mqtt-url={mosquitto.url}",
             f"--proxy-token={TOKEN}", "--api-key=replica-test-key", "--log-level=info"],
            port,
            env,
        )  # fmt: skip
        await api_healthy(api, f"http://127.0.0.1:{port}")
        await register(api, "8988280666000000077", "192.0.2.77")
        mosquitto.pause()
        try:
            call = asyncio.create_task(_ingest(port, "192.0.2.77", "drain/api"))
            await asyncio.sleep(0.5)  # the request is read and its publish waits for PUBACK
            assert not call.done()
            os.kill(api.process.pid, signal.SIGTERM)
            await during(processes, api, call)
        finally:
            mosquitto.resume()
            processes.stop_all()
    finally:
        processes.stop_all()


async def test_sigterm_to_the_api_still_answers_the_request_in_flight(
    tmp_path: Path, mosquitto: MosquittoServer
) -> None:
    async def resume_then_expect_204(
        _: Processes, api: Any, call: asyncio.Task[httpx.Response]
    ) -> None:
        await asyncio.sleep(0.5)
        mosquitto.resume()
        response = await asyncio.wait_for(call, 10)
        assert response.status_code == 204, response.text
        assert await exit_code(api.process, 15) == 0, api.log()

    async with subscribed(mosquitto.url, "drain/api") as subscriber:
        await _api_with_paused_broker(
            tmp_path, mosquitto, {"COAP_BRIDGE_DRAIN_TIMEOUT": "15"}, resume_then_expect_204
        )
        [message] = await subscriber.wait_for(1)
    assert message.payload == b"drained"


async def test_the_api_exits_at_the_drain_timeout_when_a_publish_never_ends(
    tmp_path: Path, mosquitto: MosquittoServer
) -> None:
    async def expect_exit(_: Processes, api: Any, call: asyncio.Task[httpx.Response]) -> None:
        # The publish would wait 60 s for its PUBACK; the drain timeout is 1 s.
        code = await exit_code(api.process, 20)
        assert code == 0, f"still running 20 s after SIGTERM:\n{api.log()}"
        with contextlib.suppress(httpx.HTTPError):
            await call

    await _api_with_paused_broker(
        tmp_path,
        mosquitto,
        {"COAP_BRIDGE_DRAIN_TIMEOUT": "1", "COAP_BRIDGE_MQTT_PUBLISH_TIMEOUT": "60"},
        expect_exit,
    )


class SessionClient(DtlsClient):
    """The DTLS test client, sending and reading single datagrams through its session."""

    def send(self, datagram: bytes) -> None:
        self._dtls.write(self._connection, datagram)

    async def receive(self, timeout: float) -> bytes:
        return await asyncio.wait_for(self._plaintext.get(), timeout)


async def test_sigterm_under_up_answers_over_dtls_and_takes_no_new_handshake(
    tmp_path: Path, mosquitto: MosquittoServer
) -> None:
    psk = "drainDrainDrain1"
    async with running_bridge(
        tmp_path, mqtt_url=mosquitto.url, env={"COAP_BRIDGE_DRAIN_TIMEOUT": "15"}
    ) as bridge:
        served = re.search(r"CoAP over DTLS listening on udp 127\.0\.0\.1:(\d+)", bridge.log())
        assert served is not None, bridge.log()
        coaps_port = int(served.group(1))
        async with bridge.api() as api:
            put = await api.put(f"/devices/{DEMO_ICCID}/psk", json={"psk": psk})
            assert put.status_code in (200, 204), put.text
        device = SessionClient(DEMO_ICCID, psk.encode())
        assert await device.connect("127.0.0.1", coaps_port, timeout=5), bridge.log()
        async with subscribed(mosquitto.url, "drain/dtls") as subscriber:
            post = encode_parts(
                CON, status.POST, 0x4000, b"\x40", [(opt.URI_QUERY, b"t=drain/dtls")], b"dtls"
            )
            mosquitto.pause()
            try:
                device.send(post)
                ack = decode(await device.receive(5))  # the ACK window passed: in flight
                assert (ack.mtype, ack.code) == (ACK, 0), bridge.log()
                bridge.process.send_signal(signal.SIGTERM)
                await pings_unanswered(bridge.coap_port)
                # A new handshake is not started: no HelloVerifyRequest for a ClientHello.
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.settimeout(0.5)
                    probe.sendto(client_hello(os.urandom(32)), ("127.0.0.1", coaps_port))
                    with pytest.raises(TimeoutError):
                        probe.recv(2048)
            finally:
                mosquitto.resume()
            answer = decode(await device.receive(8))
            assert (answer.mtype, answer.code, answer.token) == (CON, status.CHANGED, b"\x40")
            device.send(encode_empty(ACK, answer.mid))
            [message] = await subscriber.wait_for(1)
            assert message.payload == b"dtls"
            code = await exit_code(bridge.process, 15)
            device.close()
        assert code == 0, bridge.log()
