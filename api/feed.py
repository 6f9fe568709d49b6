"""The change feed: how the origin tells the proxies that a resource changed (issue 15).

Each proxy replica holds one long-lived ``GET /observe/events`` (``Accept:
text/event-stream``, the proxy token) while it has Observe relations; the answer is a
never-ending Server-Sent Events stream (https://html.spec.whatwg.org/multipage/server-sent-events.html)
with one event per changed resource::

    event: changed
    data: /commands/8988280666000000001

and a comment line (``: keep-alive``) every ``feed_keepalive`` seconds, so that idle
intermediaries keep it open and a vanished proxy is noticed at the next write. The proxy
re-GETs that path for each relation it holds on it (docs/ARCHITECTURE.md, "Observe").

:class:`ChangeFeed` is where announcements meet feeds. With Redis, :meth:`ChangeFeed.announce`
PUBLISHes the path on :func:`stores.keys.changes_channel` and every API replica's relay
(subscribed to that channel) hands each message to every feed it serves, its own announcements
included: every proxy hears every change whichever replica made it. Without Redis the
announcement goes straight to this process's feeds.

Nothing is replayed: a feed that may have missed something ends, and the proxy reconnects and
re-GETs every relation once (its rule on feed loss). So a feed ends when the relay loses its
Redis subscription, and when a slow reader lets :data:`BACKLOG` events pile up; while the
relay is not subscribed, a new feed is refused with 503 rather than served deaf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from api.deps import require_proxy
from api.errors import (
    NotConfigured,
    ProxyForbidden,
    StoreUnavailable,
    error_responses,
)
from stores.keys import DEFAULT_PREFIX, changes_channel
from stores.redis import REDIS_ERRORS, RedisConnection, connect

log = logging.getLogger(__name__)

FEED_PATH = "/observe/events"
BACKLOG = 10_000
"""Events one feed may have waiting; a reader further behind is cut off (it re-GETs all)."""
READY_WAIT = 2.0
"""Seconds a new feed waits for the relay's subscription before it is refused with 503."""
_RECONNECT_MIN, _RECONNECT_MAX = 0.1, 5.0
_HEALTH_CHECK = 5.0


class _Listener:
    """One feed's mailbox. ``None`` in the queue ends the feed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.open = True

    def put(self, path: str) -> None:
        if not self.open:
            return
        if self.queue.qsize() >= BACKLOG:
            log.warning("change feed reader %d events behind: ending its feed", BACKLOG)
            self.end()
            return
        self.queue.put_nowait(path)

    def end(self) -> None:
        if self.open:
            self.open = False
            self.queue.put_nowait(None)


class ChangeFeed:
    """Announcements in, events out to every feed this process serves (module docstring)."""

    def __init__(
        self, redis_url: str | None = None, *, prefix: str = DEFAULT_PREFIX, timeout: float = 2.0
    ) -> None:
        self._url = redis_url
        self._channel = changes_channel(prefix)
        self._timeout = timeout
        self._listeners: set[_Listener] = set()
        self._relay: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._publisher: RedisConnection | None = None
        self.announced = 0
        self.relayed = 0

    @property
    def feeds(self) -> int:
        return len(self._listeners)

    async def announce(self, path: str) -> None:
        """Tell every feed of every replica that ``path`` changed. Never raises: a change
        that cannot be announced through Redis is still told to this replica's feeds (the
        others' proxies see it at their next feed loss or registration)."""
        self.announced += 1
        if self._url is None:
            self._deliver(path)
            return
        try:
            if self._publisher is None:
                self._publisher = connect(self._url, timeout=self._timeout, retries=1)
            client: Any = self._publisher.client
            await client.publish(self._channel, path.encode())
        except REDIS_ERRORS as exc:
            log.warning(
                "change of %s not announced through Redis (%s): local feeds only", path, exc
            )
            self._deliver(path)

    def _deliver(self, path: str) -> None:
        self.relayed += 1
        for listener in list(self._listeners):
            listener.put(path)
            if not listener.open:  # cut off: it is no one's business any more
                self._listeners.discard(listener)

    async def ready(self, within: float = READY_WAIT) -> bool:
        """True when announcements reach this process's feeds (always, without Redis)."""
        if self._url is None:
            return True
        if self._relay is None or self._relay.done():
            self._relay = asyncio.get_running_loop().create_task(
                self._run_relay(), name="change-feed-relay"
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), within)
        return self._subscribed.is_set()

    def listen(self) -> _Listener:
        """A new feed's mailbox, registered now: what is announced from here on reaches it.
        Give it back with :meth:`forget`."""
        listener = _Listener()
        self._listeners.add(listener)
        return listener

    def forget(self, listener: _Listener) -> None:
        listener.open = False
        self._listeners.discard(listener)

    def _end_all(self) -> None:
        for listener in list(self._listeners):
            listener.end()

    async def _run_relay(self) -> None:
        delay = _RECONNECT_MIN
        while True:
            connection = connect(
                self._url or "",
                timeout=self._timeout,
                retries=None,
                health_check_interval=_HEALTH_CHECK,
            )
            client: Any = connection.client
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                # A Cluster client learns the slot map here (its pub/sub picks a node from it);
                # classic PUBLISH reaches every node of a Cluster (proxy/state/psk.py does the
                # same for PSK changes).
                await client.initialize()
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                delay = _RECONNECT_MIN
                await self._follow(client, pubsub)
            except REDIS_ERRORS as exc:
                if self._subscribed.is_set():
                    log.warning(
                        "change feed relay lost Redis (%s): ending %d feeds", exc, self.feeds
                    )
            finally:
                # Whatever was announced while unsubscribed is lost to these feeds: end them,
                # their proxies reconnect and re-GET everything.
                self._subscribed.clear()
                self._end_all()
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()
                with contextlib.suppress(*REDIS_ERRORS):
                    await connection.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _follow(self, client: Any, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if loop.time() - checked > _HEALTH_CHECK:
                # A hung server keeps the socket open and silent: a PING notices.
                await client.ping()
                checked = loop.time()
            if message is None or message.get("type") != "message":
                continue
            data = message["data"]
            self._deliver(data.decode() if isinstance(data, bytes) else str(data))

    async def close(self) -> None:
        self._end_all()
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await publisher.aclose()


def event(path: str) -> bytes:
    """One SSE event; a path never holds a line break (it would end the field)."""
    return f"event: changed\ndata: {path}\n\n".encode()


KEEP_ALIVE = b": keep-alive\n\n"


async def _stream(feed: ChangeFeed, listener: _Listener, keepalive: float) -> AsyncIterator[bytes]:
    try:
        # A first line at once, so the proxy sees the feed up (headers alone may sit in a
        # buffer); the listener was registered before the answer began, so nothing announced
        # since is missed.
        yield b": connected\n\n"
        while True:
            try:
                path = await asyncio.wait_for(listener.queue.get(), keepalive)
            except TimeoutError:
                yield KEEP_ALIVE
                continue
            if path is None:
                return
            chunk = bytearray(event(path))
            while not listener.queue.empty():  # a burst goes out in one write
                more = listener.queue.get_nowait()
                if more is None:
                    yield bytes(chunk)
                    return
                chunk += event(more)
            yield bytes(chunk)
    finally:
        feed.forget(listener)


router = APIRouter(tags=["commands"])


@router.get(
    FEED_PATH,
    summary="The change feed: a Server-Sent Events stream of changed resources (proxy only)",
    description="Never ends while all is well. Each event is `event: changed` with the "
    "changed resource's path in `data`; a `: keep-alive` comment comes every "
    "`feed_keepalive` seconds (default 15). It ends when events may have been missed (the "
    "API lost Redis, or the reader fell far behind): the proxy then reconnects and re-reads "
    "what it observes. 503 while the API cannot relay announcements.",
    dependencies=[Depends(require_proxy)],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the event stream",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(ProxyForbidden, StoreUnavailable, NotConfigured),
    },
    # A never-ending answer has no place in a request/response test of the document.
    include_in_schema=False,
)
async def change_feed(request: Request) -> StreamingResponse:
    feed: ChangeFeed = request.app.state.changes
    if not await feed.ready():
        raise StoreUnavailable("change feed unavailable: the API cannot reach Redis")
    keepalive: float = request.app.state.settings.feed_keepalive
    return StreamingResponse(
        _stream(feed, feed.listen(), keepalive),
        media_type="text/event-stream",
        # No proxy cache or buffering may hold events back.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
