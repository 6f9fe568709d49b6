"""``coap-bridge api`` / ``coap-bridge proxy`` as separate real processes (replica tests)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from proxy.coap.codec import CON, RST, decode, encode_empty
from tests.support.bridge import bridge_command
from tests.support.coap import RawClient
from tests.support.http import free_port

TOKEN = "replica-test-token"
API_KEY = "replica-test-key"


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int
    coaps_port: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Processes:
    tmp: Path
    started: list[Proc] = field(default_factory=list)

    def _spawn(self, name: str, args: list[str], port: int, env: dict[str, str] | None) -> Proc:
        log_path = self.tmp / f"{name}.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*bridge_command(), *args], stdout=log, stderr=subprocess.STDOUT,
                env=clean | (env or {}), start_new_session=True,
            )  # fmt: skip
        proc = Proc(name, process, log_path, port)
        self.started.append(proc)
        return proc

    async def api(self, *, mqtt_url: str, redis_url: str | None = None) -> Proc:
        port = free_port()
        args = [
            "api",
            "--api-host=127.0.0.1",
            f"--api-port={port}",
            f"--mqtt-url={mqtt_url}",
            f"--proxy-token={TOKEN}",
            f"--api-key={API_KEY}",
            "--log-level=warning",
        ]
        if redis_url:
            args.append(f"--redis-url={redis_url}")
        proc = self._spawn("api", args, port, None)
        await api_healthy(proc, f"http://127.0.0.1:{port}")
        return proc

    async def proxy(
        self, name: str, *, upstream: str, redis_url: str | None, env: dict[str, str] | None = None
    ) -> Proc:
        port, coaps_port = free_port(2), free_port(2)
        args = [
            "proxy",
            "--coap-host=127.0.0.1",
            f"--coap-port={port}",
            f"--coaps-port={coaps_port}",
            f"--upstream={upstream}",
            f"--proxy-token={TOKEN}",
            "--log-level=info",
        ]
        if redis_url:
            args.append(f"--redis-url={redis_url}")
        proc = self._spawn(name, args, port, env)
        proc.coaps_port = coaps_port
        await coap_ready(proc, "127.0.0.1", port)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


async def coap_ready(proc: Proc, host: str, port: int, timeout: float = 20.0) -> None:
    """Wait until a proxy answers an empty CON with RST: it serves on ``host:port``."""
    client = await RawClient.connect(host, port)
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.process.poll() is None, proc.log()
            client.send(encode_empty(CON, 1))
            with contextlib.suppress(TimeoutError):
                if decode(await client.recv(0.2)).mtype == RST:
                    return
            assert time.monotonic() < deadline, proc.log()
    finally:
        await client.aclose()


async def api_healthy(proc: Proc, base_url: str, timeout: float = 20.0) -> None:
    """Wait until ``coap-bridge api`` answers /healthz with its broker connected."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1) as client:
        while True:
            assert proc.process.poll() is None, proc.log()
            with contextlib.suppress(httpx.HTTPError):
                health = await client.get(f"{base_url}/healthz")
                if health.status_code == 200 and health.json()["mqtt"] == "connected":
                    return
            assert time.monotonic() < deadline, proc.log()
            await asyncio.sleep(0.1)


async def register(api: Proc, iccid: str, ip: str) -> None:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{api.port}", headers={"Authorization": f"Bearer {API_KEY}"}
    ) as client:
        response = await client.post(
            "/devices", json={"iccid": iccid, "ip": ip, "status": "active"}
        )
        assert response.status_code == 201, response.text
