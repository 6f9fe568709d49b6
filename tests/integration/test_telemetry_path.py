"""Issue #2 acceptance: the telemetry path end to end, on real parts.

``coap-bridge up`` runs as a real process against a real ``redis-server`` and a real
``mosquitto`` (throwaway, on free ports); devices are registered through the management API;
requests come from libcoap's ``coap-client-notls``, ``aiocoap-client`` or raw datagrams; a real
MQTT subscriber checks what reached the broker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, NON, RST, encode_empty, encode_parts
from tests.support.bridge import Bridge, running_bridge
from tests.support.clients import aiocoap_client, coap_client
from tests.support.coap import RawClient
from tests.support.mqtt import subscribed

pytestmark = pytest.mark.integration

_iccids = (f"89882806660000{n:05d}" for n in itertools.count(10))


@pytest.fixture
async def bridge(tmp_path, redis_server, mosquitto) -> AsyncIterator[Bridge]:
    async with running_bridge(tmp_path, redis_url=redis_server.url, mqtt_url=mosquitto.url) as b:
        yield b


@pytest.fixture
async def device(bridge: Bridge) -> str:
    iccid = next(_iccids)
    await bridge.register(iccid, "127.0.0.1")
    return iccid


async def test_coap_client_post_reaches_mqtt_byte_exact(bridge, device, mosquitto) -> None:
    async with subscribed(mosquitto.url, "demo/first") as sub:
        run = await coap_client("-m", "post", "-e", "hello", f"{bridge.coap_url}/?t=demo/first")
        assert run.codes == ["2.04"], run.stdout + run.stderr
        [message] = await sub.wait_for(1)
    assert message.payload == b"hello"
    # Metadata travels as MQTT 5 user properties (docs/CONTRACT.md §9).
    props = dict(message.properties.UserProperty)
    assert props["iccid"] == device
    assert props["source"].startswith("127.0.0.1:")


async def test_binary_payload_on_default_topic_via_data_path(
    bridge, device, mosquitto, tmp_path
) -> None:
    body = bytes(range(256)) * 3
    payload_file = tmp_path / "payload.bin"
    payload_file.write_bytes(body)
    async with subscribed(mosquitto.url, f"devices/{device}/messages") as sub:
        run = await coap_client("-m", "post", "-f", str(payload_file), f"{bridge.coap_url}/data")
        assert run.codes == ["2.04"], run.stdout + run.stderr
        [message] = await sub.wait_for(1)
    assert message.payload == body


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("a//b", status.BAD_REQUEST),
        # t= and 254 characters: a 256-byte Uri-Query, over the option's 255 bytes (RFC 7252
        # §5.10): a critical option of the wrong length is 4.02 (§5.4.3).
        ("a" * 254, status.BAD_OPTION),
        ("a-b", status.BAD_REQUEST),
        ("ä", status.BAD_REQUEST),
    ],
    ids=["double-slash", "254-chars", "dash", "umlaut"],
)
async def test_bad_topics_are_refused_and_nothing_published(
    bridge, device, mosquitto, topic, expected
) -> None:
    client = await RawClient.connect("127.0.0.1", bridge.coap_port)
    async with subscribed(mosquitto.url, "#") as sub:
        reply = await client.request(
            encode_parts(
                CON, status.POST, 77, b"\x01", [(opt.URI_QUERY, f"t={topic}".encode())], b"x"
            )
        )
        assert (reply.mtype, reply.code, reply.payload) == (ACK, expected, b"")
        await sub.assert_silent(0.5)
    client.close()
    # And the same through libcoap's client (percent-encoding decoded by the client).
    run = await coap_client("-m", "post", "-e", "x", f"{bridge.coap_url}/?t=a-b")
    assert run.codes == ["4.00"]


async def test_wrong_method_and_unknown_path(bridge, device) -> None:
    assert (await coap_client("-m", "get", f"{bridge.coap_url}/")).codes == ["4.05"]
    assert (await coap_client("-m", "post", "-e", "x", f"{bridge.coap_url}/nope")).codes == ["4.04"]


async def test_unregistered_and_inactive_sources_are_4_01(bridge, device, mosquitto) -> None:
    await bridge.register(next(_iccids), "127.0.0.3", status="inactive")
    async with subscribed(mosquitto.url, "#") as sub:
        unknown = await coap_client(
            "-a", "127.0.0.2", "-m", "post", "-e", "x", f"{bridge.coap_url}/?t=t1"
        )
        inactive = await coap_client(
            "-a", "127.0.0.3", "-m", "post", "-e", "x", f"{bridge.coap_url}/?t=t1"
        )
        await sub.assert_silent(0.5)
    assert unknown.codes == ["4.01"]
    assert inactive.codes == ["4.01"]


async def test_broker_down_is_5_03_and_recovers(bridge, device, mosquitto) -> None:
    mosquitto.stop()
    down = await coap_client("-m", "post", "-e", "lost?", f"{bridge.coap_url}/?t=outage")
    assert down.codes == ["5.03"]
    mosquitto.start()
    async with subscribed(mosquitto.url, "outage") as sub:
        back = await coap_client("-m", "post", "-e", "after", f"{bridge.coap_url}/?t=outage")
        assert back.codes == ["2.04"], bridge.log()
        messages = await sub.wait_for(1)
        await sub.assert_silent(0.5)
    # Only what was acknowledged arrived: the message answered 5.03 was not published later.
    assert [m.payload for m in messages] == [b"after"]


async def test_duplicate_con_is_processed_once_and_answered_identically(
    bridge, device, mosquitto
) -> None:
    client = await RawClient.connect("127.0.0.1", bridge.coap_port)
    datagram = encode_parts(
        CON, status.POST, 4321, b"\xde\xad", [(opt.URI_QUERY, b"t=dup")], b"once"
    )
    async with subscribed(mosquitto.url, "dup") as sub:
        client.send(datagram)
        first = await client.recv(5)
        client.send(datagram)
        second = await client.recv(5)
        await sub.wait_for(1)
        await sub.assert_silent(0.5)
    client.close()
    assert first == second
    assert first == encode_parts(ACK, status.CHANGED, 4321, b"\xde\xad", [], b"")


async def test_messaging_rules_through_the_whole_stack(bridge, device, mosquitto) -> None:
    client = await RawClient.connect("127.0.0.1", bridge.coap_port)
    try:
        async with subscribed(mosquitto.url, "non") as sub:
            reply = await client.request(
                encode_parts(NON, status.POST, 500, b"\x05", [(opt.URI_QUERY, b"t=non")], b"n")
            )
            assert (reply.mtype, reply.code, reply.token) == (NON, status.CHANGED, b"\x05")
            await sub.wait_for(1)
        ping = await client.request(encode_empty(CON, 501))
        assert (ping.mtype, ping.code, ping.mid) == (RST, 0, 501)
        tkl9 = await client.request(bytes([0x49, status.POST, 0x01, 0xF6]) + bytes(9))
        assert (tkl9.mtype, tkl9.mid) == (RST, 0x01F6)
        critical = await client.request(encode_parts(CON, status.POST, 503, b"", [(9, b"?")], b"x"))
        assert (critical.mtype, critical.code, critical.payload) == (ACK, status.BAD_OPTION, b"")
    finally:
        client.close()


async def test_aiocoap_client_gets_2_04(bridge, device, mosquitto) -> None:
    async with subscribed(mosquitto.url, "aio") as sub:
        run = await aiocoap_client(
            "-m", "POST", "--payload", "from aiocoap", f"{bridge.coap_url}/?t=aio"
        )
        [message] = await sub.wait_for(1)
    assert "2.04" in run.codes, run.stdout + run.stderr
    assert message.payload == b"from aiocoap"


async def test_concurrent_devices_all_arrive_once(bridge, device, mosquitto) -> None:
    clients = [await RawClient.connect("127.0.0.1", bridge.coap_port) for _ in range(20)]
    async with subscribed(mosquitto.url, "burst") as sub:
        for n, client in enumerate(clients):
            client.send(
                encode_parts(
                    CON, status.POST, n, b"", [(opt.URI_QUERY, b"t=burst")], str(n).encode()
                )
            )
        replies = await asyncio.gather(*(c.recv_message(5) for c in clients))
        messages = await sub.wait_for(20)
        await sub.assert_silent(0.3)
    for client in clients:
        client.close()
    assert {r.code for r in replies} == {status.CHANGED}
    assert sorted(int(m.payload) for m in messages) == list(range(20))
