"""One MQTT connection that only publishes, at QoS 1 (MQTT 3.1.1 and 5).

The API publishes and never subscribes, so it needs five packets of the protocol: CONNECT and
CONNACK, PUBLISH and PUBACK, PINGREQ/PINGRESP (and DISCONNECT). This module speaks exactly
those over one :class:`asyncio.Protocol`, because the general clients cost too much here
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

Failures are this module's :class:`LinkError`; nothing else leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections import deque
from collections.abc import Sequence
from typing import Literal

Protocol = Literal["5", "3.1.1"]

_CONNECT, _CONNACK, _PUBLISH_QOS1, _PUBACK = 0x10, 0x20, 0x32, 0x40
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
) -> bytes:
    """CONNECT with Clean Start, no will (MQTT 3.1.1 §3.1, MQTT 5 §3.1)."""
    flags = 0x02
    payload = _string(client_id.encode())
    if username is not None:
        flags |= 0x80
        payload += _string(username.encode())
        if password is not None:
            flags |= 0x40
            payload += _string(password.encode())
    level = 5 if protocol == "5" else 4
    header = _string(b"MQTT") + bytes((level, flags)) + keepalive.to_bytes(2, "big")
    if protocol == "5":
        header += b"\x00"  # no properties
    body = header + payload
    return bytes((_CONNECT,)) + varint(len(body)) + body


def publish_packet(topic: bytes, mid: int, payload: bytes, properties: bytes | None) -> bytes:
    """PUBLISH at QoS 1; ``properties`` is an MQTT 5 property block (None under 3.1.1)."""
    variable = _string(topic) + mid.to_bytes(2, "big")
    if properties is not None:
        variable += properties
    return bytes((_PUBLISH_QOS1,)) + varint(len(variable) + len(payload)) + variable + payload


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

    def __init__(self, protocol: Protocol, keepalive: int) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._protocol = protocol
        self._keepalive = keepalive
        self._transport: asyncio.Transport | None = None
        self._socket: socket.socket | None = None
        self._buffer = bytearray()
        self.connack: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[LinkError | None] = loop.create_future()
        self._receive_maximum = 65535
        self._maximum_packet = 268_435_455  # the largest MQTT can express
        self._in_flight: dict[int, asyncio.Future[None]] = {}
        self._queued: deque[tuple[int, bytes]] = deque()  # (mid, packet) beyond the maximum
        self._next_mid = 1
        self._last_sent = loop.time()
        self._last_heard = loop.time()
        self._ping_timer: asyncio.TimerHandle | None = None

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
    ) -> MqttLink:
        loop = asyncio.get_running_loop()
        link: MqttLink | None = None
        try:
            async with asyncio.timeout(connect_timeout):
                _, link = await loop.create_connection(lambda: cls(protocol, keepalive), host, port)
                link._send(
                    connect_packet(
                        protocol,
                        client_id or f"coap-bridge-{secrets.token_hex(6)}",
                        keepalive,
                        username,
                        password,
                    )
                )
                await link.connack
        except TimeoutError as exc:
            if link is not None:
                link.close()
            raise LinkError(f"no CONNACK from {host}:{port} within {connect_timeout:g} s") from exc
        except OSError as exc:
            raise LinkError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
        except LinkError:
            if link is not None:
                link.close()
            raise
        link._schedule_ping()
        return link

    # --- publishing

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def publish_many(
        self, messages: Sequence[tuple[str, bytes, bytes | None]]
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
            packet = publish_packet(encoded, mid, payload, block)
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

    def _take_mid(self) -> int:
        for _ in range(65535):
            mid = self._next_mid
            self._next_mid = mid % 65535 + 1
            if mid not in self._in_flight:
                return mid
        raise LinkError("65535 messages in flight: no packet identifier free")

    def _send(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(data)
        self._last_sent = self._loop.time()

    def close(self) -> None:
        """DISCONNECT and close; what is still in flight fails."""
        if self._transport is not None and not self._transport.is_closing():
            self._send(bytes((_DISCONNECT, 0)))
            self._transport.close()
        self._end(None)

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
        self._end(LinkError(f"connection to the broker lost: {exc or 'closed by the broker'}"))

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
        elif kind == _CONNACK:
            self._connack(body)
        elif kind == _DISCONNECT:
            reason = body[0] if body else 0
            raise LinkError(f"broker disconnected: reason code 0x{reason:02x}")
        # PINGRESP and anything else (nothing is subscribed): hearing it is enough.

    def _connack(self, body: bytes) -> None:
        if self.connack.done() or len(body) < 2:
            raise LinkError("unexpected or malformed CONNACK")
        code = body[1]
        if code != 0:
            reason = _CONNACK_REASONS.get(code, f"code 0x{code:02x}")
            raise LinkError(f"broker refused the connection: {reason}")
        if self._protocol == "5":
            self._connack_properties(body, 2)
        self.connack.set_result(None)

    def _connack_properties(self, body: bytes, at: int) -> None:
        found = _read_varint(body, at)
        if found is None:
            return
        size, at = found
        end = at + size
        while at < end:
            prop = body[at]
            at += 1
            if prop in _FIXED_SIZE:
                width = _FIXED_SIZE[prop]
                value = int.from_bytes(body[at : at + width], "big")
                at += width
                if prop == _RECEIVE_MAXIMUM and value > 0:
                    self._receive_maximum = value
                elif prop == _MAXIMUM_PACKET_SIZE and value > 0:
                    self._maximum_packet = value
                elif prop == _SERVER_KEEP_ALIVE:
                    self._keepalive = value
            elif prop in _STRING_OR_BINARY:
                at += 2 + int.from_bytes(body[at : at + 2], "big")
            elif prop == _STRING_PAIR:
                for _ in range(2):
                    at += 2 + int.from_bytes(body[at : at + 2], "big")
            elif prop == _VARINT_PROPERTY:
                skipped = _read_varint(body, at)
                if skipped is None:
                    raise LinkError("malformed CONNACK property")
                at = skipped[1]
            else:
                raise LinkError(f"unknown CONNACK property 0x{prop:02x}")

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
