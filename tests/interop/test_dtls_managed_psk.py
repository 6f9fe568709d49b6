"""Issue 16: PSKs as the managed-PSK platform issues them — 64 hex characters used as text.

The platform's device guide configures the key with libcoap's ``-k "<psk-key-hex>"``, and
libcoap's ``-k`` takes its argument's characters as the key, so such a device presents a 64-byte
PSK. Our tinydtls build takes up to 64 bytes (scripts/patches/dtlssocket-0.2.3-psk-64-bytes.patch;
the published one takes 16). Real clients against ``coap-bridge up`` (real Redis, real
Mosquitto):

- a key issued by ``POST /devices/{iccid}/credentials`` with ``"key_format": "hex64"``, given to
  ``coap-client-openssl`` / ``coap-client-gnutls`` ``-u <identity> -k <64 hex characters>`` and
  to aiocoap-client, completes the handshake and a POST gets 2.04 and reaches MQTT under the
  identity (``coap-client-notls`` has no DTLS and is not a device of this kind);
- a 65-byte key is refused by the API (422) and changes nothing;
- a key wrong only in its last character, or only its first 16 characters, fails the handshake:
  all 64 bytes are used, none cut off.

And on tinydtls' client side (DTLSSocket, as aiocoap and tests/support/dtls.py use it): a 64-byte
key connects, a 65-byte one is refused by the patched length check instead of overflowing
tinydtls' buffer, and the proxy keeps serving.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from policies.psk import MAX_PSK_BYTES
from proxy.transports import dtls
from tests.interop.test_dtls import dtls_proxy
from tests.support.bridge import Bridge, running_bridge
from tests.support.clients import aiocoap_post_over_dtls, coap_client
from tests.support.dtls import DtlsClient, dtls_ready
from tests.support.http import free_port
from tests.support.mqtt import subscribed

pytestmark = pytest.mark.interop

CONTENT = 69  # 2.05
_iccids = (f"89882806660016{n:05d}" for n in itertools.count(1))


@dataclass
class ManagedPskBridge:
    bridge: Bridge
    coaps_port: int

    def coaps(self, path: str) -> str:
        return f"coaps://127.0.0.1:{self.coaps_port}{path}"

    async def device_with_credentials(self) -> tuple[str, str]:
        """Register a device (at an address requests never come from, so only the PSK identity
        can name it) and issue hex64 credentials as an operator would."""
        iccid = next(_iccids)
        await self.bridge.register(iccid, "10.9.9.9")
        async with self.bridge.api() as client:
            reply = await client.post(
                f"/devices/{iccid}/credentials", json={"auth_type": "psk", "key_format": "hex64"}
            )
        assert reply.status_code == 201, reply.text
        body = reply.json()
        assert body["psk_identity"] == iccid
        assert body["server"] == self.coaps("")
        return iccid, body["psk_key"]


@pytest.fixture
async def up(tmp_path, redis_server, mosquitto) -> AsyncIterator[ManagedPskBridge]:
    coaps_port = free_port(socket.SOCK_DGRAM)
    extra = ["--coaps-host", "127.0.0.1", "--coaps-port", str(coaps_port)]
    env = {"COAP_BRIDGE_COAPS_URL": f"coaps://127.0.0.1:{coaps_port}"}
    async with running_bridge(
        tmp_path, redis_url=redis_server.url, mqtt_url=mosquitto.url, extra=extra, env=env
    ) as bridge:
        await dtls_ready(coaps_port)
        yield ManagedPskBridge(bridge, coaps_port)


def test_the_proxy_and_the_api_agree_on_64_bytes() -> None:
    assert dtls.MAX_KEY_BYTES == MAX_PSK_BYTES == 64
    assert dtls.PATCHED_BUILD == dtls.installed_build() == "0.2.3+coapbridge.3"


@pytest.mark.parametrize("binary", ["coap-client-openssl", "coap-client-gnutls"])
async def test_libcoap_with_a_hex64_key_as_the_guide_configures_it(up, mosquitto, binary) -> None:
    iccid, key = await up.device_with_credentials()
    assert len(key) == 64
    topic = f"psk64/{binary.rsplit('-', 1)[1]}"
    async with subscribed(mosquitto.url, topic) as sub:
        run = await coap_client(
            "-m", "post", "-e", "managed psk", "-u", iccid, "-k", key,
            up.coaps(f"/?t={topic}"), binary=binary, timeout=5,
        )  # fmt: skip
        assert run.codes == ["2.04"], run.stdout + run.stderr
        [message] = await sub.wait_for(1)
    assert message.payload == b"managed psk"
    assert dict(message.properties.UserProperty)["iccid"] == iccid


async def test_aiocoap_client_with_a_hex64_key(up, mosquitto, tmp_path) -> None:
    iccid, key = await up.device_with_credentials()
    async with subscribed(mosquitto.url, "psk64/aiocoap") as sub:
        run = await aiocoap_post_over_dtls(
            up.coaps("/?t=psk64/aiocoap"), iccid, key, "from aiocoap", tmp_path
        )
        assert "2.04" in run.codes, run.stdout + run.stderr
        [message] = await sub.wait_for(1)
    assert message.payload == b"from aiocoap"
    assert dict(message.properties.UserProperty)["iccid"] == iccid


async def test_a_65_byte_key_is_refused_by_the_api_and_changes_nothing(up) -> None:
    iccid, key = await up.device_with_credentials()
    async with up.bridge.api() as client:
        for body in ({"psk": key + "0"}, {"psk": "ab" * 65, "format": "hex"}):
            reply = await client.put(f"/devices/{iccid}/psk", json=body)
            assert reply.status_code == 422, reply.text
            [error] = reply.json()["detail"]
            assert (error["loc"], error["msg"]) == (["body", "psk"], "PSK is 65 bytes, at most 64")
    # The issued key still works.
    run = await coap_client(
        "-m", "post", "-e", "x", "-u", iccid, "-k", key, up.coaps("/?t=psk64/kept"),
        binary="coap-client-openssl", timeout=5,
    )  # fmt: skip
    assert run.codes == ["2.04"], run.stdout + run.stderr


async def test_a_key_wrong_anywhere_in_its_64_bytes_fails_the_handshake(up, mosquitto) -> None:
    iccid, key = await up.device_with_credentials()
    last = "0" if key[-1] != "0" else "1"
    async with subscribed(mosquitto.url, "psk64/wrong") as sub:
        for wrong in (key[:-1] + last, key[:16], key.upper()):
            run = await coap_client(
                "-m", "post", "-e", "x", "-u", iccid, "-k", wrong, up.coaps("/?t=psk64/wrong"),
                binary="coap-client-openssl", timeout=2,
            )  # fmt: skip
            assert run.codes == [], (wrong, run.stdout + run.stderr)
        await sub.assert_silent(0.2)
        run = await coap_client(
            "-m", "post", "-e", "right", "-u", iccid, "-k", key, up.coaps("/?t=psk64/wrong"),
            binary="coap-client-gnutls", timeout=5,
        )  # fmt: skip
        assert run.codes == ["2.04"], run.stdout + run.stderr
        [message] = await sub.wait_for(1)
    assert message.payload == b"right"


async def test_tinydtls_client_side_takes_64_bytes_and_refuses_65(tmp_path: Path) -> None:
    """DTLSSocket's client asks for its key through the same callback as the server; the
    published build copied it into tinydtls' 16-byte buffer unchecked."""
    iccid, key = next(_iccids), "0123456789abcdef" * 4
    async with dtls_proxy(tmp_path, {iccid: key}) as (proxy, _, seen):
        assert proxy.dtls_address is not None
        port = proxy.dtls_address[1]
        assert proxy.dtls is not None
        too_long = DtlsClient(iccid, key.encode() + b"0")
        try:
            assert not await too_long.connect("127.0.0.1", port, timeout=1.0)
        finally:
            too_long.close()
        # The length check answers with a fatal internal_error alert at once, where an
        # unchecked copy would have gone on to a Finished the proxy cannot decrypt.
        assert proxy.dtls.stats.closed_by_peer == 1
        assert proxy.dtls.stats.connected == 0
        client = DtlsClient(iccid, key.encode())
        try:
            assert await client.connect("127.0.0.1", port)
            assert (await client.get("thing")).code == CONTENT
        finally:
            client.close()
    assert len(seen.headers) == 1
