"""One MQTT connection that publishes at QoS 1 and receives commands (MQTT 3.1.1 and 5).

The API publishes telemetry and subscribes to one command filter, so it needs these packets of
the protocol: CONNECT and CONNACK, PUBLISH and PUBACK (both ways), SUBSCRIBE and SUBACK,
PINGREQ/PINGRESP (and DISCONNECT). This module speaks exactly those over one
:class:`asyncio.Protocol`, because the general clients cost too much here
(docs/ARCHITECTURE.md, "Own wire clients on the hot path": aiomqtt over paho built a Properties
object and two ReasonCodes per PUBACK, made three ``recv()`` calls per 4-byte packet and scanned
the in-flight list per PUBACK).

What it keeps of the protocol:

- MQTT 5 §3.3.4 / §4.9: at most the broker's *Receive Maximum* PUBLISHes unacknowledged
  (Mosquitto advertises 20); the rest wait here and go out as PUBACKs free slots. paho ignored
  that property.
- A PUBACK reason code ≥ 0x80 (MQTT 5 §3.4.2.1: not authorised, quota exceeded …) fails that
  message alone; 0x10 (no matching subscribers) is a success.
- *Maximum Packet Size* from CONNACK: a larger PUBLISH fails alone, never goes out.
- Keep alive (§3.1.2.10): a PINGREQ when nothing was sent for half the interval; no packet
  from the broker for 1.5 intervals closes the connection. A *Server Keep Alive* overrides ours.
- Every batch of PUBLISHes leaves in one write; after each read, TCP_QUICKACK, because a
  broker with Nagle on (Mosquitto's default) holds PUBACK n+1 until PUBACK n is acknowledged
  and Linux delays that acknowledgement (BENCHMARKS.md, the TCP_QUICKACK row).

Receiving (issue 15, commands from MQTT):

- Subscriptions ask for QoS 1 at most, so the broker never sends QoS 2 (MQTT 5 §3.8.3.1: it
  downgrades to the granted QoS); a QoS 2 PUBLISH anyway is a protocol error and ends the link.
  Under MQTT 5 they ask for Retain Handling 2 (§3.8.3.1): a retained command would otherwise be
  queued again at every reconnect.
- Inbound PUBLISHes go to the ``on_message`` handler one at a time, in arrival order, and a
  QoS 1 one is acknowledged only after the handler returned (§4.6: PUBACKs in the order the
  PUBLISHes came). A handler that raises means "not taken": no PUBACK, and the link ends, so
  that on a session that persists (``clean_start=False`` with a Session Expiry Interval) the
  broker sends the message again on the next connection (§4.4). A message already received
  when the connection drops is still handled (no PUBACK can go out any more): a redelivery may
  then repeat it, which is the QoS 1 contract (at least once), rather than lose it.
- MQTT 5 *content-type* and *message-expiry-interval* (§3.3.2.3.9, §3.3.2.3.3) are read; the
  broker sends the expiry that is left. QoS 0 messages waiting for the handler are capped
  (``_MAX_WAITING_QOS0``); QoS 1 ones are bounded by the Receive Maximum sent in CONNECT.

TLS (``mqtts://``, issue 18): :meth:`MqttLink.open` takes an :class:`ssl.SSLContext` and runs
the same protocol over asyncio's TLS transport, the broker's host name checked against its
certificate (the context's ``check_hostname``). A certificate that does not verify is a
LinkError that says so, and so is a broker that refuses our client certificate (with TLS 1.3
it does so after the handshake, so that arrives as the connection ending before CONNACK).

Failures are this module's :class:`LinkError`; nothing else leaves it (a handler's exception
becomes the LinkError that ends the link).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Protocol = Literal["5", "3.1.1"]

_CONNECT, _CONNACK, _PUBLISH_QOS1, _PUBACK = 0x10, 0x20, 0x32, 0x40
_PUBLISH, _SUBSCRIBE, _SUBACK = 0x30, 0x82, 0x90
_PINGREQ, _PINGRESP, _DISCONNECT = 0xC0, 0xD0, 0xE0

# MQTT 5 §2.2.2.2: the size of each property's value, to skip the ones we do not use.
_FIXED_SIZE = {
    **dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
    **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
    **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4),
}
_STRING_OR_BINARY = frozenset((0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F))
_STRING_PAIR, _VARINT_PROPERTY = 0x26, 0x0B
_RECEIVE_MAXIMUM, _MAXIMUM_PACKET_SIZE, _SERVER_KEEP_ALIVE = 0x21, 0x27, 0x13
_PAYLOAD_FORMAT, _MESSAGE_EXPIRY, _CONTENT_TYPE = 0x01, 0x02, 0x03
_SESSION_EXPIRY, _TOPIC_ALIAS = 0x11, 0x23
_UTF8_STRINGS = frozenset((0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F))  # the rest are binary

_MAX_WAITING_QOS0 = 1000
"""QoS 0 messages held for a slow handler; beyond, new ones are dropped (at most once)."""
DEFAULT_RECEIVE_MAXIMUM = 64
"""Unacknowledged QoS 1 PUBLISHes the broker may send us (MQTT 5 §3.1.2.11.3)."""

_CONNACK_REASONS = {
    # MQTT 3.1.1 §3.2.2.3
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
    # MQTT 5 §3.2.2.2 (the common ones)
    0x80: "unspecified error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x97: "quota exceeded",
}


class LinkError(Exception):
    """The broker refused, could not be reached, or the connection is gone."""


class PublishRefused(LinkError):
    """The broker answered this one PUBLISH with a failure reason code (MQTT 5)."""


class SubscribeRefused(LinkError):
    """The broker refused a topic filter in its SUBACK (reason code ≥ 0x80)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH from the broker. ``content_type`` and ``expiry`` (seconds left, MQTT 5
    §3.3.2.3.3) are None when absent, and always under MQTT 3.1.1."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    duplicate: bool = False
    content_type: str | None = None
    expiry: int | None = None
    utf8: bool = False  # Payload Format Indicator 1 (§3.3.2.3.2)


MessageHandler = Callable[[Message], Awaitable[None]]


def varint(value: int) -> bytes:
    """MQTT Variable Byte Integer (MQTT 5 §1.5.5)."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """(value, next offset), or None if ``data`` ends first; LinkError if malformed."""
    value, shift = 0, 0
    for index in range(at, min(at + 4, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    if len(data) >= at + 4:
        raise LinkError("malformed packet length from the broker")
    return None


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def connect_packet(
    protocol: Protocol,
    client_id: str,
    keepalive: int,
    username: str | None = None,
    password: str | None = None,
    *,
    clean_start: bool = True,
    session_expiry: int = 0,
    receive_maximum: int | None = None,
) -> bytes:
    """CONNECT, no will (MQTT 3.1.1 §3.1, MQTT 5 §3.1). ``clean_start=False`` resumes the
    session of ``client_id``; under MQTT 5 it lasts ``session_expiry`` seconds after a
    disconnection (§3.1.2.11.2), which is also sent, as ``receive_maximum``, only when set."""
    flags = 0x02 if clean_start else 0x00
    payload = _string(client_id.encode())
    if username is not None:
        flags |= 0x80
        payload += _string(username.encode())
    # MQTT 5 §3.1.2.9 allows a password without a user name; 3.1.1 (§3.1.2.9) does not.
    if password is not None and (username is not None or protocol == "5"):
        flags |= 0x40
        payload += _string(password.encode())
    level = 5 if protocol == "5" else 4
    header = _string(b"MQTT") + bytes((level, flags)) + keepalive.to_bytes(2, "big")
    if protocol == "5":
        properties = b""
        if session_expiry:
            properties += bytes((_SESSION_EXPIRY,)) + session_expiry.to_bytes(4, "big")
        if receive_maximum is not None:
            properties += bytes((_RECEIVE_MAXIMUM,)) + receive_maximum.to_bytes(2, "big")
        header += varint(len(properties)) + properties
    body = header + payload
    return bytes((_CONNECT,)) + varint(len(body)) + body


def publish_packet(
    topic: bytes, mid: int, payload: bytes, properties: bytes | None, retain: bool = False
) -> bytes:
    """PUBLISH at QoS 1; ``properties`` is an MQTT 5 property block (None under 3.1.1).
    ``retain``: the RETAIN flag (MQTT 5 §3.3.1.3), for state such as a device's status."""
    variable = _string(topic) + mid.to_bytes(2, "big")
    if properties is not None:
        variable += properties
    first = _PUBLISH_QOS1 | 0x01 if retain else _PUBLISH_QOS1
    return bytes((first,)) + varint(len(variable) + len(payload)) + variable + payload


def subscribe_packet(protocol: Protocol, mid: int, filters: Sequence[bytes]) -> bytes:
    """SUBSCRIBE at QoS 1 for each filter (MQTT 3.1.1 §3.8, MQTT 5 §3.8); under MQTT 5 with
    Retain Handling 2: no retained message is sent because of the subscription."""
    variable = mid.to_bytes(2, "big")
    options = 0x01
    if protocol == "5":
        variable += b"\x00"  # no properties
        options |= 0x20
    payload = b"".join(_string(topic_filter) + bytes((options,)) for topic_filter in filters)
    body = variable + payload
    return bytes((_SUBSCRIBE,)) + varint(len(body)) + body


def check_filter(topic_filter: str) -> bytes:
    """A topic filter a SUBSCRIBE may carry (MQTT 5 §4.7.1): raises ValueError otherwise."""
    encoded = topic_filter.encode()
    if not encoded or len(encoded) > 0xFFFF or "\0" in topic_filter:
        raise ValueError("a topic filter must be 1 to 65535 bytes without NUL")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError("'#' must be a whole level, the last one")
        if "+" in level and level != "+":
            raise ValueError("'+' must be a whole level")
    return encoded


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` falls under ``topic_filter`` (MQTT 5 §4.7; a ``$share/<group>/``
    prefix, §4.8.2, is not part of the match)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    levels, wanted = topic.split("/"), topic_filter.split("/")
    if topic.startswith("$") and wanted[0] in ("+", "#"):
        return False  # §4.7.2: wildcards at the first level do not match $-topics
    for index, level in enumerate(wanted):
        if level == "#":
            return True
        if index >= len(levels) or (level != "+" and level != levels[index]):
            return False
    return len(levels) == len(wanted)


def _properties(data: bytes, at: int, what: str) -> tuple[dict[int, object], int]:
    """Read an MQTT 5 property block (§2.2.2) at ``at``: ({id: value}, offset after it).
    Integers as int, strings as str, binary as bytes; LinkError if malformed."""
    found = _read_varint(data, at)
    if found is None:
        raise LinkError(f"malformed {what} properties")
    size, at = found
    end = at + size
    if end > len(data):
        raise LinkError(f"malformed {what} properties")
    values: dict[int, object] = {}
    try:
        while at < end:
            prop = data[at]
            at += 1
            if prop in _FIXED_SIZE:
                width = _FIXED_SIZE[prop]
                if at + width > end:
                    raise LinkError(f"malformed {what} property 0x{prop:02x}")
                values[prop] = int.from_bytes(data[at : at + width], "big")
                at += width
            elif prop in _STRING_OR_BINARY:
                length = int.from_bytes(data[at : at + 2], "big")
                raw = data[at + 2 : at + 2 + length]
                if at + 2 + length > end:
                    raise LinkError(f"malformed {what} property 0x{prop:02x}")
                values[prop] = raw.decode() if prop in _UTF8_STRINGS else bytes(raw)
                at += 2 + length
            elif prop == _STRING_PAIR:
                for _ in range(2):
                    at += 2 + int.from_bytes(data[at : at + 2], "big")
            elif prop == _VARINT_PROPERTY:
                skipped = _read_varint(data, at)
                if skipped is None:
                    raise LinkError(f"malformed {what} property")
                at = skipped[1]
            else:
                raise LinkError(f"unknown {what} property 0x{prop:02x}")
    except UnicodeDecodeError as exc:
        raise LinkError(f"{what} property is not UTF-8") from exc
    if at != end:
        raise LinkError(f"malformed {what} properties")
    return values, end


def check_topic(topic: str) -> bytes:
    """A topic a PUBLISH may carry (MQTT 5 §4.7.3): raises ValueError otherwise."""
    encoded = topic.encode()
    if not encoded or len(encoded) > 0xFFFF:
        raise ValueError("topic must be 1 to 65535 bytes")
    if "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError("a published topic cannot hold wildcards or NUL")
    return encoded


class MqttLink(asyncio.Protocol):
    """Open with :meth:`open`; publish with :meth:`publish_many`; ``lost`` resolves when the
    connection ends (with the reason, or None after :meth:`close`)."""

    def __init__(
        self, protocol: Protocol, keepalive: int, on_message: MessageHandler | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._protocol = protocol
        self._keepalive = keepalive
        self._transport: asyncio.Transport | None = None
        self._socket: socket.socket | None = None
        self._buffer = bytearray()
        self.connack: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[LinkError | None] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()  # connection_lost ran
        self._receive_maximum = 65535
        self._maximum_packet = 268_435_455  # the largest MQTT can express
        self._in_flight: dict[int, asyncio.Future[None]] = {}
        self._queued: deque[tuple[int, bytes]] = deque()  # (mid, packet) beyond the maximum
        self._next_mid = 1
        self._last_sent = loop.time()
        self._last_heard = loop.time()
        self._ping_timer: asyncio.TimerHandle | None = None
        self.session_present = False
        self._on_message = on_message
        self._subscribing: dict[int, asyncio.Future[list[int]]] = {}
        self._inbound: deque[tuple[Message, int]] = deque()  # (message, packet id or 0)
        self._waiting_qos0 = 0
        self._consumer: asyncio.Task[None] | None = None
        self.dropped = 0  # QoS 0 messages dropped because the handler was behind

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        protocol: Protocol = "5",
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        keepalive: int = 60,
        connect_timeout: float = 5.0,
        on_message: MessageHandler | None = None,
        clean_start: bool = True,
        session_expiry: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> MqttLink:
        """Connect and wait for CONNACK. ``on_message`` receives every PUBLISH from the broker
        (set here, before CONNACK, because a resumed session delivers at once). ``tls``: TLS
        with this context, ``host`` as the server name (SNI and the certificate check); the
        handshake counts in ``connect_timeout``."""
        loop = asyncio.get_running_loop()
        link: MqttLink | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                _, link = await loop.create_connection(
                    lambda: cls(protocol, keepalive, on_message),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                    # Our own deadline covers the handshake: asyncio's (60 s) never fires first.
                    ssl_handshake_timeout=connect_timeout + 1 if tls is not None else None,
                )
                link._send(
                    connect_packet(
                        protocol,
                        client_id or f"coap-bridge-{secrets.token_hex(6)}",
                        keepalive,
                        username,
                        password,
                        clean_start=clean_start,
                        session_expiry=session_expiry,
                        receive_maximum=DEFAULT_RECEIVE_MAXIMUM if on_message else None,
                    )
                )
                await link.connack
        except TimeoutError as exc:
            if link is not None:
                link.close()
                await link.wait_closed()
            raise LinkError(f"no CONNACK from {host}:{port} within {connect_timeout:g} s") from exc
        except asyncio.CancelledError:
            if link is not None and link._transport is not None:
                link._transport.abort()  # no waiting for a TLS close while being cancelled
            raise
        except ssl.SSLCertVerificationError as exc:
            raise LinkError(
                f"TLS: the certificate of the broker at {host}:{port} was not verified "
                f"({exc.verify_message}): is it signed by a CA in mqtt_ca (or the system's "
                "trust store), and does it name that host?"
            ) from exc
        except ssl.SSLError as exc:
            raise LinkError(f"TLS with the broker at {host}:{port} failed: {exc}") from exc
        except OSError as exc:
            raise LinkError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
        except LinkError:
            if link is not None:
                link.close()
                await link.wait_closed()
            raise
        link._schedule_ping()
        return link

    # --- publishing

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def publish_many(
        self, messages: Sequence[tuple[str, bytes, bytes | None]], retain: bool = False
    ) -> list[asyncio.Future[None]]:
        """Queue every message (topic, payload, MQTT 5 property block or None) and send what the
        broker's Receive Maximum allows, in one write. Each future resolves on its PUBACK, or
        fails with LinkError (refused, connection lost) or ValueError (a bad topic)."""
        futures: list[asyncio.Future[None]] = []
        outgoing: list[bytes] = []
        for topic, payload, properties in messages:
            future: asyncio.Future[None] = self._loop.create_future()
            futures.append(future)
            if self.lost.done():
                future.set_exception(self._gone())
                continue
            try:
                encoded = check_topic(topic)
            except ValueError as exc:
                future.set_exception(exc)
                continue
            try:
                mid = self._take_mid()
            except LinkError as exc:  # 65,535 unanswered: a broker that stopped acknowledging
                future.set_exception(exc)
                continue
            if self._protocol == "5":
                block = properties if properties is not None else b"\x00"  # none: length 0
            else:
                block = None  # 3.1.1 has no properties
            packet = publish_packet(encoded, mid, payload, block, retain)
            if len(packet) > self._maximum_packet:
                future.set_exception(
                    ValueError(f"PUBLISH of {len(packet)} bytes exceeds the broker's maximum")
                )
                continue
            self._in_flight[mid] = future
            if len(self._in_flight) - len(self._queued) <= self._receive_maximum:
                outgoing.append(packet)
            else:
                self._queued.append((mid, packet))
        if outgoing:
            self._send(b"".join(outgoing))
        return futures

    # --- subscribing

    def subscribe(self, filters: Sequence[str]) -> asyncio.Future[list[int]]:
        """SUBSCRIBE to ``filters`` at QoS 1. The future resolves with the granted QoS of each
        (0 or 1) on SUBACK; it fails with SubscribeRefused if the broker refused any filter,
        LinkError if the connection ends first, ValueError for a malformed filter."""
        future: asyncio.Future[list[int]] = self._loop.create_future()
        if self.lost.done():
            future.set_exception(self._gone())
            return future
        try:
            encoded = [check_filter(topic_filter) for topic_filter in filters]
            if not encoded:
                raise ValueError("SUBSCRIBE needs at least one topic filter")
            mid = self._take_mid()
        except (ValueError, LinkError) as exc:
            future.set_exception(exc)
            return future
        self._subscribing[mid] = future
        self._send(subscribe_packet(self._protocol, mid, encoded))
        return future

    def _suback(self, body: bytes) -> None:
        if len(body) < 3:
            raise LinkError("malformed SUBACK")
        mid = int.from_bytes(body[:2], "big")
        at = 2
        if self._protocol == "5":
            _, at = _properties(body, at, "SUBACK")
        future = self._subscribing.pop(mid, None)
        if future is None or future.done():
            return
        codes = list(body[at:])
        refused = [code for code in codes if code >= 0x80]
        if refused or not codes:
            future.set_exception(
                SubscribeRefused(
                    "broker refused the subscription: reason code "
                    + ", ".join(f"0x{code:02x}" for code in refused or [0x80])
                )
            )
        else:
            future.set_result(codes)

    # --- receiving

    def _publish(self, header: int, body: bytes) -> None:
        qos = (header >> 1) & 0x03
        if qos == 2:
            raise LinkError("QoS 2 PUBLISH from the broker: every subscription asked for QoS 1")
        if qos == 3 or len(body) < 2:
            raise LinkError("malformed PUBLISH from the broker")
        length = int.from_bytes(body[:2], "big")
        at = 2 + length
        if at + (2 if qos else 0) > len(body):
            raise LinkError("malformed PUBLISH from the broker")
        try:
            topic = body[2:at].decode()
        except UnicodeDecodeError as exc:
            raise LinkError("PUBLISH topic from the broker is not UTF-8") from exc
        mid = 0
        if qos:
            mid = int.from_bytes(body[at : at + 2], "big")
            at += 2
        content_type: str | None = None
        expiry: int | None = None
        utf8 = False
        if self._protocol == "5":
            properties, at = _properties(body, at, "PUBLISH")
            if _TOPIC_ALIAS in properties:
                # We announce no Topic Alias Maximum, i.e. 0 (§3.1.2.11.5).
                raise LinkError("PUBLISH with a topic alias though none was allowed")
            value = properties.get(_CONTENT_TYPE)
            content_type = value if isinstance(value, str) else None
            value = properties.get(_MESSAGE_EXPIRY)
            expiry = value if isinstance(value, int) else None
            utf8 = properties.get(_PAYLOAD_FORMAT) == 1
        if not topic:
            raise LinkError("PUBLISH from the broker without a topic")
        message = Message(
            topic=topic,
            payload=body[at:],
            qos=qos,
            retain=bool(header & 0x01),
            duplicate=bool(header & 0x08),
            content_type=content_type,
            expiry=expiry,
            utf8=utf8,
        )
        if self._on_message is None:
            # Nothing subscribed through this link: acknowledge so the broker moves on.
            if qos:
                self._puback(mid)
            return
        if not qos:
            if self._waiting_qos0 >= _MAX_WAITING_QOS0:
                self.dropped += 1
                return
            self._waiting_qos0 += 1
        self._inbound.append((message, mid))
        if self._consumer is None:
            self._consumer = self._loop.create_task(self._consume(), name="mqtt-inbound")

    async def _consume(self) -> None:
        """Hand messages to the handler one at a time, PUBACK each QoS 1 one after it."""
        handler = self._on_message
        assert handler is not None
        try:
            while self._inbound:
                message, mid = self._inbound.popleft()
                if not message.qos:
                    self._waiting_qos0 -= 1
                try:
                    await handler(message)
                except Exception as exc:  # not taken: no PUBACK, the broker sends it again
                    self._inbound.clear()
                    self._waiting_qos0 = 0
                    self._fail(LinkError(f"message handler failed on {message.topic!r}: {exc}"))
                    return
                if mid and not self.lost.done():
                    self._puback(mid)
        finally:
            self._consumer = None

    def _puback(self, mid: int) -> None:
        # Reason code and properties left out: success, none (MQTT 5 §3.4.2.1).
        self._send(bytes((_PUBACK, 2)) + mid.to_bytes(2, "big"))

    def _take_mid(self) -> int:
        for _ in range(65535):
            mid = self._next_mid
            self._next_mid = mid % 65535 + 1
            if mid not in self._in_flight and mid not in self._subscribing:
                return mid
        raise LinkError("65535 messages in flight: no packet identifier free")

    def _send(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(data)
        self._last_sent = self._loop.time()

    def abort(self, reason: str) -> None:
        """End the connection without DISCONNECT (the session, if it persists, stays)."""
        self._fail(LinkError(reason))

    def close(self, *, end_session: bool = False) -> None:
        """DISCONNECT and close; what is still in flight fails. ``end_session`` (MQTT 5): the
        DISCONNECT sets the Session Expiry Interval to 0 (§3.14.2.2.2), so a session nobody
        will resume does not keep collecting messages at the broker. Closing a live link (shutting
        down) also stops the handler: what it has not taken is left to the broker's session
        (no PUBACK went out). After a loss, received messages are still handled (see above)."""
        if not self.lost.done():
            self._inbound.clear()
            self._waiting_qos0 = 0
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                consumer.cancel()
        if self._transport is not None and not self._transport.is_closing():
            if end_session and self._protocol == "5":
                # Reason 0x00, properties: Session Expiry Interval 0.
                self._send(bytes((_DISCONNECT, 7, 0x00, 5, _SESSION_EXPIRY, 0, 0, 0, 0)))
            else:
                self._send(bytes((_DISCONNECT, 0)))
            self._transport.close()
        self._end(None)

    async def wait_closed(self, grace: float = 1.0) -> None:
        """After :meth:`close`: until the socket is closed, at most ``grace`` seconds (then it
        is aborted, not an error). Over TLS closing takes a round trip (close_notify, RFC 8446
        §6.1) rather than one loop turn; a caller that stops its event loop next waits here,
        or the socket would be left open."""
        if self._transport is None or self._closed.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), grace)
        except TimeoutError:
            self._transport.abort()

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(socket, "TCP_QUICKACK"):
                self._socket = sock

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
        reason = f"connection to the broker lost: {exc or 'closed by the broker'}"
        transport = self._transport
        if (
            not self.connack.done()
            and transport is not None
            and transport.get_extra_info("sslcontext") is not None
        ):
            # Under TLS 1.3 a broker that wants a client certificate (and got none, or one it
            # does not trust) refuses after our side of the handshake finished: all we see is
            # the connection ending before CONNACK (RFC 8446 §4.4.2.4).
            reason += (
                " (before CONNACK, over TLS: a broker that requires a client certificate "
                "ends the connection like this; check mqtt_cert/mqtt_key)"
            )
        self._end(LinkError(reason))

    def data_received(self, data: bytes) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self._last_heard = self._loop.time()
        buffer = self._buffer
        buffer += data
        at = 0
        try:
            while len(buffer) - at >= 2:
                header = buffer[at]
                length = _read_varint(buffer, at + 1)
                if length is None:
                    break
                size, start = length
                end = start + size
                if end > len(buffer):
                    break
                self._packet(header, bytes(buffer[start:end]))
                at = end
        except LinkError as exc:
            self._fail(exc)
            return
        del buffer[:at]
        self._release_queued()

    def _packet(self, header: int, body: bytes) -> None:
        kind = header & 0xF0
        if kind == _PUBACK:
            if len(body) < 2:
                raise LinkError("malformed PUBACK")
            mid = int.from_bytes(body[:2], "big")
            future = self._in_flight.pop(mid, None)
            if future is None or future.done():
                return  # not ours (or already failed): nothing waits for it
            reason = body[2] if len(body) > 2 else 0
            if reason >= 0x80:
                future.set_exception(
                    PublishRefused(f"broker refused the message: reason code 0x{reason:02x}")
                )
            else:
                future.set_result(None)
        elif kind == _PUBLISH:
            self._publish(header, body)
        elif kind == _SUBACK:
            self._suback(body)
        elif kind == _CONNACK:
            self._connack(body)
        elif kind == _DISCONNECT:
            reason = body[0] if body else 0
            raise LinkError(f"broker disconnected: reason code 0x{reason:02x}")
        # PINGRESP and anything else: hearing it is enough.

    def _connack(self, body: bytes) -> None:
        if self.connack.done() or len(body) < 2:
            raise LinkError("unexpected or malformed CONNACK")
        code = body[1]
        if code != 0:
            reason = _CONNACK_REASONS.get(code, f"code 0x{code:02x}")
            raise LinkError(f"broker refused the connection: {reason}")
        self.session_present = bool(body[0] & 0x01)
        if self._protocol == "5" and len(body) > 2:
            properties, _ = _properties(body, 2, "CONNACK")
            for prop, value in properties.items():
                if not isinstance(value, int):
                    continue
                if prop == _RECEIVE_MAXIMUM and value > 0:
                    self._receive_maximum = value
                elif prop == _MAXIMUM_PACKET_SIZE and value > 0:
                    self._maximum_packet = value
                elif prop == _SERVER_KEEP_ALIVE:
                    self._keepalive = value
        self.connack.set_result(None)

    def _release_queued(self) -> None:
        """Send queued PUBLISHes as far as freed slots allow."""
        if not self._queued:
            return
        outgoing: list[bytes] = []
        while self._queued and len(self._in_flight) - len(self._queued) < self._receive_maximum:
            mid, packet = self._queued.popleft()
            if mid in self._in_flight:
                outgoing.append(packet)
        if outgoing:
            self._send(b"".join(outgoing))

    # --- keep alive and the end

    def _schedule_ping(self) -> None:
        if self._keepalive > 0 and not self.lost.done():
            self._ping_timer = self._loop.call_later(self._keepalive / 2, self._ping)

    def _ping(self) -> None:
        now = self._loop.time()
        if now - self._last_heard > 1.5 * self._keepalive:
            self._fail(LinkError(f"broker silent for {now - self._last_heard:.0f} s"))
            return
        if now - self._last_sent >= self._keepalive / 2:
            self._send(bytes((_PINGREQ, 0)))
        self._schedule_ping()

    def _gone(self) -> LinkError:
        reason = self.lost.result() if self.lost.done() else None
        return reason or LinkError("connection to the broker closed")

    def _fail(self, error: LinkError) -> None:
        if self._transport is not None:
            self._transport.close()
        self._end(error)

    def _end(self, error: LinkError | None) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if not self.lost.done():
            self.lost.set_result(error)
        if not self.connack.done():
            self.connack.set_exception(error or LinkError("closed before CONNACK"))
            self.connack.exception()  # retrieved: open() reports it, or nobody waits
        failure = self._gone()
        in_flight, self._in_flight = self._in_flight, {}
        self._queued.clear()
        for future in in_flight.values():
            if not future.done():
                future.set_exception(failure)
        subscribing, self._subscribing = self._subscribing, {}
        for pending in subscribing.values():
            if not pending.done():
                pending.set_exception(failure)
