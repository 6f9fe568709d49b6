"""Issue #5 acceptance, end to end: PSK changes made through the API reach every replica.

A real API (in this process, so that its clock can be moved) keeps devices in a real
redis-server; two ``coap-bridge proxy`` replicas mirror the PSKs from it; a tinydtls client
does real handshakes against both. Through the API: a key is set and works on both replicas;
revoked with ``DELETE /devices/{iccid}/psk`` it fails on both within a second; and a bootstrap
five minutes after the previous one rotates a generated key, after which the old key fails and
the new one works on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from api.app import create_app
from api.deps import get_now
from api.settings import ApiSettings
from policies.forwarding import format_forwarded
from tests.api.conftest import Clock, NoPublisher
from tests.support.dtls import DtlsClient, dtls_ready
from tests.support.http import serve_app
from tests.support.processes import API_KEY, TOKEN, Proc, Processes
from tests.support.services import RedisServer

pytestmark = pytest.mark.interop

ICCID = "8988280666000000123"
DEVICE_IP = "10.9.8.7"


async def handshake(port: int, key: str, timeout: float = 0.6) -> DtlsClient | None:
    client = DtlsClient(ICCID, key.encode())
    if await client.connect("127.0.0.1", port, timeout=timeout):
        return client
    client.close()
    return None


async def works_everywhere(replicas: list[Proc], key: str, within: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    for replica in replicas:
        while (client := await handshake(replica.coaps_port, key, timeout=0.25)) is None:
            assert loop.time() < deadline, f"key not accepted by {replica.name} within {within} s"
        client.close()


async def fails_everywhere(replicas: list[Proc], key: str, within: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    for replica in replicas:
        while (client := await handshake(replica.coaps_port, key, timeout=0.25)) is not None:
            client.close()
            assert loop.time() < deadline, f"{replica.name} still accepts it after {within} s"


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[tuple[httpx.AsyncClient, Clock]]:
    clock = Clock()
    settings = ApiSettings(
        redis_url=redis_server.url, proxy_token=TOKEN, api_key=API_KEY, coaps_url="coaps://h:5684"
    )
    app = create_app(settings, publisher=NoPublisher())  # type: ignore[arg-type]
    app.dependency_overrides[get_now] = clock
    async with (
        serve_app(app) as base_url,
        httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as http,
    ):
        created = await http.post(
            "/devices", json={"iccid": ICCID, "ip": DEVICE_IP, "status": "active"}
        )
        assert created.status_code == 201, created.text
        yield http, clock


async def bootstrap(http: httpx.AsyncClient) -> str:
    answer = await http.get(
        "/bootstrap",
        headers={"X-Bridge-Token": TOKEN, "Forwarded": format_forwarded(DEVICE_IP, 5683)},
    )
    assert answer.status_code == 200, answer.text
    iccid, key, _ = answer.text.strip().split(",")
    assert iccid == ICCID
    return key


async def test_set_revoke_and_rotate_through_the_api_on_two_replicas(
    tmp_path, redis_server: RedisServer, api
) -> None:
    http, clock = api
    processes = Processes(tmp_path)
    try:
        replicas = [
            await processes.proxy(name, upstream="http://127.0.0.1:9", redis_url=redis_server.url)
            for name in ("A", "B")
        ]
        await asyncio.gather(*(dtls_ready(r.coaps_port) for r in replicas))

        # Set through the API: works on both replicas.
        set_key = await http.put(f"/devices/{ICCID}/psk", json={"psk": "Set4ThisTest0001"})
        assert set_key.status_code == 204, set_key.text
        await works_everywhere(replicas, "Set4ThisTest0001")

        # Revoked through the API: fails on both within a second.
        revoked = await http.delete(f"/devices/{ICCID}/psk")
        assert revoked.status_code == 204
        await fails_everywhere(replicas, "Set4ThisTest0001")

        # A generated key rotates when bootstrap comes >= 5 min after the previous call.
        first = await bootstrap(http)
        await works_everywhere(replicas, first)
        clock.advance(minutes=4)
        assert await bootstrap(http) == first
        clock.advance(minutes=5)
        second = await bootstrap(http)
        assert second != first
        await works_everywhere(replicas, second)
        await fails_everywhere(replicas, first)
    finally:
        processes.stop_all()
