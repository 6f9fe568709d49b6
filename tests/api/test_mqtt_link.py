"""MqttLink on the wire: a scripted fake broker (a real TCP server on 127.0.0.1) decodes what
the link sends and answers as each test says; one test runs against a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from api.mqtt_link import LinkError, MqttLink, PublishRefused
from api.publisher import pack_user_properties
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer

_CONNECT, _PINGREQ = 0x10, 0xC0
_PINGRESP = b"\xd0\x00"
_NO_PROPERTIES = b"\x00"


# --- packets built and read by hand, independently of the module under test


def connack_v5(reason: int = 0x00, properties: bytes = b"") -> bytes:
    """MQTT 5 CONNACK: flags 0, reason code, properties (short enough for 1-byte lengths)."""
    assert len(properties) < 120
    return bytes((0x20, 3 + len(properties), 0x00, reason, len(properties))) + properties


def connack_v311(return_code: int = 0) -> bytes:
    return bytes((0x20, 0x02, 0x00, return_code))


def puback(mid: int, reason: int | None = None) -> bytes:
    """PUBACK with only the packet id, or (MQTT 5) id + reason code + empty properties."""
    if reason is None:
        return b"\x40\x02" + mid.to_bytes(2, "big")
    return b"\x40\x04" + mid.to_bytes(2, "big") + bytes((reason, 0x00))


def _remaining_length(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    value, shift = 0, 0
    for index in range(at, min(at + 4, len(data))):
        value |= (data[index] & 0x7F) << shift
        if not data[index] & 0x80:
            return value, index + 1
        shift += 7
    assert len(data) < at + 4, "malformed remaining length from the client"
    return None


def _field(data: bytes, at: int) -> tuple[bytes, int]:
    """A 2-byte-length-prefixed string or binary field, and the offset after it."""
    size = int.from_bytes(data[at : at + 2], "big")
    assert at + 2 + size <= len(data), "field runs past the packet"
    return data[at + 2 : at + 2 + size], at + 2 + size


@dataclass(frozen=True)
class Packet:
    first: int
    body: bytes

    @property
    def mid(self) -> int:
        """The packet identifier of a QoS 1 PUBLISH."""
        _, at = _field(self.body, 0)
        return int.from_bytes(self.body[at : at + 2], "big")


@dataclass(frozen=True)
class Publish:
    first: int
    topic: bytes
    mid: int
    properties: bytes | None  # the whole MQTT 5 block, its length included
    payload: bytes


def decode_publish(packet: Packet, *, v5: bool) -> Publish:
    topic, at = _field(packet.body, 0)
    mid = int.from_bytes(packet.body[at : at + 2], "big")
    at += 2
    properties = None
    if v5:
        length = _remaining_length(packet.body, at)
        assert length is not None
        size, start = length
        properties = packet.body[at : start + size]
        at = start + size
    return Publish(packet.first, topic, mid, properties, packet.body[at:])


@dataclass(frozen=True)
class Connect:
    protocol_name: bytes
    level: int
    flags: int
    keepalive: int
    properties: bytes | None  # MQTT 5 properties (without their length), None under 3.1.1
    payload: list[bytes]  # client id, then user name and password when present


def decode_connect(packet: Packet) -> Connect:
    assert packet.first == _CONNECT
    body = packet.body
    name, at = _field(body, 0)
    level, flags = body[at], body[at + 1]
    keepalive = int.from_bytes(body[at + 2 : at + 4], "big")
    at += 4
    properties = None
    if level == 5:
        length = _remaining_length(body, at)
        assert length is not None
        size, start = length
        properties = body[start : start + size]
        at = start + size
    payload = []
    while at < len(body):
        value, at = _field(body, at)
        payload.append(value)
    return Connect(name, level, flags, keepalive, properties, payload)


def user_properties(block: bytes) -> list[tuple[str, str]]:
    """The User Property pairs of an MQTT 5 property block that holds only those."""
    length = _remaining_length(block, 0)
    assert length is not None
    size, at = length
    assert at + size == len(block), "property length does not match the block"
    pairs = []
    while at < len(block):
        assert block[at] == 0x26, f"unexpected property 0x{block[at]:02x}"
        name, at = _field(block, at + 1)
        value, at = _field(block, at)
        pairs.append((name.decode(), value.decode()))
    return pairs


# --- the fake broker

# (index of the PUBLISH among those received, its packet id) -> the PUBACK, or None to hold it
AckPolicy = Callable[[int, int], bytes | None]


def ack_all(index: int, mid: int) -> bytes | None:
    return puback(mid)


class FakeBroker:
    """Accepts connections, records every packet, answers CONNECT with ``connack`` (None:
    never), each PUBLISH per ``ack`` (after ``ack_delay`` seconds), PINGREQ with PINGRESP when
    ``pingresp``; closes the connection once it has read ``close_after`` PUBLISHes."""

    def __init__(
        self,
        connack: bytes | None,
        *,
        ack: AckPolicy = ack_all,
        ack_delay: float = 0.0,
        pingresp: bool = True,
        close_after: int | None = None,
    ) -> None:
        self.connack = connack
        self.ack = ack
        self.ack_delay = ack_delay
        self.pingresp = pingresp
        self.close_after = close_after
        self.packets: list[Packet] = []
        self.publishes: list[Packet] = []
        self.unacked: set[int] = set()  # packet ids received and not yet acknowledged
        self.most_unacked = 0
        self.reused: list[int] = []  # packet ids that came again while still unacknowledged
        self.held: list[int] = []  # packet ids whose PUBACK the policy withheld
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._timers: list[asyncio.TimerHandle] = []

    async def __aenter__(self) -> FakeBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for timer in self._timers:
            timer.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def kinds(self) -> list[int]:
        return [packet.first for packet in self.packets]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"fake broker: condition not met in {timeout} s"
            await asyncio.sleep(0.005)

    def release_held(self) -> None:
        held, self.held = self.held, []
        for writer in self._writers:
            if not writer.is_closing():
                for mid in held:
                    self.unacked.discard(mid)
                    writer.write(puback(mid))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.append(task)
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                buffer += data
                replies = bytearray()
                at, close = 0, False
                while len(buffer) - at >= 2:
                    length = _remaining_length(buffer, at + 1)
                    if length is None:
                        break
                    size, start = length
                    if start + size > len(buffer):
                        break
                    packet = Packet(buffer[at], bytes(buffer[start : start + size]))
                    at = start + size
                    replies += self._answer(packet, writer)
                    if self.close_after is not None and len(self.publishes) >= self.close_after:
                        close = True
                        break
                del buffer[:at]
                if replies:
                    writer.write(replies)
                if close:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    def _answer(self, packet: Packet, writer: asyncio.StreamWriter) -> bytes:
        self.packets.append(packet)
        if packet.first == _CONNECT:
            return self.connack or b""
        if packet.first == _PINGREQ:
            return _PINGRESP if self.pingresp else b""
        if packet.first & 0xF0 != 0x30:
            return b""
        index, mid = len(self.publishes), packet.mid
        self.publishes.append(packet)
        if mid in self.unacked:
            self.reused.append(mid)
        self.unacked.add(mid)
        self.most_unacked = max(self.most_unacked, len(self.unacked))
        reply = self.ack(index, mid)
        if reply is None:
            self.held.append(mid)
            return b""
        if self.ack_delay:
            loop = asyncio.get_running_loop()
            self._timers.append(
                loop.call_later(self.ack_delay, self._ack_later, writer, mid, reply)
            )
            return b""
        self.unacked.discard(mid)
        return reply

    def _ack_later(self, writer: asyncio.StreamWriter, mid: int, reply: bytes) -> None:
        if not writer.is_closing():
            self.unacked.discard(mid)
            writer.write(reply)


@contextlib.asynccontextmanager
async def opened(broker: FakeBroker, **options: Any) -> AsyncIterator[MqttLink]:
    options.setdefault("connect_timeout", 2.0)
    link = await MqttLink.open("127.0.0.1", broker.port, **options)
    try:
        yield link
    finally:
        link.close()


async def settle(
    futures: list[asyncio.Future[None]], timeout: float = 5.0
) -> list[BaseException | None]:
    return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout)


# --- 1. Receive Maximum


async def test_no_more_publishes_are_unacknowledged_than_the_brokers_receive_maximum() -> None:
    receive_maximum_2 = b"\x21\x00\x02"
    async with (
        FakeBroker(connack_v5(properties=receive_maximum_2), ack_delay=0.02) as broker,
        opened(broker) as link,
    ):
        futures = link.publish_many([(f"rm/{i}", b"%d" % i, _NO_PROPERTIES) for i in range(10)])
        assert link.in_flight == 10
        results = await settle(futures)
        assert results == [None] * 10
        assert link.in_flight == 0
    assert broker.most_unacked == 2
    topics = [decode_publish(p, v5=True).topic for p in broker.publishes]
    assert topics == [f"rm/{i}".encode() for i in range(10)]
    assert len({p.mid for p in broker.publishes}) == 10


# --- 2. PUBACK reason codes


async def test_a_refused_puback_fails_that_message_alone_and_no_subscribers_is_a_success() -> None:
    reasons = {0: 0x00, 1: 0x87, 2: 0x10, 3: 0x00, 4: 0x00}

    def ack(index: int, mid: int) -> bytes:
        return puback(mid, reasons[index])

    async with FakeBroker(connack_v5(), ack=ack) as broker, opened(broker) as link:
        futures = link.publish_many([(f"refused/{i}", b"x", _NO_PROPERTIES) for i in range(4)])
        results = await settle(futures)
        assert [results[0], results[2], results[3]] == [None, None, None]
        assert isinstance(results[1], PublishRefused)
        assert isinstance(results[1], LinkError)
        assert "0x87" in str(results[1])
        # The link survives a refusal: the next message goes out and is acknowledged.
        assert not link.lost.done()
        assert await settle(link.publish_many([("refused/4", b"x", _NO_PROPERTIES)])) == [None]
        assert link.in_flight == 0


# --- 3. CONNACK refusals and silence


@pytest.mark.parametrize(
    ("protocol", "connack"),
    [("5", connack_v5(0x86)), ("3.1.1", connack_v311(4))],
    ids=["mqtt5-0x86", "mqtt311-code-4"],
)
async def test_a_refused_connack_becomes_a_link_error_naming_the_reason(
    protocol: str, connack: bytes
) -> None:
    async with FakeBroker(connack) as broker:
        with pytest.raises(LinkError, match="bad user name or password"):
            await MqttLink.open(
                "127.0.0.1",
                broker.port,
                protocol=protocol,  # type: ignore[arg-type]
                username="u",
                password="wrong",
                connect_timeout=2.0,
            )
        assert broker.kinds() == [_CONNECT]


async def test_a_server_that_never_sends_connack_fails_within_the_connect_timeout() -> None:
    async with FakeBroker(connack=None) as broker:
        started = time.monotonic()
        with pytest.raises(LinkError, match="no CONNACK"):
            await MqttLink.open("127.0.0.1", broker.port, connect_timeout=0.3)
        elapsed = time.monotonic() - started
        await broker.wait_until(lambda: len(broker.packets) >= 1)
        assert broker.kinds()[0] == _CONNECT
    assert 0.25 <= elapsed < 3.0


async def test_an_unreachable_broker_is_a_link_error() -> None:
    async with FakeBroker(connack_v5()) as broker:
        port = broker.port
    with pytest.raises(LinkError, match="cannot reach"):
        await MqttLink.open("127.0.0.1", port, connect_timeout=2.0)


# --- 4. CONNECT


async def test_connect_carries_level_5_clean_start_credentials_keepalive_and_empty_properties() -> (
    None
):
    async with FakeBroker(connack_v5()) as broker:
        async with opened(
            broker, username="device", password="s3cret", client_id="bridge-7", keepalive=42
        ):
            pass
        connect = decode_connect(broker.packets[0])
    assert connect == Connect(
        protocol_name=b"MQTT",
        level=5,
        flags=0x80 | 0x40 | 0x02,
        keepalive=42,
        properties=b"",
        payload=[b"bridge-7", b"device", b"s3cret"],
    )


async def test_connect_under_3_1_1_is_level_4_without_properties_and_with_a_generated_id() -> None:
    async with FakeBroker(connack_v311()) as broker:
        async with opened(broker, protocol="3.1.1", username="device"):
            pass
        connect = decode_connect(broker.packets[0])
    assert connect.protocol_name == b"MQTT"
    assert connect.level == 4
    assert connect.flags == 0x80 | 0x02  # user name without password, clean session
    assert connect.keepalive == 60
    assert connect.properties is None
    [client_id, username] = connect.payload
    assert client_id  # non-empty: 3.1.1 brokers may reject an empty id with clean session
    assert username == b"device"


async def test_connect_without_credentials_sets_neither_flag() -> None:
    async with FakeBroker(connack_v5()) as broker:
        async with opened(broker):
            pass
        connect = decode_connect(broker.packets[0])
    assert connect.flags == 0x02
    assert len(connect.payload) == 1
    assert connect.payload[0]


# --- 5. PUBLISH on the wire


async def test_an_mqtt5_publish_is_qos1_with_topic_packet_id_properties_and_payload() -> None:
    block = pack_user_properties({"iccid": "1"})
    async with FakeBroker(connack_v5()) as broker, opened(broker) as link:
        [future] = link.publish_many([("devices/1/messages", b"\x00\x01payload", block)])
        assert await settle([future]) == [None]
    [packet] = broker.publishes
    publish = decode_publish(packet, v5=True)
    assert publish.first == 0x32
    assert publish.topic == b"devices/1/messages"
    assert publish.mid == 1
    assert publish.properties == block
    assert user_properties(publish.properties) == [("iccid", "1")]
    assert publish.payload == b"\x00\x01payload"


async def test_an_mqtt311_publish_is_qos1_with_topic_packet_id_and_payload_only() -> None:
    async with FakeBroker(connack_v311()) as broker, opened(broker, protocol="3.1.1") as link:
        [future] = link.publish_many([("devices/1/messages", b"\x00\x01payload", None)])
        assert await settle([future]) == [None]
    [packet] = broker.publishes
    publish = decode_publish(packet, v5=False)
    assert publish == Publish(0x32, b"devices/1/messages", 1, None, b"\x00\x01payload")


# --- 6. Keep alive


async def test_keepalive_pings_an_answering_broker_and_the_link_stays_up() -> None:
    async with (
        FakeBroker(connack_v5(), pingresp=True) as broker,
        opened(broker, keepalive=1) as link,
    ):
        await asyncio.sleep(1.6)
        assert _PINGREQ in broker.kinds()
        assert not link.lost.done()
        assert decode_connect(broker.packets[0]).keepalive == 1


async def test_a_broker_that_stays_silent_ends_the_link_with_a_link_error() -> None:
    async with (
        FakeBroker(connack_v5(), pingresp=False) as broker,
        opened(broker, keepalive=1) as link,
    ):
        started = time.monotonic()
        reason = await asyncio.wait_for(asyncio.shield(link.lost), 3.0)
        elapsed = time.monotonic() - started
        assert isinstance(reason, LinkError)
        assert _PINGREQ in broker.kinds()  # it asked before giving up
    assert elapsed >= 1.0  # not before a whole keepalive interval of silence


# --- 7. Maximum Packet Size


async def test_a_publish_larger_than_the_brokers_maximum_packet_size_fails_alone() -> None:
    maximum_64 = b"\x27\x00\x00\x00\x40"
    # "t", packet id, empty properties: 1 + 1 + 3 + 2 + 1 = 8 bytes before the payload.
    messages = [
        ("t", b"x" * 200, _NO_PROPERTIES),
        ("t", b"s" * 56, _NO_PROPERTIES),  # exactly 64 bytes
        ("t", b"y" * 57, _NO_PROPERTIES),  # 65 bytes
        ("t", b"ok", _NO_PROPERTIES),
    ]
    async with (
        FakeBroker(connack_v5(properties=maximum_64)) as broker,
        opened(broker) as link,
    ):
        results = await settle(link.publish_many(messages))
        assert isinstance(results[0], ValueError)
        assert results[1] is None
        assert isinstance(results[2], ValueError)
        assert results[3] is None
        assert not link.lost.done()
    payloads = [decode_publish(p, v5=True).payload for p in broker.publishes]
    assert payloads == [b"s" * 56, b"ok"]
    assert [len(p.body) + 2 for p in broker.publishes] == [64, 10]


# --- 8. Bad topics


async def test_bad_topics_fail_alone_and_the_others_go_out() -> None:
    topics = ["ok/1", "a/#", "", "a+b", "ok/2"]
    async with FakeBroker(connack_v5()) as broker, opened(broker) as link:
        results = await settle(link.publish_many([(t, b"x", _NO_PROPERTIES) for t in topics]))
        assert results[0] is None
        assert results[4] is None
        for bad in results[1:4]:
            assert isinstance(bad, ValueError)
        assert link.in_flight == 0
    assert [decode_publish(p, v5=True).topic for p in broker.publishes] == [b"ok/1", b"ok/2"]


# --- 9. Connection lost


async def test_a_lost_connection_fails_everything_in_flight_and_queued() -> None:
    receive_maximum_2 = b"\x21\x00\x02"

    def never(index: int, mid: int) -> bytes | None:
        return None

    async with (
        FakeBroker(connack_v5(properties=receive_maximum_2), ack=never, close_after=2) as broker,
        opened(broker) as link,
    ):
        futures = link.publish_many([(f"lost/{i}", b"x", _NO_PROPERTIES) for i in range(5)])
        results = await settle(futures)
        for result in results:
            assert isinstance(result, LinkError)
            assert not isinstance(result, PublishRefused)
        reason = await asyncio.wait_for(asyncio.shield(link.lost), 3.0)
        assert isinstance(reason, LinkError)
        assert link.in_flight == 0
        # After the loss, a publish fails at once.
        [late] = link.publish_many([("lost/late", b"x", _NO_PROPERTIES)])
        assert late.done()
        assert isinstance(late.exception(), LinkError)
    assert len(broker.publishes) == 2  # the 3 queued ones never went out


# --- 10. Real Mosquitto over MQTT 3.1.1


async def test_a_message_published_over_mqtt_3_1_1_reaches_a_mosquitto_subscriber(
    mosquitto: MosquittoServer,
) -> None:
    topic = "link/v311"
    payload = b"\x00\x01three-one-one"
    async with subscribed(mosquitto.url, topic, protocol="3.1.1") as sub:
        link = await MqttLink.open("127.0.0.1", mosquitto.port, protocol="3.1.1")
        try:
            # A property block handed to a 3.1.1 link is left out, not glued to the payload.
            futures = link.publish_many([(topic, payload, pack_user_properties({"iccid": "1"}))])
            assert await settle(futures) == [None]
            assert not link.lost.done()
        finally:
            link.close()
        [message] = await sub.wait_for(1)
    assert str(message.topic) == topic
    assert message.payload == payload


# --- 11. Packet identifiers


async def test_packet_ids_wrap_and_are_reused_only_after_their_puback() -> None:
    # The first PUBLISH stays unacknowledged until the end: when the ids wrap past 65535, its
    # id must be skipped; every other id comes back only after its PUBACK.
    def ack(index: int, mid: int) -> bytes | None:
        return None if index == 0 else puback(mid)

    total, batch = 70_000, 1_000
    async with FakeBroker(connack_v5(), ack=ack) as broker, opened(broker) as link:
        [first] = link.publish_many([("ids/first", b"x", _NO_PROPERTIES)])
        for start in range(1, total, batch):
            count = min(batch, total - start)
            futures = link.publish_many([("ids/n", b"x", _NO_PROPERTIES)] * count)
            results = await settle(futures)
            assert results == [None] * count, f"batch at {start} failed"
        assert not first.done()
        assert link.in_flight == 1
        broker.release_held()
        assert await settle([first]) == [None]
    mids = [packet.mid for packet in broker.publishes]
    assert len(mids) == total
    assert broker.reused == []
    assert max(mids) == 65535
    assert 0 not in mids
    assert mids.count(1) == 1  # held across the wrap
    assert mids.count(2) == 2  # reused after its PUBACK


async def test_a_message_beyond_65535_unacknowledged_fails_alone() -> None:
    # A broker that stopped acknowledging: every packet id is taken, the next message cannot
    # have one. It fails by itself (the API answers it 503); the call does not blow up.
    async with (
        FakeBroker(connack_v5(), ack=lambda index, mid: None) as broker,
        opened(broker) as link,
    ):
        futures = link.publish_many([("ids/hung", b"x", _NO_PROPERTIES)] * 65536)
        assert not any(future.done() for future in futures[:65535])
        last = futures[65535]
        assert last.done()
        assert isinstance(last.exception(), LinkError)
        assert "65535" in str(last.exception())
        assert link.in_flight == 65535
        link.close()  # the waiting ones fail now: read them, or asyncio reports each one
        assert all(isinstance(future.exception(), LinkError) for future in futures)
