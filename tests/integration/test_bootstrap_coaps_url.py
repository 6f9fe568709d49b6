"""``/bootstrap`` hands out the coaps URL that is actually served (issue 12, item 13).

``coap-bridge up`` with the DTLS listener off, on a port the kernel picks, and with a public
``coaps_url``; the device asks ``GET /bootstrap`` in a CON datagram from the demo device's
address. The CSV line keeps its three fields
(``clientIdentity,preSharedKey,coapsEndpointUrl``, docs/API.md) in every case; with no DTLS
served and no ``coaps_url`` the third one is empty.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from launcher.cli import DEMO_ICCID
from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import CON, encode_parts
from tests.support.bridge import Bridge, running_bridge
from tests.support.coap import RawClient

pytestmark = pytest.mark.integration


async def bootstrap_fields(bridge: Bridge) -> list[str]:
    client = await RawClient.connect("127.0.0.1", bridge.coap_port)
    try:
        path = [(opt.URI_PATH, b"bootstrap")]
        answer = await client.request(encode_parts(CON, status.GET, 7, b"\x07", path, b""), 5)
    finally:
        await client.aclose()
    assert answer.code == status.CONTENT, bridge.log()
    line = answer.payload.decode()
    assert line.startswith(f"{DEMO_ICCID},"), line
    fields = line.split(",")
    assert len(fields) == 3, line
    assert re.fullmatch(r"[A-Za-z0-9]{16,}", fields[1]), line
    return fields


async def test_without_dtls_bootstrap_advertises_no_coaps_endpoint(tmp_path: Path) -> None:
    async with running_bridge(tmp_path, extra=["--coaps-port", "off"]) as bridge:
        _, _, url = await bootstrap_fields(bridge)
        assert url == ""
        async with bridge.api() as api:  # the credentials API derives it the same way
            made = await api.post(f"/devices/{DEMO_ICCID}/credentials", json={"auth_type": "psk"})
        assert made.status_code in (200, 201), made.text
        assert made.json()["server"] == ""
    assert "CoAP over DTLS listening" not in bridge.log()


async def test_bootstrap_names_the_port_the_dtls_listener_bound(tmp_path: Path) -> None:
    async with running_bridge(tmp_path, extra=["--coaps-port", "0"]) as bridge:
        _, _, url = await bootstrap_fields(bridge)
        served = re.search(r"CoAP over DTLS listening on udp 127\.0\.0\.1:(\d+)", bridge.log())
        assert served is not None, bridge.log()
        assert int(served.group(1)) != 0
        assert url == f"coaps://127.0.0.1:{served.group(1)}"


async def test_a_configured_public_coaps_url_is_handed_out_as_is(tmp_path: Path) -> None:
    public = "coaps://coap.example.com:5684"
    async with running_bridge(
        tmp_path, extra=["--coaps-port", "off"], env={"COAP_BRIDGE_COAPS_URL": public}
    ) as bridge:
        _, _, url = await bootstrap_fields(bridge)
        assert url == public
