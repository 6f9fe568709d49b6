"""Issue 16: a device named by an id that is not an ICCID (the managed-PSK profile's
``koru-<IMEI>``) completes a DTLS handshake with a real libcoap client against ``coap-bridge
up`` (real Redis, real Mosquitto) with no proxy change: the proxy's PSK mirror reads the key of
``device_key(<PSK identity>)``, and the device's record is stored under its id.
"""

from __future__ import annotations

import pytest

from tests.interop.test_dtls_managed_psk import up  # noqa: F401 - the fixture
from tests.support.clients import coap_client
from tests.support.mqtt import subscribed

pytestmark = pytest.mark.interop

NODE = "koru-869181072798893"


async def test_a_device_id_is_its_psk_identity(up, mosquitto) -> None:  # noqa: F811
    async with up.bridge.api() as client:
        created = await client.post("/devices", json={"id": NODE, "imei": "869181072798893"})
        assert created.status_code == 201, created.text
        reply = await client.post(
            f"/devices/{NODE}/credentials", json={"auth_type": "psk", "key_format": "hex64"}
        )
        assert reply.status_code == 201, reply.text
    key = reply.json()["psk_key"]
    async with subscribed(mosquitto.url, "koru/up") as sub:
        run = await coap_client(
            "-m", "post", "-e", "by id", "-u", NODE, "-k", key, up.coaps("/?t=koru/up"),
            binary="coap-client-openssl", timeout=5,
        )  # fmt: skip
        assert run.codes == ["2.04"], run.stdout + run.stderr
        [message] = await sub.wait_for(1)
    assert message.payload == b"by id"
    properties = dict(message.properties.UserProperty)
    assert properties["device"] == NODE
    assert "iccid" not in properties  # not a SIM
    # A wrong key for the same identity fails the handshake: the key was really checked.
    wrong = key[:-1] + ("0" if key[-1] != "0" else "1")
    run = await coap_client(
        "-m", "post", "-e", "x", "-u", NODE, "-k", wrong, up.coaps("/?t=koru/up"),
        binary="coap-client-openssl", timeout=5,
    )  # fmt: skip
    assert run.codes != ["2.04"]
