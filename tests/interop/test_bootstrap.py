"""Issue #5 acceptance, API side over real CoAP: ``coap-client-notls -m get .../bootstrap``
through a real ``coap-bridge up`` (real Redis, real Mosquitto). The vendor sample's parsing
(``payload.split(",")`` into identity, key, coaps URL) must work on the answer, and the three
fields must work: a DTLS client with that identity and key reaches that URL (the launcher's
DTLS listener, from which the API derives the URL when none is configured). The key is the one
in the device's Redis hash (what the proxies' PSK mirror reads) and stays the same within the
five-minute window; the management API's keys come out as set; the per-device rate limit
answers 4.29. (Rotation after five minutes is tested with a moved clock in
``tests/api/test_bootstrap_api.py``: a real process cannot have its clock moved.)
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from policies.psk import ALPHABET
from stores.keys import DEFAULT_PREFIX, device_key
from tests.support.bridge import Bridge, running_bridge
from tests.support.clients import ClientRun, coap_client
from tests.support.http import free_port
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer, RedisServer

pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="module")]

RATE_LIMIT = 4
_hosts = itertools.count(10)
COAPS_PORT = free_port(socket.SOCK_DGRAM)
COAPS_URL = f"coaps://127.0.0.1:{COAPS_PORT}"  # derived by the API from --coaps-host/-port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bridge(
    tmp_path_factory: pytest.TempPathFactory,
    _redis_process: RedisServer,
    _mosquitto_process: MosquittoServer,
) -> AsyncIterator[Bridge]:
    _redis_process.start()
    _redis_process.flushall()
    _mosquitto_process.start()
    async with running_bridge(
        tmp_path_factory.mktemp("bootstrap"),
        redis_url=_redis_process.url,
        mqtt_url=_mosquitto_process.url,
        extra=["--coaps-host", "127.0.0.1", "--coaps-port", str(COAPS_PORT)],
        env={"COAP_BRIDGE_BOOTSTRAP_RATE_LIMIT": str(RATE_LIMIT)},
    ) as started:
        yield started


@pytest_asyncio.fixture(loop_scope="module")
async def redis(_redis_process: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(_redis_process.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def new_device(bridge: Bridge) -> tuple[str, str]:
    n = next(_hosts)
    ip, iccid = f"127.0.2.{n}", f"89882806660007{n:05d}"
    await bridge.register(iccid, ip)
    return ip, iccid


async def bootstrap(bridge: Bridge, ip: str, out: Path, *args: str) -> ClientRun:
    out.unlink(missing_ok=True)
    return await coap_client(
        "-m", "get", *args, "-a", ip, "-o", str(out), f"{bridge.coap_url}/bootstrap"
    )  # fmt: skip


async def fetch_key(bridge: Bridge, ip: str, out: Path) -> tuple[str, str, str]:
    run = await bootstrap(bridge, ip, out)
    assert run.codes == ["2.05"], run.stdout + run.stderr
    assert "Content-Format:text/plain" in run.stdout
    payload = out.read_bytes().decode()
    # As the vendor sample parses it: three fields, the URL usable as is (no line end).
    identity, key, url = payload.split(",")
    return identity, key, url


async def test_bootstrap_answers_the_csv_line_and_the_same_key_within_the_window(
    bridge: Bridge, redis: Redis, tmp_path: Path
) -> None:
    ip, iccid = await new_device(bridge)
    identity, key, url = await fetch_key(bridge, ip, tmp_path / "out")
    assert (identity, url) == (iccid, COAPS_URL)
    assert len(key) >= 16
    assert set(key) <= set(ALPHABET)
    # The key the proxies' PSK mirror will read for this identity.
    assert await redis.hget(device_key(iccid, DEFAULT_PREFIX), "psk") == key

    again = await fetch_key(bridge, ip, tmp_path / "out")
    assert again == (iccid, key, COAPS_URL)


async def test_the_bootstrapped_credentials_work_over_coaps(
    bridge: Bridge, mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    """The platform's sample device flow (docs/CONTRACT.md §4, §7): bootstrap over plain
    CoAP, then POST over coaps:// to the URL from the answer with the identity and key from
    the answer."""
    ip, iccid = await new_device(bridge)
    identity, key, url = await fetch_key(bridge, ip, tmp_path / "out")
    async with subscribed(mosquitto.url, "bootstrap/flow") as sub:
        run = await coap_client(
            "-m", "post", "-e", "over dtls", "-u", identity, "-k", key,
            f"{url}/?t=bootstrap/flow", binary="coap-client-openssl", timeout=5,
        )  # fmt: skip
        assert run.codes == ["2.04"], run.stdout + run.stderr
        [message] = await sub.wait_for(1)
    assert message.payload == b"over dtls"
    assert dict(message.properties.UserProperty)["iccid"] == iccid


async def test_each_device_gets_its_own_key(bridge: Bridge, tmp_path: Path) -> None:
    ip_a, iccid_a = await new_device(bridge)
    ip_b, iccid_b = await new_device(bridge)
    a = await fetch_key(bridge, ip_a, tmp_path / "out")
    b = await fetch_key(bridge, ip_b, tmp_path / "out")
    assert (a[0], b[0]) == (iccid_a, iccid_b)
    assert a[1] != b[1]


async def test_keys_set_and_revoked_through_the_api(
    bridge: Bridge, redis: Redis, tmp_path: Path
) -> None:
    ip, iccid = await new_device(bridge)
    async with bridge.api() as api:
        assert (
            await api.put(f"/devices/{iccid}/psk", json={"psk": "0011AABB", "format": "hex"})
        ).status_code == 204
        assert (await fetch_key(bridge, ip, tmp_path / "out"))[1] == "0x0011aabb"
        assert (await api.delete(f"/devices/{iccid}/psk")).status_code == 204
        assert await redis.hget(device_key(iccid, DEFAULT_PREFIX), "psk") is None
        fresh = (await fetch_key(bridge, ip, tmp_path / "out"))[1]
        assert fresh != "0x0011aabb"
        issued = await api.post(f"/devices/{iccid}/credentials", json={"auth_type": "psk"})
        assert issued.status_code == 201
        assert issued.json()["server"] == COAPS_URL
        assert (await fetch_key(bridge, ip, tmp_path / "out"))[1] == issued.json()["psk_key"]
        listed = await api.get("/devices")
        assert issued.json()["psk_key"] not in listed.text


@pytest.mark.parametrize(
    ("args", "code"),
    [
        pytest.param(["-m", "post", "-e", "x"], "4.05", id="4.05-POST"),
        pytest.param(["-m", "put", "-e", "x"], "4.05", id="4.05-PUT"),
        pytest.param(["-m", "delete"], "4.05", id="4.05-DELETE"),
    ],
)
async def test_other_methods_are_4_05(
    bridge: Bridge, tmp_path: Path, args: list[str], code: str
) -> None:
    ip, _ = await new_device(bridge)
    run = await coap_client(*args, "-a", ip, f"{bridge.coap_url}/bootstrap")
    assert run.codes == [code], run.stdout + run.stderr


async def test_unregistered_source_is_4_01(bridge: Bridge, tmp_path: Path) -> None:
    run = await bootstrap(bridge, f"127.0.2.{next(_hosts)}", tmp_path / "out")
    assert run.codes == ["4.01"], run.stdout + run.stderr
    assert not (tmp_path / "out").exists() or (tmp_path / "out").read_bytes() == b""


async def test_the_rate_limit_answers_4_29_and_keeps_the_key(
    bridge: Bridge, tmp_path: Path
) -> None:
    ip, _ = await new_device(bridge)
    _, key, _ = await fetch_key(bridge, ip, tmp_path / "out")
    for _ in range(RATE_LIMIT - 1):
        assert (await fetch_key(bridge, ip, tmp_path / "out"))[1] == key
    run = await bootstrap(bridge, ip, tmp_path / "out")
    assert run.codes == ["4.29"], run.stdout + run.stderr
