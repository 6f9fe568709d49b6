"""Receiving over MqttLink and MqttPublisher (issue 15, commands from MQTT) against a real
Mosquitto: SUBSCRIBE/SUBACK, inbound QoS 0 and 1, the MQTT 5 properties, PUBACK only after the
handler took the message, re-subscription after a reconnect, and no unacknowledged QoS 1
message lost across a broker restart. An MQTT application is played by aiomqtt (paho)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Literal

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from api.mqtt_link import LinkError, Message, MqttLink, SubscribeRefused
from api.publisher import MqttPublisher
from tests.api.test_mqtt_link import FakeBroker, connack_v5, connack_v311, decode_connect, opened
from tests.support.services import MosquittoServer

Version = Literal["5", "3.1.1"]
_ids = itertools.count()


def unique(prefix: str) -> str:
    """A topic root of its own for each test (the broker is shared by the session)."""
    return f"{prefix}{next(_ids)}"


async def app_publish(
    port: int,
    topic: str,
    payload: bytes,
    *,
    qos: int = 1,
    retain: bool = False,
    content_type: str | None = None,
    expiry: int | None = None,
) -> None:
    """An MQTT 5 application publishing one message (returns after its PUBACK/PUBCOMP)."""
    properties = None
    if content_type is not None or expiry is not None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if content_type is not None:
            properties.ContentType = content_type
        if expiry is not None:
            properties.MessageExpiryInterval = expiry
    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, timeout=5
    ) as client:
        await client.publish(topic, payload, qos=qos, retain=retain, properties=properties)


class Inbox:
    """A handler that records every message; ``gate`` (when set) holds it until opened."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail_next = False
        self._arrived = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)
        self._arrived.set()
        self.entered.set()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("store unreachable")
        if self.gate is not None:
            await self.gate.wait()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Message]:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.messages[:count]

    async def assert_silent(self, count: int, within: float = 0.3) -> None:
        await asyncio.sleep(within)
        assert len(self.messages) == count, [m.topic for m in self.messages[count:]]


@contextlib.asynccontextmanager
async def link_to(
    broker: MosquittoServer,
    inbox: Inbox,
    *,
    protocol: Version = "5",
    client_id: str | None = None,
    clean_start: bool = True,
    session_expiry: int = 0,
) -> AsyncIterator[MqttLink]:
    link = await MqttLink.open(
        "127.0.0.1",
        broker.port,
        protocol=protocol,
        client_id=client_id,
        on_message=inbox,
        clean_start=clean_start,
        session_expiry=session_expiry,
        connect_timeout=3.0,
    )
    try:
        yield link
    finally:
        link.close()


# --- the link


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_subscribe_is_granted_qos1_and_qos0_and_qos1_messages_arrive_in_order(
    mosquitto: MosquittoServer, protocol: Version
) -> None:
    root = unique("in/basic")
    inbox = Inbox()
    async with link_to(mosquitto, inbox, protocol=protocol) as link:
        granted = await asyncio.wait_for(link.subscribe([f"{root}/+/commands"]), 5)
        assert granted == [1]
        await app_publish(mosquitto.port, f"{root}/1/commands", b"\x00zero", qos=0)
        await app_publish(mosquitto.port, f"{root}/1/commands", b"\x01one", qos=1)
        # QoS 2 from the application is downgraded to the QoS 1 the link asked for.
        await app_publish(mosquitto.port, f"{root}/2/commands", b"\x02two", qos=2)
        first, second, third = await inbox.wait_for(3)
        assert not link.lost.done()
    assert (first.topic, first.payload, first.qos) == (f"{root}/1/commands", b"\x00zero", 0)
    assert (second.topic, second.payload, second.qos) == (f"{root}/1/commands", b"\x01one", 1)
    assert (third.topic, third.payload, third.qos) == (f"{root}/2/commands", b"\x02two", 1)
    assert not any(m.retain or m.duplicate for m in (first, second, third))


async def test_mqtt5_content_type_and_message_expiry_are_read(mosquitto: MosquittoServer) -> None:
    root = unique("in/props")
    inbox = Inbox()
    async with link_to(mosquitto, inbox) as link:
        await asyncio.wait_for(link.subscribe([f"{root}/#"]), 5)
        await app_publish(
            mosquitto.port, f"{root}/a", b"{}", content_type="application/json", expiry=3600
        )
        await app_publish(mosquitto.port, f"{root}/b", b"raw")
        with_props, without = await inbox.wait_for(2)
    assert with_props.content_type == "application/json"
    # The broker passes on what is left of the interval: at most what was sent.
    assert with_props.expiry is not None
    assert 3500 <= with_props.expiry <= 3600
    assert (without.content_type, without.expiry) == (None, None)


async def test_no_topic_outside_the_filter_arrives_and_the_status_topic_is_outside(
    mosquitto: MosquittoServer,
) -> None:
    root = unique("in/filter")
    inbox = Inbox()
    async with link_to(mosquitto, inbox) as link:
        await asyncio.wait_for(link.subscribe([f"{root}/+/commands"]), 5)
        await app_publish(mosquitto.port, f"{root}/1/commands/7f3a/status", b"{}")
        await app_publish(mosquitto.port, f"{root}/1/messages", b"x")
        await app_publish(mosquitto.port, f"{root}/1/commands", b"last")
        [message] = await inbox.wait_for(1)
        await inbox.assert_silent(1)
    assert message.payload == b"last"


async def test_a_retained_command_is_not_sent_at_subscribe_time_under_mqtt5(
    mosquitto: MosquittoServer,
) -> None:
    root = unique("in/retained")
    await app_publish(mosquitto.port, f"{root}/1/commands", b"old", retain=True)
    inbox = Inbox()
    try:
        async with link_to(mosquitto, inbox) as link:
            await asyncio.wait_for(link.subscribe([f"{root}/+/commands"]), 5)
            await app_publish(mosquitto.port, f"{root}/1/commands", b"new")
            [message] = await inbox.wait_for(1)
            await inbox.assert_silent(1)
        assert message.payload == b"new"
    finally:
        await app_publish(mosquitto.port, f"{root}/1/commands", b"", retain=True)  # clear it


async def test_no_puback_before_the_handler_returns_so_the_session_redelivers(
    mosquitto: MosquittoServer,
) -> None:
    root = unique("in/puback")
    client_id = unique("puback-")
    inbox = Inbox()
    inbox.gate = asyncio.Event()  # the handler holds the first message
    async with link_to(mosquitto, inbox, client_id=client_id, session_expiry=60) as link:
        await asyncio.wait_for(link.subscribe([f"{root}/+/c"]), 5)
        await app_publish(mosquitto.port, f"{root}/1/c", b"held")
        await asyncio.wait_for(inbox.entered.wait(), 5)
        link.abort("the API died before queueing it")
    inbox.gate.set()

    again = Inbox()
    async with link_to(
        mosquitto, again, client_id=client_id, clean_start=False, session_expiry=60
    ) as link:
        assert link.session_present
        [message] = await again.wait_for(1)
        assert (message.payload, message.duplicate) == (b"held", True)
        # Taken this time: PUBACKed, so a third connection gets nothing.
        await asyncio.sleep(0.2)
    third = Inbox()
    async with link_to(mosquitto, third, client_id=client_id, clean_start=False):
        await third.assert_silent(0)


async def test_a_failing_handler_ends_the_link_and_the_message_comes_again(
    mosquitto: MosquittoServer,
) -> None:
    root = unique("in/fail")
    client_id = unique("fail-")
    inbox = Inbox()
    inbox.fail_next = True
    async with link_to(mosquitto, inbox, client_id=client_id, session_expiry=60) as link:
        await asyncio.wait_for(link.subscribe([f"{root}/+/c"]), 5)
        await app_publish(mosquitto.port, f"{root}/1/c", b"retry me")
        reason = await asyncio.wait_for(asyncio.shield(link.lost), 5)
        assert isinstance(reason, LinkError)
        assert "store unreachable" in str(reason)
    async with link_to(mosquitto, inbox, client_id=client_id, clean_start=False, session_expiry=60):
        _, again = await inbox.wait_for(2)
    assert (again.payload, again.duplicate) == (b"retry me", True)


# --- the publisher: subscriptions over reconnects


def publisher_for(broker: MosquittoServer, **options: object) -> MqttPublisher:
    return MqttPublisher(
        host="127.0.0.1",
        port=broker.port,
        publish_timeout=3.0,
        min_backoff=0.05,
        max_backoff=0.2,
        **options,  # type: ignore[arg-type]
    )


class Hook:
    """An ``on_message(topic, payload, properties)`` hook that records its calls."""

    def __init__(self, hold: Callable[[bytes], asyncio.Event | None] = lambda _: None) -> None:
        self.calls: list[tuple[str, bytes, dict[str, object]]] = []
        self.hold = hold
        self._arrived = asyncio.Event()

    async def __call__(self, topic: str, payload: bytes, properties: dict[str, object]) -> None:
        self.calls.append((topic, payload, properties))
        self._arrived.set()
        gate = self.hold(payload)
        if gate is not None:
            await gate.wait()

    async def wait_for(self, count: int, timeout: float = 8.0) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while len(self.calls) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return [payload for _, payload, _ in self.calls]


async def wait_connected(publisher: MqttPublisher, timeout: float = 8.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if publisher.connected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the publisher did not reconnect within {timeout} s")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_the_publisher_subscribes_again_after_a_broker_restart(
    mosquitto: MosquittoServer, protocol: Version
) -> None:
    root = unique("pub/resub")
    hook = Hook()
    publisher = publisher_for(mosquitto, protocol=protocol)
    await publisher.start()
    try:
        await publisher.subscribe(f"{root}/+/commands", hook)
        await app_publish(
            mosquitto.port, f"{root}/1/commands", b"before", content_type="text/plain"
        )
        await hook.wait_for(1)
        # This broker keeps nothing across a restart: the subscription must be made again.
        mosquitto.stop()
        mosquitto.start()
        await wait_connected(publisher)
        # Connected is not yet subscribed: publish until the renewed subscription delivers.
        async with asyncio.timeout(8):
            while len(hook.calls) < 2:
                await app_publish(mosquitto.port, f"{root}/1/commands", b"after")
                await asyncio.sleep(0.1)
    finally:
        await publisher.close()
    topic, payload, properties = hook.calls[0]
    assert (topic, payload) == (f"{root}/1/commands", b"before")
    assert properties["qos"] == 1
    if protocol == "5":
        assert properties["content_type"] == "text/plain"
    else:
        assert "content_type" not in properties
    assert hook.calls[1][1] == b"after"


class PersistentMosquitto(MosquittoServer):
    """A Mosquitto that saves its sessions on shutdown and loads them at start."""

    def command(self) -> list[str]:
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} {self.host}\n"
            # Started as root, Mosquitto would drop to its own user, which cannot write to
            # pytest's private directory; as anyone else this changes nothing.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        return [self.executable, "-c", str(config)]


@pytest.fixture
def persistent_mosquitto(tmp_path: Path) -> Iterator[PersistentMosquitto]:
    with PersistentMosquitto(tmp_path / "mosquitto") as server:
        yield server


async def test_a_broker_restart_loses_no_qos1_command_that_was_not_acknowledged(
    persistent_mosquitto: PersistentMosquitto,
) -> None:
    broker = persistent_mosquitto
    root = unique("pub/restart")
    gate = asyncio.Event()
    # The handler takes "taken" at once and holds "pending" (the API still queueing it).
    hook = Hook(hold=lambda payload: gate if payload == b"pending" else None)
    publisher = publisher_for(broker)
    await publisher.start()
    try:
        await publisher.subscribe(f"{root}/+/commands", hook)
        await app_publish(broker.port, f"{root}/1/commands", b"taken")
        await app_publish(broker.port, f"{root}/1/commands", b"pending")
        assert await hook.wait_for(2) == [b"taken", b"pending"]
        broker.stop()  # saves the session: "pending" is in flight, "taken" was PUBACKed
        gate.set()  # the first attempt finishes while the broker is away: no PUBACK reaches it
        broker.start()
        await wait_connected(publisher)
        await app_publish(broker.port, f"{root}/1/commands", b"next")
        try:
            payloads = await hook.wait_for(4)
        except TimeoutError:
            raise AssertionError(hook.calls) from None
        await asyncio.sleep(0.3)
    finally:
        await publisher.close()
    # "pending" comes again (the QoS 1 promise: at least once), "taken" does not.
    assert payloads == [b"taken", b"pending", b"pending", b"next"]
    assert len(hook.calls) == 4
    assert hook.calls[2][2]["duplicate"] is True


# --- the wire, against the scripted broker of test_mqtt_link.py (exact bytes, refusals)


def publish_to_client(
    topic: bytes, payload: bytes, *, qos: int, mid: int = 0, properties: bytes | None = b"\x00"
) -> bytes:
    """A PUBLISH from the broker, built by hand (MQTT 5 §3.3; ``properties=None``: 3.1.1)."""
    variable = len(topic).to_bytes(2, "big") + topic
    if qos:
        variable += mid.to_bytes(2, "big")
    if properties is not None:
        variable += properties
    body = variable + payload
    assert len(body) < 128
    return bytes((0x30 | qos << 1, len(body))) + body


def only_writer(broker: FakeBroker) -> asyncio.StreamWriter:
    [writer] = broker._writers
    return writer


@pytest.mark.parametrize(
    ("protocol", "connack", "options", "properties"),
    [("5", connack_v5(), 0x21, b"\x00"), ("3.1.1", connack_v311(), 0x01, b"")],
    ids=["mqtt5", "mqtt311"],
)
async def test_subscribe_asks_qos1_and_a_refused_filter_fails_the_subscribe_alone(
    protocol: Version, connack: bytes, options: int, properties: bytes
) -> None:
    async with FakeBroker(connack) as broker, opened(broker, protocol=protocol) as link:
        future = link.subscribe(["a/+/c", "b/#"])
        await broker.wait_until(lambda: 0x82 in broker.kinds())
        [packet] = [p for p in broker.packets if p.first == 0x82]
        expected = (
            b"\x00\x01" + properties + b"\x00\x05a/+/c" + bytes((options,)) + b"\x00\x03b/#"
        ) + bytes((options,))
        assert packet.body == expected
        suback_body = b"\x00\x01" + properties + b"\x01\x87"
        only_writer(broker).write(bytes((0x90, len(suback_body))) + suback_body)
        with pytest.raises(SubscribeRefused, match="0x87"):
            await asyncio.wait_for(future, 3)
        assert not link.lost.done()
        with pytest.raises(ValueError, match="whole level"):
            await link.subscribe(["a/b+/c"])


async def test_pubacks_go_out_after_the_handler_and_in_arrival_order() -> None:
    inbox = Inbox()
    inbox.gate = asyncio.Event()
    # content type, a user property and a subscription identifier (skipped), expiry 30
    props = (
        b"\x03\x00\x10application/cbor"
        + b"\x26\x00\x01k\x00\x01v"
        + b"\x0b\x07"
        + b"\x02\x00\x00\x00\x1e"
    )
    block = bytes((len(props),)) + props
    async with FakeBroker(connack_v5()) as broker, opened(broker, on_message=inbox) as link:
        only_writer(broker).write(
            publish_to_client(b"d/1/c", b"one", qos=1, mid=5, properties=block)
            + publish_to_client(b"d/1/c", b"two", qos=0)
            + publish_to_client(b"d/2/c", b"three", qos=1, mid=6)
            + publish_to_client(b"d/3/c", b"four", qos=1, mid=7)
        )
        await asyncio.wait_for(inbox.entered.wait(), 3)
        await asyncio.sleep(0.1)
        assert 0x40 not in broker.kinds()  # nothing acknowledged while the handler holds
        inbox.gate.set()
        await broker.wait_until(lambda: broker.kinds().count(0x40) == 3)
        assert not link.lost.done()
    assert [p.body for p in broker.packets if p.first == 0x40] == [
        b"\x00\x05",
        b"\x00\x06",
        b"\x00\x07",
    ]
    assert [m.payload for m in inbox.messages] == [b"one", b"two", b"three", b"four"]
    first = inbox.messages[0]
    assert (first.content_type, first.expiry, first.qos) == ("application/cbor", 30, 1)


async def test_a_qos2_publish_from_the_broker_ends_the_link() -> None:
    inbox = Inbox()
    async with FakeBroker(connack_v5()) as broker, opened(broker, on_message=inbox) as link:
        only_writer(broker).write(publish_to_client(b"d/1/c", b"x", qos=2, mid=1))
        reason = await asyncio.wait_for(asyncio.shield(link.lost), 3)
    assert isinstance(reason, LinkError)
    assert "QoS 2" in str(reason)
    assert inbox.messages == []


async def test_a_persistent_session_connect_and_its_end_at_close() -> None:
    async with FakeBroker(connack_v5()) as broker:
        link = await MqttLink.open(
            "127.0.0.1",
            broker.port,
            client_id="api-1",
            on_message=Inbox(),
            clean_start=False,
            session_expiry=300,
            connect_timeout=2.0,
        )
        link.close(end_session=True)
        await broker.wait_until(lambda: 0xE0 in broker.kinds())
        connect = decode_connect(broker.packets[0])
        [disconnect] = [p for p in broker.packets if p.first == 0xE0]
    assert connect.flags == 0x00  # Clean Start 0: resume the session
    # Session Expiry Interval 300, Receive Maximum 64.
    assert connect.properties == b"\x11\x00\x00\x01\x2c\x21\x00\x40"
    # Reason 0, Session Expiry Interval 0: nobody will resume this session.
    assert disconnect.body == b"\x00\x05\x11\x00\x00\x00\x00"
