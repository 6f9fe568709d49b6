"""Run ``coap-bridge`` as a real process (the installed console script) on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from proxy.coap.codec import CON, RST, decode, encode_empty
from tests.support.coap import RawClient
from tests.support.http import free_port

_START_TIMEOUT = 20.0


def bridge_command() -> list[str]:
    script = Path(sys.executable).parent / "coap-bridge"
    if not script.exists():
        found = shutil.which("coap-bridge")
        if found is None:
            raise AssertionError("coap-bridge console script not installed: run `make install`")
        script = Path(found)
    return [str(script)]


@dataclass
class Bridge:
    process: subprocess.Popen[bytes]
    coap_port: int
    api_url: str
    api_key: str
    proxy_token: str
    log_path: Path
    coaps_port: int = 0
    mqtt_port: int = 0  # the embedded broker's (no mqtt_url given), else 0

    @property
    def coaps_url(self) -> str:
        return f"coaps://127.0.0.1:{self.coaps_port}"

    @property
    def coap_url(self) -> str:
        return f"coap://127.0.0.1:{self.coap_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.api_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=5
        )

    async def register(self, iccid: str, ip: str, status: str = "active") -> None:
        async with self.api() as client:
            response = await client.post(
                "/devices", json={"iccid": iccid, "ip": ip, "status": status}
            )
            assert response.status_code == 201, response.text


async def _ready(bridge: Bridge, require_mqtt: bool) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    async with httpx.AsyncClient(base_url=bridge.api_url, timeout=1) as client:
        while True:
            if bridge.process.poll() is not None:
                raise AssertionError(f"coap-bridge exited early:\n{bridge.log()}")
            with contextlib.suppress(httpx.HTTPError):
                health = await client.get("/healthz")
                if health.status_code == 200 and (
                    not require_mqtt or health.json().get("mqtt") == "connected"
                ):
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"coap-bridge not ready in time:\n{bridge.log()}")
            await asyncio.sleep(0.1)
    # The CoAP side answers a ping with RST once it is listening (RFC 7252 §4.3).
    client = await RawClient.connect("127.0.0.1", bridge.coap_port)
    try:
        while True:
            client.send(encode_empty(CON, 1))
            with contextlib.suppress(TimeoutError):
                if decode(await client.recv(0.2)).mtype == RST:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"CoAP port never answered a ping:\n{bridge.log()}")
    finally:
        client.close()


@contextlib.asynccontextmanager
async def running_bridge(
    tmp_path: Path,
    *,
    redis_url: str | None = None,
    mqtt_url: str | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Bridge]:
    coap_port = free_port(kind=2)  # SOCK_DGRAM
    coaps_port = free_port(kind=2)
    while coaps_port == coap_port:  # two probes in a row may be handed the same free port
        coaps_port = free_port(kind=2)
    api_port = free_port()
    api_key = secrets.token_urlsafe(16)
    proxy_token = secrets.token_urlsafe(16)
    args = [
        *bridge_command(),
        "up",
        "--coap-host", "127.0.0.1",
        "--coap-port", str(coap_port),
        "--api-port", str(api_port),
        "--coaps-port", str(coaps_port),
        f"--api-key={api_key}",
        f"--proxy-token={proxy_token}",
    ]  # fmt: skip
    if redis_url:
        args += ["--redis-url", redis_url]
    mqtt_port = 0
    if mqtt_url:
        args += ["--mqtt-url", mqtt_url]
    else:
        mqtt_port = free_port()
        args += ["--mqtt-port", str(mqtt_port)]
    args += extra or []
    log_path = tmp_path / f"bridge-{coap_port}.log"
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    process_env.update(env or {})
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=process_env)
    bridge = Bridge(
        process,
        coap_port,
        f"http://127.0.0.1:{api_port}",
        api_key,
        proxy_token,
        log_path,
        coaps_port,
        mqtt_port,
    )
    try:
        await _ready(bridge, require_mqtt=True)
        yield bridge
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
