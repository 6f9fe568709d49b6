"""Issue #6 acceptance: CoAP ``GET /location`` through a real ``coap-bridge up`` (real Redis,
real Mosquitto) with libcoap's ``coap-client-notls``: 2.05 with the CSV byte-exact and
Content-Format 0, and every code of docs/CONTRACT.md §3's table provoked over real CoAP. Over coaps://
(``coap-client-openssl`` with the device's PSK) the same request returns the location of the
device the PSK identity names, whatever address it comes from.

One bridge serves the whole module; each case has its own device at its own loopback address
(``coap-client -a 127.0.1.N`` sends from it), so the cases do not depend on each other.
5.02 / 5.04 (backend down / slow) are the proxy's forwarding behaviour for every route and are
covered by the proxy and integration suites.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.bridge import Bridge, running_bridge
from tests.support.clients import coap_client
from tests.support.dtls import dtls_ready
from tests.support.http import free_port
from tests.support.services import MosquittoServer, RedisServer

pytestmark = [pytest.mark.interop, pytest.mark.asyncio(loop_scope="module")]

BERLIN = {"longitude": 13.404954, "latitude": 52.520008, "source": "GPS", "sample_time": 1700000000}
BERLIN_CSV = b"Longitude,Latitude,Source,SampleTime\n13.404954,52.520008,GPS,1700000000\n"
_hosts = itertools.count(10)


@pytest.fixture(scope="module")
def coaps_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bridge(
    tmp_path_factory: pytest.TempPathFactory,
    _redis_process: RedisServer,
    _mosquitto_process: MosquittoServer,
    coaps_port: int,
) -> AsyncIterator[Bridge]:
    _redis_process.start()
    _redis_process.flushall()
    _mosquitto_process.start()
    async with running_bridge(
        tmp_path_factory.mktemp("location"),
        redis_url=_redis_process.url,
        mqtt_url=_mosquitto_process.url,
        extra=["--coaps-host", "127.0.0.1", "--coaps-port", str(coaps_port)],
    ) as started:
        await dtls_ready(coaps_port)
        yield started


def iccid_of(ip: str) -> str:
    return f"89882806660006{int(ip.rsplit('.', 1)[1]):05d}"


async def new_device(
    bridge: Bridge, *, location: bool = True, barred: bool = False, status: str = "active"
) -> str:
    """A device at a fresh loopback address; returns that address."""
    ip = f"127.0.1.{next(_hosts)}"
    iccid = iccid_of(ip)
    await bridge.register(iccid, ip, status)
    async with bridge.api() as api:
        if location:
            stored = await api.put(f"/devices/{iccid}/location", json=BERLIN)
            assert stored.status_code == 200, stored.text
        if barred:
            patched = await api.patch(f"/devices/{iccid}", json={"location_barred": True})
            assert patched.status_code == 200, patched.text
    return ip


async def test_get_location_is_2_05_with_the_csv_byte_exact(bridge: Bridge, tmp_path: Path) -> None:
    ip = await new_device(bridge)
    out = tmp_path / "payload"
    run = await coap_client(
        "-m", "get", "-a", ip, "-o", str(out), f"{bridge.coap_url}/location"
    )  # fmt: skip
    assert run.codes == ["2.05"], run.stdout + run.stderr
    assert out.read_bytes() == BERLIN_CSV
    # Content-Format 0 (text/plain; charset=utf-8), as libcoap names it.
    assert "Content-Format:text/plain" in run.stdout


async def test_the_newest_position_is_served(bridge: Bridge, tmp_path: Path) -> None:
    ip = await new_device(bridge)
    iccid = iccid_of(ip)
    newer = {"longitude": "2.352200", "latitude": 52.520008, "source": "CellTower",
             "sample_time": 1700000100}  # fmt: skip
    async with bridge.api() as api:
        assert (await api.put(f"/devices/{iccid}/location", json=newer)).json()["stored"]
        older = await api.put(f"/devices/{iccid}/location", json=BERLIN)
        assert older.json()["stored"] is False
    out = tmp_path / "payload"
    run = await coap_client("-m", "get", "-a", ip, "-o", str(out), f"{bridge.coap_url}/location")
    assert run.codes == ["2.05"], run.stdout + run.stderr
    assert out.read_bytes() == (
        b"Longitude,Latitude,Source,SampleTime\n2.352200,52.520008,CellTower,1700000100\n"
    )


# docs/CONTRACT.md §3's response-code table for /location, each code provoked over real CoAP.
@pytest.mark.parametrize(
    ("setup", "args", "suffix", "code"),
    [
        pytest.param({}, ["-e", "x"], "", "4.00", id="4.00-payload-on-GET"),
        pytest.param({}, [], "?x=1", "4.00", id="4.00-query"),
        pytest.param(None, [], "", "4.01", id="4.01-unregistered-source"),
        pytest.param({"status": "inactive"}, [], "", "4.01", id="4.01-inactive-device"),
        pytest.param({"barred": True}, [], "", "4.03", id="4.03-barred"),
        pytest.param({"location": False}, [], "", "4.04", id="4.04-no-location-yet"),
        pytest.param({}, ["-m", "post", "-e", "x"], "", "4.05", id="4.05-POST"),
        pytest.param({}, ["-m", "put", "-e", "x"], "", "4.05", id="4.05-PUT"),
        pytest.param({}, ["-m", "delete"], "", "4.05", id="4.05-DELETE"),
    ],
)
async def test_response_codes(
    bridge: Bridge,
    tmp_path: Path,
    setup: dict[str, bool | str] | None,
    args: list[str],
    suffix: str,
    code: str,
) -> None:
    if setup is None:
        ip = f"127.0.1.{next(_hosts)}"  # no device has this address
    else:
        ip = await new_device(bridge, **setup)  # type: ignore[arg-type]
    out = tmp_path / "payload"
    method = [] if "-m" in args else ["-m", "get"]
    run = await coap_client(
        *method, *args, "-a", ip, "-o", str(out), f"{bridge.coap_url}/location{suffix}"
    )
    assert run.codes == [code], run.stdout + run.stderr
    # Every error carries an empty payload (docs/CONTRACT.md §3).
    assert not out.exists() or out.read_bytes() == b""


async def test_over_coaps_the_psk_identity_names_the_device(
    bridge: Bridge, coaps_port: int, tmp_path: Path
) -> None:
    # Two devices; requests come from 127.0.0.1, which is neither's address: only the PSK
    # identity of the handshake can say whose location to serve.
    ip_a = await new_device(bridge)
    ip_b = await new_device(bridge, location=False)
    iccid_a, iccid_b = iccid_of(ip_a), iccid_of(ip_b)
    key_a, key_b = "locationKeyA0001", "locationKeyB0002"
    async with bridge.api() as api:
        for iccid, key in ((iccid_a, key_a), (iccid_b, key_b)):
            reply = await api.put(f"/devices/{iccid}/psk", json={"psk": key})
            assert reply.status_code == 204, reply.text
    url = f"coaps://127.0.0.1:{coaps_port}/location"
    out = tmp_path / "payload"
    run = await coap_client(
        "-m", "get", "-u", iccid_a, "-k", key_a, "-o", str(out), url,
        binary="coap-client-openssl", timeout=5,
    )  # fmt: skip
    assert run.codes == ["2.05"], run.stdout + run.stderr
    assert out.read_bytes() == BERLIN_CSV
    out.unlink()
    run = await coap_client(
        "-m", "get", "-u", iccid_b, "-k", key_b, "-o", str(out), url,
        binary="coap-client-openssl", timeout=5,
    )  # fmt: skip
    assert run.codes == ["4.04"], run.stdout + run.stderr  # B has no location, A's is not B's
