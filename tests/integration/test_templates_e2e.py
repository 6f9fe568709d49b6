"""Issue 17 acceptance: binary payload templates and message metadata, end to end on real parts.

``coap-bridge up`` runs as a real process with a real ``redis-server``; a template is uploaded
and assigned through the management API exactly as the README's worked example does, and
libcoap's ``coap-client-notls`` sends the device's 12-byte binary payload from a file. A real
MQTT subscriber checks what the broker delivered: on ``mosquitto`` (MQTT 5) the translated JSON
with its user properties; on the embedded broker (MQTT 3.1.1) with
``COAP_BRIDGE_MQTT_METADATA=envelope``, the metadata inside the message.
"""

from __future__ import annotations

import base64
import itertools
import json
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.support.bridge import Bridge, running_bridge
from tests.support.clients import coap_client
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer, RedisServer

pytestmark = pytest.mark.integration

_iccids = (f"89882806660017{n:05d}" for n in itertools.count(1))

# An environment sensor's frame, in the platform's template format (docs/API.md, "Payload
# templates"): big-endian unless said otherwise, dotted names nest, the two location fields
# also update the device's position.
TEMPLATE: dict[str, Any] = {
    "sense": [
        {
            "asset": "env.temperature",
            "value": {"byte": 0, "bytelength": 2, "type": "int", "scale": 0.01},
        },
        {"asset": "env.humidity", "value": {"byte": 2, "bytelength": 1, "type": "uint"}},
        {"asset": "door_open", "value": {"byte": 3, "bytelength": 1, "type": "boolean"}},
        {
            "asset": "gps.lat",
            "value": {"byte": 4, "bytelength": 4, "type": "float"},
            "custom_type": "location_lat",
        },
        {
            "asset": "gps.lon",
            "value": {"byte": 8, "bytelength": 4, "type": "float", "byteorder": "little"},
            "custom_type": "location_long",
        },
    ]
}
LATITUDE, LONGITUDE = 52.520008, 13.404954
# -12.34 °C, 55 % humidity, door open, then the position: 12 bytes.
FRAME = (
    struct.pack(">hBB", -1234, 55, 1) + struct.pack(">f", LATITUDE) + struct.pack("<f", LONGITUDE)
)
# What a float32 holds of each degree value, as a JSON number reads back.
LAT32 = struct.unpack(">f", struct.pack(">f", LATITUDE))[0]
LON32 = struct.unpack("<f", struct.pack("<f", LONGITUDE))[0]


def _expected(document: dict[str, Any]) -> None:
    assert len(FRAME) == 12
    assert document["env"] == {"temperature": pytest.approx(-12.34), "humidity": 55}
    assert document["door_open"] is True
    assert document["gps"] == {"lat": pytest.approx(LAT32), "lon": pytest.approx(LON32)}
    assert set(document) == {"env", "door_open", "gps"}


async def _template_device(bridge: Bridge, iccid: str) -> str:
    """Register ``iccid`` for 127.0.0.1, upload TEMPLATE, assign it; the template's id."""
    await bridge.register(iccid, "127.0.0.1")
    async with bridge.api() as api:
        created = await api.post("/templates", json={"name": "env-sensor", "template": TEMPLATE})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["min_length"] == 12
        assert body["template"] == TEMPLATE
        template_id = str(body["id"])
        # The template tester gives the JSON the live path publishes.
        tested = await api.post(f"/templates/{template_id}/test", json={"payload_hex": FRAME.hex()})
        assert tested.status_code == 200, tested.text
        _expected(tested.json()["json"])
        assigned = await api.patch(f"/devices/{iccid}", json={"template": template_id})
        assert assigned.status_code == 200, assigned.text
    return template_id


def _body(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes), message.payload
    return message.payload


def _frame_file(tmp_path: Path, payload: bytes = FRAME) -> str:
    path = tmp_path / f"frame-{len(payload)}.bin"
    path.write_bytes(payload)
    return str(path)


@pytest.fixture
async def bridge(
    tmp_path: Path, redis_server: RedisServer, mosquitto: MosquittoServer
) -> AsyncIterator[Bridge]:
    async with running_bridge(tmp_path, redis_url=redis_server.url, mqtt_url=mosquitto.url) as b:
        yield b


async def test_binary_frame_arrives_as_json_and_updates_the_location(
    bridge: Bridge, mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    iccid = next(_iccids)
    template_id = await _template_device(bridge, iccid)
    async with subscribed(mosquitto.url, f"devices/{iccid}/messages") as sub:
        run = await coap_client(
            "-m", "post", "-f", _frame_file(tmp_path), f"{bridge.coap_url}/data"
        )
        assert run.codes == ["2.04"], run.stdout + run.stderr + bridge.log()
        [message] = await sub.wait_for(1)
    _expected(json.loads(_body(message)))
    assert b" " not in _body(message)  # compact JSON
    properties = dict(message.properties.UserProperty)
    assert properties["iccid"] == iccid
    assert properties["content-format"] == "50"
    assert properties["template"] == template_id
    # The two location fields are the device's position now (source "template").
    answer = tmp_path / "location.csv"
    where = await coap_client("-m", "get", "-o", str(answer), f"{bridge.coap_url}/location")
    assert where.codes == ["2.05"], where.stdout + where.stderr
    header, row = answer.read_text().splitlines()
    assert header == "Longitude,Latitude,Source,SampleTime"
    longitude, latitude, source, _sample_time = row.split(",")
    assert (float(longitude), float(latitude), source) == (
        pytest.approx(LON32),
        pytest.approx(LAT32),
        "template",
    )


async def test_short_frame_is_4_00_and_nothing_is_published(
    bridge: Bridge, mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    iccid = next(_iccids)
    await _template_device(bridge, iccid)
    async with subscribed(mosquitto.url, f"devices/{iccid}/messages") as sub:
        run = await coap_client(
            "-m", "post", "-f", _frame_file(tmp_path, FRAME[:11]), f"{bridge.coap_url}/data"
        )
        assert run.codes == ["4.00"], run.stdout + run.stderr + bridge.log()
        await sub.assert_silent(0.5)
    async with bridge.api() as api:
        where = await api.get(f"/devices/{iccid}/location")
    assert where.status_code == 404, where.text  # no position came from the refused frame


async def test_topic_in_location_query_from_libcoap(
    bridge: Bridge, mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    # The platform's devices may name the topic as Location-Query (option 20) instead of
    # Uri-Query (docs/CONTRACT.md §3); libcoap's client adds any option with -O.
    iccid = next(_iccids)
    await _template_device(bridge, iccid)
    async with subscribed(mosquitto.url, "tele/env") as sub:
        run = await coap_client(
            "-m", "post", "-O", "20,t=tele/env", "-f", _frame_file(tmp_path), f"{bridge.coap_url}/"
        )
        assert run.codes == ["2.04"], run.stdout + run.stderr + bridge.log()
        [message] = await sub.wait_for(1)
    _expected(json.loads(_body(message)))
    both = await coap_client(
        "-m", "post", "-O", "20,t=tele/env", "-e", "x", f"{bridge.coap_url}/?t=tele/env"
    )
    assert both.codes == ["4.00"], both.stdout + both.stderr


async def test_envelope_on_the_embedded_broker_carries_the_metadata(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with running_bridge(
        tmp_path, redis_url=redis_server.url, env={"COAP_BRIDGE_MQTT_METADATA": "envelope"}
    ) as bridge:
        assert bridge.mqtt_port
        iccid = next(_iccids)
        template_id = await _template_device(bridge, iccid)
        broker = f"mqtt://127.0.0.1:{bridge.mqtt_port}"
        before = int(time.time() * 1000)
        async with subscribed(broker, "env/#", protocol="3.1.1") as sub:
            translated = await coap_client(
                "-m", "post", "-f", _frame_file(tmp_path), f"{bridge.coap_url}/?t=env/frame"
            )
            assert translated.codes == ["2.04"], translated.stdout + bridge.log()
            [framed] = await sub.wait_for(1)
            # A device without a template: its bytes ride in base64, byte-exact.
            async with bridge.api() as api:
                plain = await api.patch(f"/devices/{iccid}", json={"template": None})
                assert plain.status_code == 200, plain.text
            raw = await coap_client(
                "-m", "post", "-t", "application/octet-stream",
                "-f", _frame_file(tmp_path), f"{bridge.coap_url}/?t=env/raw",
            )  # fmt: skip
            assert raw.codes == ["2.04"], raw.stdout + bridge.log()
            [_, raw_message] = await sub.wait_for(2)
        after = int(time.time() * 1000)
    assert (str(framed.topic), str(raw_message.topic)) == ("env/frame", "env/raw")

    envelope = json.loads(_body(framed))
    _expected(envelope.pop("payload"))
    source = envelope.pop("source")
    assert source.startswith("127.0.0.1:")
    received_at = envelope.pop("received_at")
    assert before <= received_at <= after
    assert envelope == {
        "iccid": iccid,
        "device": iccid,
        "content_format": 50,
        "template": template_id,
    }

    envelope = json.loads(_body(raw_message))
    assert base64.b64decode(envelope["payload_base64"]) == FRAME
    assert "payload" not in envelope
    assert (envelope["iccid"], envelope["content_format"]) == (iccid, 42)
    assert before <= envelope["received_at"] <= after
