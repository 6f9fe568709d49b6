"""Device presence on the API side (docs/API.md, "Presence"): the routes note each message
that counts, and a watcher publishes every online/offline transition to MQTT, retained, so an
application that subscribes late still finds each device's current status.

:class:`PresenceWatcher` holds the store (stores/presence.py) and the one queue of status
messages of this replica. ``note()`` is called on a device's request path: one store call;
when it turned the device online, the status message is queued, never awaited there (a broker
that is down must not fail or delay the device's request). A background task publishes the
queue in order and, every ``interval`` seconds, asks the store which devices went silent past
their time; the store hands each such device to one replica only, so each offline message is
published once across replicas.

Status message: topic ``status_topic`` with ``{device}`` (ApiSettings), QoS 1, retained
(MQTT 5 §3.3.1.3), payload ``{"device": <id>, "status": "online"|"offline", "at": <unix ms>}``
and the user property ``device``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

from fastapi import Depends, Request

from api.errors import BrokerUnavailable, StoreUnavailable
from api.publisher import Publisher
from stores.presence import Presence, PresenceStore
from stores.redis import REDIS_ERRORS

log = logging.getLogger(__name__)

EXPIRE_INTERVAL = 0.5
"""Seconds between two sweeps for devices that went silent: an offline message follows the
end of a device's time within about this long."""
MAX_QUEUED = 10_000
"""Status messages this replica holds while the broker is away; beyond, the oldest go (the
presence itself stays right in the store and the API)."""


def status_topic(template: str, device: str) -> str:
    return template.replace("{device}", device)


def status_payload(device: str, status: Literal["online", "offline"], at: float) -> bytes:
    body = {"device": device, "status": status, "at": int(at * 1000)}
    return json.dumps(body, separators=(",", ":")).encode()


class PresenceWatcher:
    """Notes messages, sweeps expiries and publishes the transitions (see the module doc).

    ``publisher``: a callable returning the app's publisher (it is built by the lifespan, after
    this object). ``clock``: unix seconds; tests move it instead of sleeping through a
    lifetime. The routes of the signed-session profile read the same clock for sessions."""

    def __init__(
        self,
        store: PresenceStore,
        publisher: Callable[[], Publisher | None],
        topic_template: str,
        *,
        interval: float = EXPIRE_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.clock = clock
        self._publisher = publisher
        self._template = topic_template
        self._interval = interval
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(MAX_QUEUED)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def note(self, device: str, lifetime: float, *, extend: bool = True) -> None:
        """A message from ``device`` that keeps it online ``lifetime`` seconds (``extend=False``:
        only if it is offline). Never raises: presence is not worth failing a device for."""
        now = self.clock()
        try:
            turned = await self.store.seen(device, lifetime, extend=extend, now=now)
        except REDIS_ERRORS as exc:
            log.warning("presence of %s not noted: %s", device, exc, extra={"device": device})
            return
        if turned:
            self._enqueue(device, "online", now)

    async def get_many(self, devices: Sequence[str]) -> list[Presence]:
        """Each device's presence now; an unreachable store is a 503."""
        try:
            return await self.store.get_many(devices, now=self.clock())
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"presence store unavailable: {exc}") from exc

    async def get(self, device: str) -> Presence:
        [presence] = await self.get_many([device])
        return presence

    async def forget(self, device: str) -> None:
        """The device was deleted: no presence, no offline message later, and its retained
        status is cleared on the broker (an empty retained message, MQTT 5 §3.3.1.3), so a
        subscriber does not learn of a device that no longer exists."""
        try:
            await self.store.forget(device)
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"presence store unavailable: {exc}") from exc
        self._put((status_topic(self._template, device), b""))

    def _enqueue(self, device: str, status: Literal["online", "offline"], at: float) -> None:
        self._put((status_topic(self._template, device), status_payload(device, status, at)))

    def _put(self, message: tuple[str, bytes]) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            log.warning("status queue full: the oldest status message was dropped")
        self._queue.put_nowait(message)

    async def sweep(self) -> list[str]:
        """One expiry sweep: queue "offline" for each device this replica was handed."""
        now = self.clock()
        try:
            gone = await self.store.expire(now=now)
        except REDIS_ERRORS as exc:
            log.warning("presence sweep failed: %s", exc)
            return []
        for device in gone:
            self._enqueue(device, "offline", now)
        return gone

    async def start(self) -> None:
        self._closing = False
        self._tasks = [
            asyncio.create_task(self._sweeping(), name="presence-sweep"),
            asyncio.create_task(self._publishing(), name="presence-publish"),
        ]

    async def _sweeping(self) -> None:
        # Checked as well as cancelled: a cancellation that lands while a store call completes
        # can be swallowed on the way (asyncio.wait_for in Python 3.11, client libraries), and
        # the loop would then run on while close() waits for it.
        while not self._closing:
            await self.sweep()
            await asyncio.sleep(self._interval)

    async def _publishing(self) -> None:
        while True:
            topic, payload = await self._queue.get()
            try:
                await self._publish(topic, payload)
            finally:
                self._queue.task_done()

    async def _publish(self, topic: str, payload: bytes) -> None:
        publisher = self._publisher()
        if publisher is None:
            return
        properties = {"device": json.loads(payload)["device"]} if payload else {}
        try:
            await publisher.publish(topic, payload, properties, retain=True)
        except BrokerUnavailable as exc:
            log.warning("status %r on %s not published: %s", payload, topic, exc)
        except Exception:  # a publisher of a test, or a bug: never stop publishing the rest
            log.exception("status %r on %s not published", payload, topic)

    async def close(self, drain: float = 1.0) -> None:
        """Stop; what is queued gets ``drain`` seconds to be published first."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), drain)
        self._closing = True
        while pending := [task for task in self._tasks if not task.done()]:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.store.close()


async def get_presence(request: Request) -> PresenceWatcher:
    presence: PresenceWatcher = request.app.state.presence
    return presence


PresenceDep = Annotated[PresenceWatcher, Depends(get_presence)]
