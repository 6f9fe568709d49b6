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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
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

    async def close(self) -> None: ...


@dataclass(eq=False)
class _Connection:
    client: aiomqtt.Client
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
        )
        # aiomqtt logs a warning for every publish beyond this many pending ones (FINDINGS:
        # "a warning line for every publish once more than 10 are pending").
        client.pending_calls_threshold = self._max_inflight
        return client

    async def _run(self) -> None:
        backoff = self._min_backoff
        down_reported = False
        while True:
            # Cleared before the attempt, so a wake-up that arrives during it is not lost.
            self._wake.clear()
            client = self._new_client()
            try:
                async with client:
                    conn = _Connection(client)
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
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = list(properties.items())
        return props

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
