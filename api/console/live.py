"""The console's live view: messages as the broker delivers them, to a bounded set of viewers.

Source: ONE subscription on the MQTT broker per API process, made through the publisher's own
connection (api/publisher.py ``subscribe``, api/mqtt_link.py), to the telemetry topic template
with each ``{iccid}``/``{device}`` level as ``+`` (default ``devices/+/messages``). So a viewer
sees what every replica published, as an MQTT application would. It is made when the first
viewer connects and kept for the life of the process (the link has no UNSUBSCRIBE); while no
one watches, messages are taken (PUBACK) and dropped here. Messages a device sent to a topic of
its own (``?t=``) do not match the filter and are not shown.

A filter that could match the command topic is refused (the live view is then unavailable):
the link hands a message to the first filter that matches, and the broker would deliver a
command twice to this process.

Bounds: at most :data:`MAX_VIEWERS` streams per process (more: 503 with a message saying so);
each viewer has a queue of :data:`QUEUE_SIZE` events, the oldest dropped when a slow reader
falls behind, and every event carries the count dropped so far, which the page shows. Payloads
are shown up to :data:`PAYLOAD_SHOWN` bytes. The handler never raises: an exception would end
the MQTT link that ``/ingest`` shares.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from api.mqtt_link import check_filter
from api.settings import ApiSettings

log = logging.getLogger(__name__)

MAX_VIEWERS = 8
QUEUE_SIZE = 256
PAYLOAD_SHOWN = 1024
KEEPALIVE = 15.0
_PLACEHOLDERS = ("{iccid}", "{device}")


class LiveUnavailable(Exception):
    """The live view cannot be served (no MQTT link, a filter that overlaps, too many)."""


def telemetry_filter(template: str) -> tuple[str, int | None]:
    """The subscription for a topic template, and the level that names the device (or None).
    ValueError when a placeholder is not a whole level (``+`` must be one, MQTT 5 §4.7.1.2)."""
    levels = template.split("/")
    device_level: int | None = None
    for index, level in enumerate(levels):
        if level in _PLACEHOLDERS:
            levels[index] = "+"
            device_level = index if device_level is None else device_level
        elif "{" in level:
            raise ValueError(f"topic_template {template!r}: a placeholder is not a whole level")
    topic_filter = "/".join(levels)
    check_filter(topic_filter)
    return topic_filter, device_level


def filters_overlap(first: str, second: str) -> bool:
    """Whether some topic matches both filters (only ``+`` wildcards, no ``#``)."""
    a, b = first.split("/"), second.split("/")
    return len(a) == len(b) and all(x == y or "+" in (x, y) for x, y in zip(a, b, strict=True))


def event_of(topic: str, payload: bytes, device_level: int | None, at: float) -> dict[str, Any]:
    """What a viewer is told of one message: text when it is UTF-8, else hex; cut short."""
    shown = payload[:PAYLOAD_SHOWN]
    try:
        text, encoding = shown.decode(), "text"
    except UnicodeDecodeError:
        text, encoding = shown.hex(), "hex"
    levels = topic.split("/")
    device = levels[device_level] if device_level is not None and device_level < len(levels) else ""
    return {
        "topic": topic,
        "device": device,
        "payload": text,
        "encoding": encoding,
        "size": len(payload),
        "truncated": len(payload) > PAYLOAD_SHOWN,
        "at": int(at * 1000),
    }


@dataclass(eq=False)
class Viewer:
    """One stream's mailbox: the newest ``size`` events; ``dropped`` counts the rest."""

    size: int
    events: deque[dict[str, Any]] = field(default_factory=deque)
    dropped: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, event: dict[str, Any]) -> None:
        if len(self.events) >= self.size:
            self.events.popleft()
            self.dropped += 1
        self.events.append(event)
        self.ready.set()


class LiveHub:
    """The subscription and the viewers of one API process (see the module docstring)."""

    def __init__(
        self,
        settings: ApiSettings,
        *,
        max_viewers: int = MAX_VIEWERS,
        queue_size: int = QUEUE_SIZE,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self.max_viewers = max_viewers
        self.queue_size = queue_size
        self.keepalive = keepalive
        self.viewers: set[Viewer] = set()
        self.received = 0
        self._subscribed = False
        self._lock = asyncio.Lock()
        self.problem: str | None = None
        try:
            self.topic_filter, self._device_level = telemetry_filter(settings.topic_template)
        except ValueError as exc:
            self.topic_filter, self._device_level = "", None
            self.problem = str(exc)
            return
        command_filter = settings.command_filter
        if filters_overlap(self.topic_filter, command_filter):
            self.problem = (
                f"the telemetry filter {self.topic_filter} overlaps the command filter "
                f"{command_filter}: the live view is off (docs/OPERATIONS.md, Console)"
            )

    async def ensure_subscribed(self, publisher: object) -> None:
        """Subscribe once, through the publisher's connection; LiveUnavailable if it cannot."""
        if self.problem is not None:
            raise LiveUnavailable(self.problem)
        if self._subscribed:
            return
        subscribe = getattr(publisher, "subscribe", None)
        if subscribe is None:
            raise LiveUnavailable("the live view needs the API's MQTT connection")
        async with self._lock:
            if not self._subscribed:
                await subscribe(self.topic_filter, self.on_message)
                self._subscribed = True
                log.info("console live view subscribed filter=%s", self.topic_filter)

    async def on_message(
        self, topic: str, payload: bytes, properties: Mapping[str, object]
    ) -> None:
        try:
            self.received += 1
            if not self.viewers:
                return
            event = event_of(topic, payload, self._device_level, time.time())
            for viewer in self.viewers:
                viewer.put(event)
        except Exception:  # never end the link /ingest shares
            log.exception("console live view: message on %s not shown", topic[:200])

    def join(self) -> Viewer:
        if len(self.viewers) >= self.max_viewers:
            raise LiveUnavailable(
                f"{self.max_viewers} live views are open on this API process, the most it "
                "serves: close one and try again"
            )
        viewer = Viewer(self.queue_size)
        self.viewers.add(viewer)
        return viewer

    def leave(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)

    async def stream(self, viewer: Viewer) -> AsyncIterator[bytes]:
        """The SSE body (https://html.spec.whatwg.org/multipage/server-sent-events.html):
        ``event: message`` with one JSON object per message (``dropped``: the count so far)."""
        try:
            hello = {"filter": self.topic_filter, "queue": self.queue_size}
            yield f"retry: 2000\nevent: hello\ndata: {json.dumps(hello)}\n\n".encode()
            while True:
                try:
                    await asyncio.wait_for(viewer.ready.wait(), self.keepalive)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                viewer.ready.clear()
                chunk = bytearray()
                while viewer.events:
                    event = {**viewer.events.popleft(), "dropped": viewer.dropped}
                    # json.dumps escapes line breaks, so one event is one data line.
                    chunk += f"event: message\ndata: {json.dumps(event)}\n\n".encode()
                if chunk:
                    yield bytes(chunk)
        finally:
            self.leave(viewer)
