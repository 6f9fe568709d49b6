"""Observe through the proxy (RFC 7641): the asyncio glue between the sans-IO relations
(:mod:`proxy.coap.observe`), the messaging driver (:mod:`proxy.coap.driver`), the handler
that fetches representations (:mod:`proxy.coap.blockwise` around :mod:`proxy.forward`) and the
change feed (:mod:`proxy.feed`).

- A GET with Observe=0 on an observable route is forwarded as any GET; a 2.xx answer registers
  a relation and gets Observe (:meth:`Observing.answered`). Observe=1, or a GET without Observe
  with the relation's token, deregisters (§3.6).
- A change event for an origin path re-fetches that resource once per relation on it, with
  the relation's own request (so the origin authorises per device); a representation that
  differs from the last one sent is notified (:meth:`Observing.refresh`). After a reconnect of
  the feed every relation is re-fetched once.
- Outcomes from the endpoint: RST and give-up end the relation; an ACK on an acknowledged
  route (commands) is acknowledged to the origin with DELETE + If-Match, retried with backoff
  for up to the notification's Max-Age (obs contract §4).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from proxy.coap import codes
from proxy.coap import options as opt
from proxy.coap.codec import Message, parse_uint
from proxy.coap.endpoint import ACKED
from proxy.coap.exchanges import Exchange
from proxy.coap.observe import (
    DEREGISTER,
    REGISTER,
    LimitReached,
    Notification,
    ObserveRoute,
    Observers,
    Relation,
    block2_num,
    observe_value,
    relation_key,
)
from proxy.coap.requests import Request, Response
from proxy.errors import ProxyError
from proxy.request_log import device_of

if TYPE_CHECKING:
    from proxy.coap.driver import CoapDriver
    from proxy.feed import ChangeFeed

log = logging.getLogger(__name__)

# Answers that say the origin could not be asked, or could not answer for now (5.02, 5.04 the
# proxy gives itself; 5.03 the origin's "try again"): no new state of the resource, so not
# notified, and the fetch is tried again with backoff while the relation lives — otherwise a
# change announced once (a queued command) would wait for the next one (Benchmark O).
_TRANSIENT = frozenset({codes.BAD_GATEWAY, codes.SERVICE_UNAVAILABLE, codes.GATEWAY_TIMEOUT})
ACK_RETRY_FIRST = 0.5
ACK_RETRY_MAX = 30.0
FETCH_RETRY_FIRST = 0.5
FETCH_RETRY_MAX = 30.0
DEFAULT_MAX_AGE = 60


class ObservableHandler(Protocol):
    async def handle(self, request: Request) -> Response: ...

    def observe_route(self, request: Request) -> ObserveRoute | None: ...

    async def acknowledge(self, request: Request, etag: bytes) -> int: ...


class Observing:
    """Observe for one transport's driver; the :class:`Observers` (and so the limits) and the
    :class:`~proxy.feed.ChangeFeed` are shared by the transports of a process."""

    def __init__(
        self, observers: Observers, handler: ObservableHandler, feed: ChangeFeed | None = None
    ) -> None:
        self.observers = observers
        self._handler = handler
        self._feed = feed
        self._driver: CoapDriver | None = None
        self._mids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, driver: CoapDriver) -> None:
        self._driver = driver

    # -- registration -----------------------------------------------------------------------

    def answered(
        self, exchange: Exchange, request: Request, response: Response, now: float
    ) -> tuple[Response, Relation | None, bool]:
        """The answer to ``request`` as it goes out, the relation it belongs to (its separate
        CON's outcome matters), and whether it must travel as a CON of its own."""
        if request.method != codes.GET:
            # Only a GET registers, or deregisters (RFC 7641 §3.6; observable routes serve GET
            # alone): the telemetry path pays one comparison.
            return response, None, False
        value = observe_value(request)
        observers = self.observers
        if value is None and not len(observers):
            return response, None, False
        key = relation_key(request)
        existing = observers.get(key)
        block = block2_num(request)
        if block is not None and block[0] > 0:
            # The rest of a notification's representation (RFC 7959 §2.6): never a
            # registration, never a deregistration.
            return response, None, False
        if value == REGISTER:
            route = self._handler.observe_route(request)
            if route is not None:
                if not 64 <= response.code < 96:
                    # §4.1: an error answer registers nothing, and ends an earlier entry.
                    if existing is not None:
                        self._end(existing)
                    return response, None, False
                try:
                    relation = observers.register(self._stored(request), route, now)
                except LimitReached as exc:
                    log.info("observe refused (%s): answered without Observe", exc)
                    return response, None, False
                relation.peer = exchange.peer
                relation.owner = self
                if existing is not None and self._driver is not None:
                    self._driver.forget(existing)
                self._want_feed()
                answer = observers.first_answer(relation, response, now)
                if observers.confirm_first(relation, answer):
                    observers.sent_confirmable(relation, answer, now)
                    return answer, relation, True
                return answer, relation, False
        if existing is not None and (value == DEREGISTER or value is None):
            self._end(existing)
        return response, None, False

    @staticmethod
    def _stored(request: Request) -> Request:
        """The registration as kept to fetch new states: without Observe (a plain GET) and
        without the payload."""
        message = request.message
        options = [o for o in message.options if o[0] != opt.OBSERVE]
        kept = Message(message.mtype, message.code, message.mid, message.token, options, b"")
        return Request(
            request.method,
            request.path,
            request.queries,
            kept,
            request.peer,
            request.content_format,
            request.accept,
            request.identity,
        )

    def _end(self, relation: Relation) -> None:
        self.observers.remove(relation)
        if self._driver is not None:
            self._driver.forget(relation)
        self._want_feed()

    def _want_feed(self) -> None:
        if self._feed is not None:
            self._feed.want(len(self.observers) > 0)

    # -- outcomes ---------------------------------------------------------------------------

    def outcomes(self, items: list[tuple[object, int, Response | None]]) -> None:
        for tag, kind, response in items:
            if not isinstance(tag, Relation):
                continue
            self.observers.outcome(tag, kind, response)
            if not tag.active:
                self._want_feed()
            if kind == ACKED and tag.route.acknowledged and response is not None:
                etag = next((v for n, v in response.options if n == opt.ETAG), None)
                if etag is not None and 64 <= response.code < 96:
                    max_age = next(
                        (parse_uint(v) for n, v in response.options if n == opt.MAX_AGE),
                        DEFAULT_MAX_AGE,
                    )
                    self._spawn(self._acknowledge(tag, etag, max_age))

    async def _acknowledge(self, relation: Relation, etag: bytes, max_age: int) -> None:
        """DELETE + If-Match for the representation the device ACKed; retried with backoff
        while the origin cannot be reached or answers 5xx, for up to its Max-Age."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(max_age, 1)
        delay = ACK_RETRY_FIRST
        while True:
            status: int | None
            try:
                status = await self._handler.acknowledge(relation.request, etag)
            except ProxyError as exc:
                device = device_of(relation.request)
                log.warning(
                    "acknowledgement for %s from device %s failed: %s",
                    relation.request.path,
                    device,
                    exc,
                    extra={"device": device},
                )
                status = None
            if status is not None and status < 500:
                if status >= 300:
                    log.info(
                        "acknowledgement for %s: origin answered %d", relation.request.path, status
                    )
                break
            if loop.time() + delay > deadline:
                device = device_of(relation.request)
                log.warning(
                    "acknowledgement for %s from device %s given up after its Max-Age",
                    relation.request.path,
                    device,
                    extra={"device": device},
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, ACK_RETRY_MAX)
        if relation.active:
            # The origin moves to its next entry; the feed announces it too, but this replica
            # need not wait for the feed.
            self.refresh(relation)

    # -- changes ----------------------------------------------------------------------------

    def refresh(self, relation: Relation) -> None:
        """Fetch the relation's resource again (coalesced: one fetch at a time per relation,
        one more when asked meanwhile)."""
        if not relation.active:
            return
        if relation.refreshing:
            relation.stale = True
            return
        relation.refreshing = True
        self._spawn(self._refresh(relation))

    async def _refresh(self, relation: Relation) -> None:
        loop = asyncio.get_running_loop()
        delay = FETCH_RETRY_FIRST
        try:
            while relation.active:
                relation.stale = False
                try:
                    response: Response | None = await self._handler.handle(self._fetch(relation))
                except Exception:
                    device = device_of(relation.request)
                    log.exception(
                        "fetching %s for observing device %s failed",
                        relation.request.path,
                        device,
                        extra={"device": device},
                    )
                    response = None
                if _ended(relation):  # deregistered while the origin answered
                    return
                if response is None or response.code in _TRANSIENT:
                    log.info(
                        "origin could not answer for %s: not notified, again in %.1f s",
                        relation.request.path,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, FETCH_RETRY_MAX)
                    continue
                delay = FETCH_RETRY_FIRST
                if (note := self.observers.offer(relation, response, loop.time())) is not None:
                    self._send(note)
                if not relation.stale:
                    return
        finally:
            relation.refreshing = False

    def _fetch(self, relation: Relation) -> Request:
        """The registration again, with a MID of its own: the forwarder derives the
        Idempotency-Key from it, and each fetch is a new request to the origin."""
        request = relation.request
        message = request.message
        mid = next(self._mids) & 0xFFFF
        return Request(
            request.method,
            request.path,
            request.queries,
            Message(message.mtype, message.code, mid, message.token, message.options, b""),
            request.peer,
            request.content_format,
            request.accept,
            request.identity,
        )

    def _send(self, note: Notification) -> None:
        if self._driver is not None:
            self._driver.notify(note)
        if note.final:
            self._want_feed()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _ended(relation: Relation) -> bool:
    return not relation.active


def dispatch_change(observers: Observers, origin_path: str) -> None:
    """A change event from the feed: refresh every relation on that origin path (events for
    paths nobody here observes are dropped)."""
    for relation in observers.on_path(origin_path):
        if relation.owner is not None:
            relation.owner.refresh(relation)


def refresh_all(observers: Observers) -> None:
    """After the feed (re)connected: every relation's resource once (events may be lost)."""
    for relation in observers:
        if relation.owner is not None:
            relation.owner.refresh(relation)
