"""Issue 16: a 1 MiB firmware image, uploaded over HTTP, downloads byte-exact over CoAP with
libcoap's ``coap-client-notls -b 1024`` and with ``aiocoap-client``, through ``coap-bridge up``
on a real ``redis-server`` and a real ``mosquitto``.

The route comes from a policy file of the test's own (``--policy``): ``/firmware/{version}``,
GET, ``idempotent = true``, so the proxy asks the API for each Block2 block as one HTTP byte
range (docs/ARCHITECTURE.md, coap/blockwise.py). Redis's own command counters show what a block
costs the store: one ``GETRANGE`` of the block's bytes, never the image.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.bridge import Bridge, running_bridge
from tests.support.clients import ClientRun, coap_client
from tests.support.redis_topologies import cli
from tests.support.services import MosquittoServer, RedisServer

pytestmark = pytest.mark.integration

POLICY = """
[[route]]
path = "/firmware/{version}"
methods = ["GET"]
target = "/firmware/{version}"
idempotent = true
"""
IMAGE = os.urandom(1024 * 1024)
BLOCKS = len(IMAGE) // 1024
VERSION = "2.1.0-rc.1"
ICCID = "8988280666160000001"


@pytest.fixture
async def bridge(
    tmp_path: Path, redis_server: RedisServer, mosquitto: MosquittoServer
) -> AsyncIterator[Bridge]:
    policy = tmp_path / "firmware.toml"
    policy.write_text(POLICY)
    async with running_bridge(
        tmp_path,
        redis_url=redis_server.url,
        mqtt_url=mosquitto.url,
        # The API's firmware download is a managed_psk resource (api/profiles.py).
        extra=["--policy", str(policy), "--block-size", "1024", "--profile", "1nce,nhub"],
    ) as running:
        await running.register(ICCID, "127.0.0.1")
        async with running.api() as api:
            stored = await api.put(
                f"/firmware/{VERSION}",
                content=IMAGE,
                headers={"Content-Type": "application/octet-stream"},
            )
        assert stored.status_code == 201, stored.text
        assert stored.json()["sha256"] == hashlib.sha256(IMAGE).hexdigest()
        yield running


def _getranges(redis_server: RedisServer) -> int:
    stats = cli(redis_server.port, "INFO", "commandstats")
    match = re.search(r"cmdstat_getrange:calls=(\d+)", stats)
    return int(match.group(1)) if match else 0


async def test_coap_client_downloads_1_mib_in_1_kib_blocks_one_small_read_each(
    bridge: Bridge, redis_server: RedisServer, tmp_path: Path
) -> None:
    out = tmp_path / "image.bin"
    cli(redis_server.port, "CONFIG", "RESETSTAT")
    run = await coap_client(
        "-b", "1024", "-m", "get", "-o", str(out), f"{bridge.coap_url}/firmware/{VERSION}",
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.read_bytes() == IMAGE
    assert run.codes.count("2.05") == BLOCKS
    # Every block was one range request to the API and one GETRANGE of 1 KiB in Redis: the
    # whole image per block would be 16 reads of 64 KiB each, 16,384 in all.
    reads = _getranges(redis_server)
    assert BLOCKS <= reads <= BLOCKS + 16, reads


async def test_aiocoap_client_downloads_it_byte_exact(bridge: Bridge, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "aiocoap-client"
    assert exe.exists(), "aiocoap-client not installed in the venv: run `make install`"
    process = await asyncio.create_subprocess_exec(
        str(exe), f"{bridge.coap_url}/firmware/{VERSION}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(IMAGE).hexdigest()


async def test_an_unknown_version_is_4_04(bridge: Bridge) -> None:
    run = await coap_client("-b", "1024", "-m", "get", f"{bridge.coap_url}/firmware/9.9.9")
    assert run.codes == ["4.04"], run.stdout[-2000:]


def _etags(run: ClientRun) -> set[str]:
    return set(re.findall(r"ETag:(0x[0-9A-Fa-f]+)", run.stdout))


async def test_a_replaced_image_downloads_whole_with_a_new_etag(
    bridge: Bridge, tmp_path: Path
) -> None:
    url = f"{bridge.coap_url}/firmware/{VERSION}"
    last_block = await coap_client("-b", f"{BLOCKS - 1},1024", "-m", "get", url)
    assert last_block.codes == ["2.05"], last_block.stdout[-2000:]
    [before] = _etags(last_block)
    new = IMAGE[::-1][: 10 * 1024 + 17]
    async with bridge.api() as api:
        replaced = await api.put(
            f"/firmware/{VERSION}",
            content=new,
            headers={"Content-Type": "application/octet-stream"},
        )
    assert replaced.status_code == 200
    out = tmp_path / "new.bin"
    run = await coap_client(
        "-b", "1024", "-m", "get", "-o", str(out), f"{bridge.coap_url}/firmware/{VERSION}",
        timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.read_bytes() == new
    [after] = _etags(run)  # one tag on every block of the new image
    assert after != before
