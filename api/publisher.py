"""MQTT publishing for ``/ingest``: one long-lived connection, QoS 1, answer after PUBACK.

The device is told "accepted" (204 → 2.04) only once the broker acknowledged the message
(docs/CONTRACT.md §9), so :meth:`MqttPublisher.publish` returns after the PUBACK and raises
:class:`api.errors.BrokerUnavailable` otherwise; the route turns that into 503 → 5.03 and the
device retries. The wire is :mod:`api.mqtt_link` (why not aiomqtt/paho: see there); its
errors never leave this module.

A background task owns the connection and reconnects with capped backoff. A publish that finds
no connection asks that task for an immediate attempt and waits briefly for it, so the first
message after a broker restart already gets through instead of hitting the backoff delay.

The same connection receives commands (issue 15): :meth:`MqttPublisher.subscribe` registers a
topic filter with an ``on_message(topic, payload, properties)`` hook; every filter is
subscribed again after each reconnect (a broker restarted without persistence forgot them).
Under MQTT 5 the session persists for ``session_expiry`` seconds (Clean Start 0, one client id
per publisher), so a QoS 1 command whose PUBACK had not gone out when the connection or the
broker went away is sent again (MQTT 5 §4.4; across a broker restart only if the broker
persists sessions). Under MQTT 3.1.1 the session is clean: such a message may be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal, Protocol

from api.errors import BrokerUnavailable
from api.mqtt_link import (
    LinkError,
    Message,
    MqttLink,
    PublishRefused,
    SubscribeRefused,
    check_filter,
    topic_matches,
    varint,
)
from api.settings import ApiSettings

log = logging.getLogger(__name__)

_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 2.0
DEFAULT_SESSION_EXPIRY = 300
"""Seconds the broker keeps our MQTT 5 session (subscriptions, unacknowledged commands) after
the connection drops: long enough for a broker restart or a network blip."""

OnMessage = Callable[[str, bytes, dict[str, object]], Awaitable[None]]
"""``on_message(topic, payload, properties)``: ``properties`` always holds ``qos``, ``retain``,
``duplicate``; ``content_type`` and ``message_expiry_interval`` (seconds left) when the MQTT 5
PUBLISH carried them. Returning means "taken" (the PUBACK goes out); raising means "not taken":
the connection is dropped so the broker sends it again (see the module docstring)."""


def message_properties(message: Message) -> dict[str, object]:
    """The ``properties`` argument of :data:`OnMessage` for one received message."""
    properties: dict[str, object] = {
        "qos": message.qos,
        "retain": message.retain,
        "duplicate": message.duplicate,
    }
    if message.content_type is not None:
        properties["content_type"] = message.content_type
    if message.expiry is not None:
        properties["message_expiry_interval"] = message.expiry
    if message.utf8:
        properties["payload_format_indicator"] = 1
    return properties


class Publisher(Protocol):
    """Where ``/ingest`` sends messages. Tests may plug in another implementation."""

    @property
    def connected(self) -> bool: ...

    async def publish(
        self, topic: str, payload: bytes, properties: Mapping[str, str], *, retain: bool = False
    ) -> None:
        """Publish with QoS 1; return after PUBACK or raise ``BrokerUnavailable``. ``retain``:
        the broker keeps it for later subscribers (a device's status, api/presence.py)."""
        ...

    async def publish_many(
        self,
        messages: Sequence[tuple[str, bytes, Mapping[str, str]]],
        within: float | None = None,
    ) -> list[BrokerUnavailable | None]:
        """Publish each with QoS 1; ``None`` where a PUBACK came, else the error, in order.

        ``within``: seconds the whole call may take (waiting for a connection included), on
        top of the publisher's own limits; what has no PUBACK by then is ``BrokerUnavailable``.
        """
        ...

    async def close(self) -> None: ...


def pack_user_properties(properties: Mapping[str, str]) -> bytes:
    """A PUBLISH property block holding only User Properties (MQTT 5 §3.3.2.3.7, id 0x26)."""
    body = bytearray()
    for name, value in properties.items():
        name_bytes, value_bytes = name.encode(), value.encode()
        body.append(0x26)
        body += len(name_bytes).to_bytes(2, "big") + name_bytes
        body += len(value_bytes).to_bytes(2, "big") + value_bytes
    return varint(len(body)) + bytes(body)


class MqttPublisher:
    """:class:`Publisher` on one :class:`~api.mqtt_link.MqttLink` with a reconnect loop."""

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
        keepalive: int = 60,
        min_backoff: float = _MIN_BACKOFF,
        max_backoff: float = _MAX_BACKOFF,
        client_id: str | None = None,
        session_expiry: int = DEFAULT_SESSION_EXPIRY,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._host = host
        self._tls = tls
        self._port = port
        self._username = username
        self._password = password
        self._protocol = protocol
        self._publish_timeout = publish_timeout
        self._reconnect_wait = reconnect_wait
        self._keepalive = keepalive
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._link: MqttLink | None = None
        self._up = asyncio.Event()
        self._wake = asyncio.Event()
        self._attempted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One id for every connection of this publisher, so a reconnect resumes its session;
        # a generated one is never resumed by anyone else, so its session ends at close().
        self._own_client_id = client_id is None
        self._client_id = client_id or f"coap-bridge-{secrets.token_hex(6)}"
        self._session_expiry = session_expiry if protocol == "5" else 0
        self._subscriptions: dict[str, OnMessage] = {}

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
            client_id=settings.mqtt_client_id,
            tls=settings.mqtt_tls(),
        )

    @property
    def connected(self) -> bool:
        return self._link is not None

    async def start(self) -> None:
        """Start the connection loop and wait (bounded) for its first attempt.

        Never fails: a broker that is down at start is retried in the background and ``/ingest``
        answers 503 meanwhile.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mqtt-publisher")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), self._reconnect_wait)

    async def subscribe(self, topic_filter: str, on_message: OnMessage) -> None:
        """Subscribe to ``topic_filter`` at QoS 1, now if connected and after every reconnect;
        messages on it go to ``on_message``. Returns once the broker granted it, or at once when
        disconnected (the next connection subscribes). ValueError for a malformed filter; a
        refusal by the broker is logged, not raised (it is tried again at every reconnect)."""
        check_filter(topic_filter)
        self._subscriptions[topic_filter] = on_message
        link = self._link
        if link is not None:
            await self._subscribe(link, [topic_filter])

    async def _subscribe(self, link: MqttLink, filters: list[str]) -> None:
        try:
            granted = await asyncio.wait_for(link.subscribe(filters), self._publish_timeout)
        except TimeoutError:
            # A broker that does not answer SUBACK: start over on a new connection.
            link.abort(f"no SUBACK within {self._publish_timeout:g} s")
            return
        except SubscribeRefused as exc:
            log.error("mqtt subscription refused filters=%s: %s", filters, exc)
            return
        except LinkError:
            return  # the connection ended first: the next one subscribes again
        for topic_filter, qos in zip(filters, granted, strict=False):
            if qos < 1:
                log.warning(
                    "mqtt subscription granted QoS 0 only filter=%s: messages may be lost",
                    topic_filter,
                )
        log.info("mqtt subscribed filters=%s", filters)

    async def _dispatch(self, message: Message) -> None:
        for topic_filter, on_message in list(self._subscriptions.items()):
            if topic_matches(topic_filter, message.topic):
                await on_message(message.topic, message.payload, message_properties(message))
                return
        # A message for none of our filters (an old session's subscription): taken, dropped.
        log.debug("mqtt message on an unsubscribed topic=%s dropped", message.topic)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        backoff = self._min_backoff
        down_reported = False
        while True:
            # Cleared before the attempt, so a wake-up that arrives during it is not lost.
            self._wake.clear()
            try:
                link = await MqttLink.open(
                    self._host,
                    self._port,
                    protocol=self._protocol,
                    username=self._username,
                    password=self._password,
                    keepalive=self._keepalive,
                    connect_timeout=self._publish_timeout,
                    client_id=self._client_id,
                    on_message=self._dispatch,
                    clean_start=not self._session_expiry,
                    session_expiry=self._session_expiry,
                    tls=self._tls,
                )
            except LinkError as exc:
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
            else:
                self._link = link
                self._up.set()
                self._attempted.set()
                backoff = self._min_backoff
                down_reported = False
                log.info(
                    "mqtt connected host=%s port=%d tls=%s",
                    self._host,
                    self._port,
                    "on" if self._tls is not None else "off",
                )
                try:
                    if self._subscriptions:
                        await self._subscribe(link, list(self._subscriptions))
                    reason = await asyncio.shield(link.lost)
                finally:
                    self._link = None
                    self._up.clear()
                    link.close(end_session=self._own_client_id)
                    await link.wait_closed()
                log.warning(
                    "mqtt connection lost host=%s port=%d: %s", self._host, self._port, reason
                )
            self._attempted.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _connection(self, limit: float) -> MqttLink:
        link = self._link
        if link is not None:
            return link
        if self._task is None:
            raise BrokerUnavailable("MQTT publisher is not running")
        # Disconnected: skip the backoff and try once now, but only briefly, so the device
        # gets its 5.03 in time to retry.
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), min(self._reconnect_wait, limit))
        link = self._link
        if link is None:
            raise BrokerUnavailable("MQTT broker is not connected")
        return link

    def _properties(self, properties: Mapping[str, str]) -> bytes | None:
        if self._protocol != "5":
            return None
        return pack_user_properties(properties) if properties else b"\x00"

    async def publish(
        self, topic: str, payload: bytes, properties: Mapping[str, str], *, retain: bool = False
    ) -> None:
        [outcome] = await self.publish_many([(topic, payload, properties)], retain=retain)
        if outcome is not None:
            raise outcome

    async def publish_many(
        self,
        messages: Sequence[tuple[str, bytes, Mapping[str, str]]],
        within: float | None = None,
        retain: bool = False,
    ) -> list[BrokerUnavailable | None]:
        """Every PUBLISH goes out at once (as far as the broker's Receive Maximum allows) and
        one wait covers all the PUBACKs; a lost connection ends the wait at once."""
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        started = loop.time()
        limit = self._publish_timeout if within is None else min(within, self._publish_timeout)
        try:
            link = await self._connection(limit)
        except BrokerUnavailable as exc:
            return [exc] * len(messages)
        wait = max(0.0, limit - (loop.time() - started))
        futures = link.publish_many(
            [(topic, payload, self._properties(props)) for topic, payload, props in messages],
            retain,
        )
        waiting = [future for future in futures if not future.done()]
        if waiting:
            all_settled = asyncio.get_running_loop().create_future()
            left = len(waiting)

            def settled(future: asyncio.Future[None]) -> None:
                nonlocal left
                if not future.cancelled():
                    future.exception()  # retrieved here, even after we stopped waiting
                left -= 1
                if not left and not all_settled.done():
                    all_settled.set_result(None)

            for future in waiting:
                future.add_done_callback(settled)
            await asyncio.wait((all_settled,), timeout=wait)
        return [self._outcome(future, link, limit) for future in futures]

    def _outcome(
        self, future: asyncio.Future[None], link: MqttLink, limit: float
    ) -> BrokerUnavailable | None:
        if not future.done():
            return BrokerUnavailable(f"no PUBACK within {limit:g} s")
        failure = future.exception()
        if failure is None:
            return None
        if link.lost.done() and not isinstance(failure, PublishRefused | ValueError):
            return BrokerUnavailable("MQTT connection lost before PUBACK")
        return BrokerUnavailable(f"MQTT publish failed: {failure}")
