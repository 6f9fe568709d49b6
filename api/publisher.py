"""MQTT publishing for ``/ingest``: one long-lived connection, QoS 1, answer after PUBACK.

SPEC §8: the device is told "accepted" (204 → 2.04) only once the broker acknowledged the
message, so :meth:`MqttPublisher.publish` returns after the PUBACK and raises
:class:`api.errors.BrokerUnavailable` otherwise; the route turns that into 503 → 5.03 and the
device retries. aiomqtt exceptions never leave this module.

A background task owns the connection and reconnects with capped backoff. A publish that finds
no connection asks that task for an immediate attempt and waits briefly for it, so the first
message after a broker restart already gets through instead of hitting the backoff delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from api.errors import BrokerUnavailable
from api.settings import ApiSettings

log = logging.getLogger(__name__)
# aiomqtt and paho log through this one; kept separate so operators can silence it alone.
_library_log = logging.getLogger(f"{__name__}.aiomqtt")

_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 2.0


class Publisher(Protocol):
    """Where ``/ingest`` sends messages. Tests may plug in another implementation."""

    @property
    def connected(self) -> bool: ...

    async def publish(self, topic: str, payload: bytes, properties: Mapping[str, str]) -> None:
        """Publish with QoS 1; return after PUBACK or raise ``BrokerUnavailable``."""
        ...

    async def publish_many(
        self, messages: Sequence[tuple[str, bytes, Mapping[str, str]]]
    ) -> list[BrokerUnavailable | None]:
        """Publish each with QoS 1; ``None`` where a PUBACK came, else the error, in order."""
        ...

    async def close(self) -> None: ...


def _varint(value: int) -> bytes:
    """MQTT Variable Byte Integer (MQTT 5 §1.5.5)."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pack_user_properties(properties: Mapping[str, str]) -> bytes:
    """A PUBLISH property block holding only User Properties (MQTT 5 §3.3.2.3.7, id 0x26)."""
    body = bytearray()
    for name, value in properties.items():
        name_bytes, value_bytes = name.encode(), value.encode()
        body.append(0x26)
        body += len(name_bytes).to_bytes(2, "big") + name_bytes
        body += len(value_bytes).to_bytes(2, "big") + value_bytes
    return _varint(len(body)) + bytes(body)


class PackedUserProperties(Properties):
    """User Properties packed by us, once, for paho.

    paho's own ``Properties`` builds its lookup tables in ``__init__`` and walks every property
    name in ``pack()``: tens of microseconds per message on the hot path. paho only ever calls
    ``pack()`` on a PUBLISH's properties (and ``str()`` in debug logs), so this subclass skips
    the base initialiser and answers ``pack()`` with bytes made in :func:`pack_user_properties`.
    """

    def __init__(self, properties: Mapping[str, str]) -> None:
        # Properties.__setattr__ only admits MQTT property names: go around it.
        object.__setattr__(self, "_packed", pack_user_properties(properties))
        object.__setattr__(self, "_items", tuple(properties.items()))

    def pack(self) -> bytes:
        packed: bytes = self.__dict__["_packed"]
        return packed

    def __str__(self) -> str:
        return f"UserProperty={list(self.__dict__['_items'])!r}"


@dataclass(eq=False)
class _Connection:
    client: aiomqtt.Client
    tuned: bool = False
    lost: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class MqttPublisher:
    """:class:`Publisher` on one aiomqtt connection with a reconnect loop."""

    def __init__(
        self,
        *,
        host: str,
        port: int = 1883,
        username: str | None = None,
        password: str | None = None,
        protocol: Literal["5", "3.1.1"] = "5",
        publish_timeout: float = 5.0,
        reconnect_wait: float = 1.5,
        max_inflight: int = 1000,
        min_backoff: float = _MIN_BACKOFF,
        max_backoff: float = _MAX_BACKOFF,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._protocol = protocol
        self._publish_timeout = publish_timeout
        self._reconnect_wait = reconnect_wait
        self._max_inflight = max_inflight
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._conn: _Connection | None = None
        self._up = asyncio.Event()
        self._wake = asyncio.Event()
        self._attempted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> MqttPublisher:
        endpoint = settings.mqtt_endpoint
        return cls(
            host=endpoint.host,
            port=endpoint.port,
            username=endpoint.username,
            password=endpoint.password,
            protocol=settings.mqtt_protocol,
            publish_timeout=settings.mqtt_publish_timeout,
        )

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def start(self) -> None:
        """Start the connection loop and wait (bounded) for its first attempt.

        Never fails: a broker that is down at start is retried in the background and ``/ingest``
        answers 503 meanwhile.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mqtt-publisher")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), self._reconnect_wait)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _new_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=self._username,
            password=self._password,
            protocol=(
                aiomqtt.ProtocolVersion.V5
                if self._protocol == "5"
                else aiomqtt.ProtocolVersion.V311
            ),
            logger=_library_log,
            timeout=self._publish_timeout,
            # paho's default of 20 in-flight QoS 1 messages would serialise concurrent ingests.
            max_inflight_messages=self._max_inflight,
            # paho leaves Nagle on: each small PUBLISH then waits for the TCP ACK of the one
            # before, which the broker delays (delayed ACK), ~1 ms per message in a batch.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        # aiomqtt logs a warning for every publish beyond this many pending ones (FINDINGS:
        # "a warning line for every publish once more than 10 are pending").
        client.pending_calls_threshold = self._max_inflight
        return client

    @property
    def socket_tuned(self) -> bool:
        """Whether the live connection runs with :meth:`_tune_socket`'s read/write hooks."""
        conn = self._conn
        return conn is not None and conn.tuned

    def _tune_socket(self, client: aiomqtt.Client) -> bool:
        """Two fixes for small-packet TCP on the broker link, measured on this workload.

        Reads: TCP_QUICKACK before each read. A broker with Nagle on (Mosquitto's default,
        ``set_tcp_nodelay false``) holds PUBACK n+1 back until PUBACK n is acknowledged, and
        Linux delays that ACK by up to 40 ms: 64 publishes took 51 ms instead of 8 ms.

        Writes: MSG_MORE while paho has more packets queued. paho sends every PUBLISH with its
        own ``send()``, and on loopback each send runs the receiver's network path inline (~40 µs
        here); with MSG_MORE a batch of publishes leaves in a few segments.

        Both wrap paho's socket read/write methods, which are internals of aiomqtt/paho; if
        they change, this logs once and leaves the connection as it is.
        """
        quickack: int | None = getattr(socket, "TCP_QUICKACK", None)
        more: int | None = getattr(socket, "MSG_MORE", None)
        paho = getattr(client, "_client", None)
        read: Any = getattr(paho, "_sock_recv", None)
        queue: Any = getattr(paho, "_out_packet", None)
        sock: Any = paho.socket() if paho is not None and hasattr(paho, "socket") else None
        if (
            quickack is None
            or more is None
            or read is None
            or queue is None
            or not isinstance(sock, socket.socket)
            # An SSLSocket refuses send flags; TLS to the broker keeps paho's own writes.
            or isinstance(sock, ssl.SSLSocket)
        ):
            log.warning(
                "cannot tune the MQTT socket (paho internals changed?): set "
                "'set_tcp_nodelay true' on the broker to avoid 40 ms PUBACK stalls"
            )
            return False

        def recv_with_quickack(bufsize: int) -> bytes:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            data: bytes = read(bufsize)
            return data

        def send_coalescing(data: bytes) -> int:
            # paho has already taken this packet off its queue: anything left follows at once.
            sent: int = sock.send(data, more if queue else 0)
            return sent

        paho._sock_recv = recv_with_quickack  # type: ignore[union-attr]
        paho._sock_send = send_coalescing  # type: ignore[union-attr]
        return True

    async def _run(self) -> None:
        backoff = self._min_backoff
        down_reported = False
        while True:
            # Cleared before the attempt, so a wake-up that arrives during it is not lost.
            self._wake.clear()
            client = self._new_client()
            try:
                async with client:
                    conn = _Connection(client, tuned=self._tune_socket(client))
                    self._conn = conn
                    self._up.set()
                    self._attempted.set()
                    backoff = self._min_backoff
                    down_reported = False
                    log.info("mqtt connected host=%s port=%d", self._host, self._port)
                    try:
                        # Nothing is subscribed; the iterator only ends when the link drops.
                        async for _ in client.messages:
                            pass
                    finally:
                        self._conn = None
                        self._up.clear()
                        if not conn.lost.done():
                            conn.lost.set_result(None)
            except aiomqtt.MqttError as exc:
                # One warning per outage, not one per attempt every couple of seconds.
                level = logging.DEBUG if down_reported else logging.WARNING
                log.log(
                    level, "mqtt unavailable host=%s port=%d error=%s", self._host, self._port, exc
                )
                down_reported = True
            except Exception:
                # This task is the only thing that ever reconnects: an unexpected error must
                # not end it, or the publisher would stay down until the process restarts.
                log.exception("mqtt connection loop error host=%s port=%d", self._host, self._port)
            self._attempted.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None:
            return conn
        if self._task is None:
            raise BrokerUnavailable("MQTT publisher is not running")
        # Disconnected: skip the backoff and try once now, but only briefly, so the device
        # gets its 5.03 in time to retry.
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), self._reconnect_wait)
        conn = self._conn
        if conn is None:
            raise BrokerUnavailable("MQTT broker is not connected")
        return conn

    def _properties(self, properties: Mapping[str, str]) -> Properties | None:
        if self._protocol != "5" or not properties:
            return None
        return PackedUserProperties(properties)

    async def publish(self, topic: str, payload: bytes, properties: Mapping[str, str]) -> None:
        conn = await self._connection()
        # The PUBACK wait runs as its own task so it can be raced against the connection
        # dropping: a lost link fails the request now instead of after the full timeout.
        sending = asyncio.ensure_future(
            conn.client.publish(
                topic,
                payload,
                qos=1,
                properties=self._properties(properties),
                timeout=math.inf,
            )
        )
        try:
            done, _ = await asyncio.wait(
                (sending, conn.lost),
                timeout=self._publish_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not sending.done():
                sending.cancel()
        if sending not in done:
            if conn.lost.done():
                raise BrokerUnavailable("MQTT connection lost before PUBACK")
            raise BrokerUnavailable(f"no PUBACK within {self._publish_timeout:g} s")
        try:
            sending.result()
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"MQTT publish failed: {exc}") from exc

    async def publish_many(
        self, messages: Sequence[tuple[str, bytes, Mapping[str, str]]]
    ) -> list[BrokerUnavailable | None]:
        """The batch form of :meth:`publish`: every PUBLISH goes out at once and one wait covers
        all the PUBACKs.

        aiomqtt's ``publish()`` costs a task, an ``asyncio.Event`` and a scan of every pending
        call per message (O(n²) for a batch). Here paho publishes directly and each PUBACK
        settles a slot of this batch (:class:`_BatchAcks`) through aiomqtt's own table of
        pending publishes, whose ``on_publish`` handler calls ``.set()`` on what it finds
        there. Those are aiomqtt internals: if they are missing, every message takes aiomqtt's
        public ``publish()`` instead (:meth:`_publish_each`).
        """
        if not messages:
            return []
        try:
            conn = await self._connection()
        except BrokerUnavailable as exc:
            return [exc] * len(messages)
        direct = _direct_handles(conn.client)
        if direct is None:
            return await self._publish_each(conn, messages)
        paho, table = direct
        acks = _BatchAcks(asyncio.get_running_loop(), len(messages))
        registered: list[tuple[int, _Ack]] = []
        try:
            for index, (topic, payload, props) in enumerate(messages):
                try:
                    info = paho.publish(topic, payload, 1, False, self._properties(props))
                except ValueError as exc:  # paho's own checks (topic, payload size)
                    acks.fail(index, BrokerUnavailable(f"MQTT publish failed: {exc}"))
                    continue
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    reason = mqtt.error_string(info.rc)
                    acks.fail(index, BrokerUnavailable(f"MQTT publish failed: {reason}"))
                elif info.is_published():
                    acks.set(index)
                else:
                    ack = _Ack(acks, index)
                    table[info.mid] = ack
                    registered.append((info.mid, ack))
            if not acks.complete.done():
                await asyncio.wait(
                    (acks.complete, conn.lost),
                    timeout=self._publish_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            for mid, ack in registered:
                if table.get(mid) is ack:
                    del table[mid]
        return acks.outcomes(self._unfinished(conn))

    def _unfinished(self, conn: _Connection) -> BrokerUnavailable:
        if conn.lost.done():
            return BrokerUnavailable("MQTT connection lost before PUBACK")
        return BrokerUnavailable(f"no PUBACK within {self._publish_timeout:g} s")

    async def _publish_each(
        self, conn: _Connection, messages: Sequence[tuple[str, bytes, Mapping[str, str]]]
    ) -> list[BrokerUnavailable | None]:
        """:meth:`publish_many` through aiomqtt's public ``publish()``, a task per message."""
        client = conn.client
        sendings = [
            asyncio.ensure_future(
                client.publish(
                    topic, payload, qos=1, properties=self._properties(props), timeout=math.inf
                )
            )
            for topic, payload, props in messages
        ]
        try:
            await asyncio.wait(
                (asyncio.gather(*sendings, return_exceptions=True), conn.lost),
                timeout=self._publish_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            unfinished = [sending for sending in sendings if not sending.done()]
            for sending in unfinished:
                sending.cancel()
            # A task is only cancelled once it has run again: wait, so every one has an outcome.
            await asyncio.gather(*unfinished, return_exceptions=True)
        results: list[BrokerUnavailable | None] = []
        for sending in sendings:
            if sending.cancelled():
                results.append(self._unfinished(conn))
            elif (failure := sending.exception()) is not None:
                results.append(BrokerUnavailable(f"MQTT publish failed: {failure}"))
            else:
                results.append(None)
        return results


def _direct_handles(client: aiomqtt.Client) -> tuple[mqtt.Client, dict[int, Any]] | None:
    """paho's client inside aiomqtt's and aiomqtt's table of pending publishes, if both are
    where aiomqtt 2.x keeps them."""
    paho = getattr(client, "_client", None)
    table = getattr(client, "_pending_publishes", None)
    if isinstance(paho, mqtt.Client) and isinstance(table, dict):
        return paho, table
    return None


_WAITING = object()


class _BatchAcks:
    """The outcomes of one :meth:`MqttPublisher.publish_many` call; ``complete`` resolves once
    every message is acknowledged or failed."""

    __slots__ = ("_left", "_outcomes", "complete")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.complete: asyncio.Future[None] = loop.create_future()
        self._outcomes: list[object] = [_WAITING] * count
        self._left = count

    def set(self, index: int) -> None:
        self._settle(index, None)

    def fail(self, index: int, error: BrokerUnavailable) -> None:
        self._settle(index, error)

    def _settle(self, index: int, outcome: BrokerUnavailable | None) -> None:
        if self._outcomes[index] is not _WAITING:
            return
        self._outcomes[index] = outcome
        self._left -= 1
        if not self._left and not self.complete.done():
            self.complete.set_result(None)

    def outcomes(self, unfinished: BrokerUnavailable) -> list[BrokerUnavailable | None]:
        """Each message's outcome, ``unfinished`` where no PUBACK came."""
        results: list[BrokerUnavailable | None] = []
        for outcome in self._outcomes:
            if outcome is _WAITING:
                results.append(unfinished)
            else:
                assert outcome is None or isinstance(outcome, BrokerUnavailable)
                results.append(outcome)
        return results


class _Ack:
    """What aiomqtt's ``on_publish`` finds under a message id: ``.set()`` on its PUBACK."""

    __slots__ = ("_acks", "_index")

    def __init__(self, acks: _BatchAcks, index: int) -> None:
        self._acks = acks
        self._index = index

    def set(self) -> None:
        self._acks.set(self._index)
