"""The asyncio driver of a CoAP :class:`~proxy.coap.endpoint.Endpoint`: the only code of the
messaging layer that touches a socket, the event loop or a timer.

It is an ``asyncio.DatagramProtocol`` under a UDP socket or under the DTLS transport
(:mod:`proxy.transports.dtls`, which looks like a datagram transport). Per datagram: feed the
endpoint, send what it returns, and run each request exchange it hands out as a task (through
the gate, :mod:`proxy.gate`, when there is a shared store). One timer for the endpoint's
:meth:`~proxy.coap.endpoint.Endpoint.next_deadline`, armed ``TIMER_SLACK`` late so that under
load one callback does the work of many deadlines (an empty ACK or a retransmission 10 ms late
is well inside RFC 7252's randomised timeouts). Graceful stop: :meth:`stop_accepting` and
:meth:`drain`.

Over DTLS an address names a session only for now: a NAT may give device A's old port to
device B, or B's session may move onto it by its Connection ID (RFC 9146 §6). Whatever is sent
later than in answer to the datagram just read — a separate response, an empty ACK after the
ACK window, a retransmission, an RFC 7641 notification — is therefore sent only while the
session at its address is still the identity the request came from; otherwise it is dropped
(``misdirected`` in the stats) rather than encrypted under another device's keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from proxy.coap import codes
from proxy.coap.endpoint import Endpoint, MessagingStats
from proxy.coap.exchanges import CHECKING, Exchange
from proxy.coap.observe import REPLACE
from proxy.coap.requests import RequestHandler, Response
from proxy.gate import Gate
from proxy.request_log import device_of
from stores.ledger import Claim

if TYPE_CHECKING:
    from proxy.coap.observe import Notification, Relation
    from proxy.observing import Observing

log = logging.getLogger(__name__)

TIMER_SLACK = 0.01
_INF = float("inf")


class CoapDriver(asyncio.DatagramProtocol):
    def __init__(
        self,
        endpoint: Endpoint,
        handler: RequestHandler,
        *,
        gate: Gate | None = None,
        identity_of: Callable[[tuple[str, int]], str | None] | None = None,
        observing: Observing | None = None,
    ) -> None:
        """``gate``: the cross-replica claim (the endpoint must then be built with
        ``claims=True``). ``identity_of``: for a secured transport (DTLS), the authenticated
        identity of a peer address; deduplication then keys on (identity, MID)
        (docs/CONTRACT.md §5). ``observing``: RFC 7641 relations and notifications
        (proxy/observing.py); None: Observe options are ignored as elective (RFC 7252 §5.4.1)."""
        self._endpoint = endpoint
        self._handler = handler
        self._gate = gate
        self._identity_of = identity_of
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._horizon = endpoint.ack_window + TIMER_SLACK
        self._tasks: set[asyncio.Task[None]] = set()
        self._observing = observing
        if observing is not None:
            observing.bind(self)

    @property
    def stats(self) -> MessagingStats:
        return self._endpoint.stats

    # -- asyncio plumbing -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport is not a DatagramTransport subclass.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._endpoint.abandon()
        self._disarm()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the peer is gone; retransmission gives up itself.
        log.debug("datagram error: %s", exc)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = self._transport
        if transport is None:
            return
        identity = self._identity_of(addr) if self._identity_of is not None else None
        now = self._loop.time()
        event = self._endpoint.receive(data, addr, now, identity)
        if event is None or type(event) is bytes:
            # Only an ACK or a Reset (answered with nothing, or with the notification that
            # waited for it) settles a notification: a request never does.
            if event is not None:
                transport.sendto(event, addr)
            if self._observing is not None:
                self._collect()
            return
        assert isinstance(event, Exchange)
        request = event.request
        assert request is not None
        # What the handler answers without I/O is answered here and now: no task, and no
        # cross-replica claim — such an answer follows from the datagram and the policy
        # alone, so every replica gives the same one (RequestHandler.answer_now).
        answer = self._handler.answer_now(request)
        if answer is not None:
            if self._gate is not None:
                self._endpoint.stats.claims_skipped += 1
            # In answer to the datagram just read: its session is the one at ``addr``, so
            # no identity check (_meant_for is for what is sent later).
            answered = self._endpoint.respond(event, answer, now)
            if answered is not None:
                transport.sendto(answered, addr)
            if self._timer_at > now + self._horizon:
                self._arm()  # the exchange's expiry
            return
        key: str | None = None
        gate = self._gate
        if gate is not None and event.state == CHECKING:
            key = gate.key_for(request)
        task = self._loop.create_task(self._serve(event, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A new exchange's deadlines (its ACK window, its expiry) lie at least the ACK window
        # ahead; only a timer armed later than that needs a look (saves it per request).
        if self._timer_at > now + self._horizon:
            self._arm()

    # -- handling -------------------------------------------------------------------------

    async def _serve(self, exchange: Exchange, key: str | None) -> None:
        """``key``: the gate's key for the exchange, None when it needs no claim (or there is
        no gate); datagram_received asked the gate already."""
        endpoint = self._endpoint
        request = exchange.request
        assert request is not None
        gate = self._gate
        if gate is not None and exchange.state == CHECKING:
            if key is None:
                endpoint.handling(exchange, self._loop.time())
                self._arm()
            else:
                verdict = await gate.claim(exchange, key)
                if verdict is Claim.BUSY:
                    endpoint.elsewhere(exchange)
                    return
                if verdict is not Claim.OWNED:
                    self._send(endpoint.replay(exchange, verdict, self._loop.time()), exchange)
                    return
                endpoint.handling(exchange, self._loop.time())
                self._arm()
        try:
            response = await self._handler.handle(request)
        except Exception:
            endpoint.stats.handler_errors += 1
            device = device_of(request)
            log.exception(
                "request handler failed for %s %s from device %s",
                codes.code_text(request.method),
                request.path,
                device,
                extra={"device": device},
            )
            response = Response(codes.INTERNAL_SERVER_ERROR)
        now = self._loop.time()
        observing = self._observing
        if observing is None:
            self._send(endpoint.respond(exchange, response, now), exchange)
        else:
            response, tag, confirm = observing.answered(exchange, request, response, now)
            if confirm:
                for data in endpoint.respond_confirmable(exchange, response, now, tag):
                    self._send(data, exchange)
                self._arm()
            else:
                self._send(endpoint.respond(exchange, response, now, tag), exchange)
        if gate is not None:
            gate.answered(exchange)
        if exchange.acked:
            self._arm()  # a separate response: its retransmission deadline

    # -- notifications (RFC 7641) -----------------------------------------------------------

    def notify(self, note: Notification) -> None:
        """Send a notification (or make it replace the CON in flight, RFC 7641 §4.5.2)."""
        relation = note.relation
        endpoint = self._endpoint
        if note.action == REPLACE and endpoint.replace(relation, note.response):
            return
        identity = relation.request.identity
        data = endpoint.notify(
            relation.peer,
            relation.request.message.token,
            note.response,
            note.confirmable,
            self._loop.time(),
            relation,
            identity,
        )
        if self._transport is not None and self._meant_for(relation.peer, identity):
            self._transport.sendto(data, relation.peer)
        if note.confirmable:
            self._arm()

    def forget(self, relation: Relation) -> None:
        """The relation ended: its CON in flight is not retransmitted any more."""
        self._endpoint.forget(relation)

    def _collect(self) -> None:
        outcomes = self._endpoint.take_outcomes()
        if outcomes:
            assert self._observing is not None
            self._observing.outcomes(outcomes)
            self._arm()  # a notification that waited for an ACK went out

    def _send(self, data: bytes | None, exchange: Exchange) -> None:
        if data is not None and self._transport is not None:
            request = exchange.request
            if request is None or self._meant_for(exchange.peer, request.identity):
                self._transport.sendto(data, exchange.peer)

    def _meant_for(self, peer: tuple[str, int], identity: str | None) -> bool:
        """Whether the session at ``peer`` is still ``identity``'s (see the module
        docstring); always on plain CoAP, where there are no sessions and identities."""
        identity_of = self._identity_of
        if identity_of is None or identity is None or identity_of(peer) == identity:
            return True
        self._endpoint.stats.misdirected += 1
        # Debug: one line per datagram (a response and its retransmissions); the counter is
        # what an operator watches (docs/OPERATIONS.md, "Answers for a device that moved").
        log.debug(
            "not sent to %s:%s: the session there is no longer device %s's",
            peer[0],
            peer[1],
            identity,
            extra={"device": identity},
        )
        return False

    # -- the one timer ----------------------------------------------------------------------

    def _arm(self) -> None:
        deadline = self._endpoint.next_deadline()
        if deadline is None:
            return
        when = deadline + TIMER_SLACK
        if when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._fire)
            self._timer_at = when

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = _INF

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = _INF
        transport = self._transport
        identities: list[str | None] = []
        due = self._endpoint.timeout(self._loop.time(), identities)
        if transport is not None:
            for (data, peer), identity in zip(due, identities, strict=True):
                if self._meant_for(peer, identity):
                    transport.sendto(data, peer)
        if self._observing is not None:
            self._collect()
        self._arm()

    # -- stopping ---------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """See :meth:`Endpoint.stop_accepting`."""
        self._endpoint.stop_accepting()

    async def drain(self, grace: float | None = None) -> bool:
        """Without ``grace``: wait for every request being handled (tests use it, and the
        shutdown after the transport has closed).

        With ``grace`` seconds (a graceful shutdown, after :meth:`stop_accepting`, transport
        still open): wait until every request in flight has been answered and every separate
        CON response has been acknowledged, reset or given up (retransmitted per RFC 7252
        §4.2 meanwhile), for at most that long. What is left then is abandoned: its handlers
        are cancelled and its retransmissions stopped. True when nothing was abandoned."""
        if grace is None:
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            return True
        endpoint = self._endpoint
        deadline = self._loop.time() + grace
        while self._tasks or endpoint.awaiting_ack:
            left = deadline - self._loop.time()
            if left <= 0:
                break
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=left)
            else:
                # Retransmissions end in the endpoint (ACK, RST, give-up), not in a task.
                await asyncio.sleep(min(left, 0.02))
        if not self._tasks and not endpoint.awaiting_ack:
            return True
        log.warning(
            "drain timeout: %d request(s) still in flight, %d separate response(s) not "
            "acknowledged; abandoned",
            len(self._tasks),
            endpoint.awaiting_ack,
        )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        endpoint.abandon()
        return False
