"""The CoAP messaging layer of a server (RFC 7252 §4), sans-IO.

:class:`Endpoint` is a state machine over datagrams and a clock that the caller supplies: no
sockets, no event loop, no timers of its own. The one asyncio driver
(:mod:`proxy.coap.driver`) feeds it and sends what it returns; tests drive it directly.

- :meth:`Endpoint.receive` reads one datagram and returns at most one event: an
  :class:`~proxy.coap.exchanges.Exchange` (a request to handle, with its interpreted
  :class:`~proxy.coap.requests.Request`), or ``bytes`` to send back to the same peer (a Reset,
  a replayed answer, an empty ACK, or the answer to a request the datagram alone refuses), or
  None. One result, no event objects: this runs for every datagram.
- :meth:`Endpoint.respond` turns a handler's :class:`~proxy.coap.requests.Response` into the
  datagram for the exchange's peer: piggybacked on the ACK while the request is not yet
  acknowledged (§5.2.1), else a separate CON response that is retransmitted until ACKed or
  Reset (§5.2.2), or a NON response to a NON request (§5.2.3).
- :meth:`Endpoint.timeout` does what is due at ``now``: the empty ACK once the ACK window
  passed (the answer then follows separately), retransmissions with exponential back-off from
  a random initial timeout (§4.2, §4.8), giving up after MAX_RETRANSMIT, and the expiry of
  deduplication state (§4.5, :mod:`proxy.coap.exchanges`).
- :meth:`Endpoint.next_deadline` says when :meth:`Endpoint.timeout` next has work.

What this layer also owns: a format error in a CON is Reset, in a NON dropped (§4.2, §4.3); an
Empty CON ("CoAP ping") is Reset (§4.3); a response sent to a server is Reset (CON) or ignored;
a request in an ACK or RST is dropped; options are checked by
:func:`~proxy.coap.requests.interpret` (4.02 / 4.00 / 5.05 decided by the datagram alone).

The cross-replica claim is not here: :mod:`proxy.gate` sits between this layer and the
handler. An endpoint built with ``claims=True`` hands new exchanges out as CHECKING; the gate
then moves them to HANDLING (:meth:`Endpoint.handling`), ELSEWHERE (:meth:`Endpoint.elsewhere`)
or answers them with stored bytes (:meth:`Endpoint.replay`).

Answers to one request beyond the first (RFC 7641 notifications): :meth:`Endpoint.notify`
sends a notification (new MID, the registration's token) as a CON, retransmitted like a
separate response, or as a NON; each carries the caller's ``tag`` (the relation,
:mod:`proxy.coap.observe`). An ACK, a Reset (matched by MID, NON notifications included) or
the give-up after MAX_RETRANSMIT becomes an outcome the caller collects with
:meth:`Endpoint.take_outcomes` (RFC 7641 §3.6, §4.5). :meth:`Endpoint.replace` puts a newer
notification in the place of the CON in flight: it goes out at that CON's next retransmission,
with a new MID and the same retransmission counter and timeout (RFC 7641 §4.5.2).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections import deque
from dataclasses import dataclass

from proxy.coap.codec import (
    ACK,
    CON,
    NON,
    RST,
    FormatError,
    Unreadable,
    decode,
    encode_empty,
    encode_parts,
)
from proxy.coap.exchanges import (
    ANSWERED,
    CHECKING,
    ELSEWHERE,
    HANDLING,
    Exchange,
    ExchangeCache,
    identity_key,
    peer_key,
)
from proxy.coap.requests import BadRequest, Peer, Response, interpret

log = logging.getLogger(__name__)

# RFC 7252 §4.8 default transmission parameters.
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4

# What receive() hands out: a request to handle, bytes to send back to the peer, or nothing.
Event = Exchange | bytes

_INF = float("inf")


@dataclass(slots=True)
class MessagingStats:
    requests: int = 0
    duplicates: int = 0
    format_errors: int = 0
    separate_responses: int = 0
    retransmissions: int = 0
    handler_errors: int = 0
    shared_replays: int = 0  # answered with bytes another replica stored
    shared_busy: int = 0  # left alone: another replica holds the claim
    shared_unavailable: int = 0  # processed on local dedup only, the shared store being down
    claims_skipped: int = 0  # handled without asking the shared store (needs_claim False)
    # Not sent: over DTLS the address now belongs to another device's session (a reused NAT
    # port, or a session moved there by its Connection ID, RFC 9146): proxy/coap/driver.py.
    misdirected: int = 0


# Outcomes of a tagged message (a notification, or a registration's separate response), as
# proxy.coap.observe names them.
ACKED = 0
RESET = 1
GAVE_UP = 2
# How long the MID of a NON notification is remembered, so that a Reset to it is understood
# (RFC 7641 §3.6; RFC 7252 §4.8.2 NON_LIFETIME).
NON_TAG_LIFETIME = 145.0


class _Outgoing:
    """A CON this endpoint sent (a separate response or a notification), until ACKed, Reset or
    given up. ``tag``: the caller's handle for the outcome (None: nobody asks)."""

    __slots__ = (
        "count",
        "data",
        "done",
        "exchange",
        "identity",
        "key",
        "peer",
        "replacement",
        "response",
        "tag",
        "timeout",
        "token",
    )

    def __init__(
        self,
        key: int,
        data: bytes,
        peer: Peer,
        exchange: Exchange | None,
        timeout: float,
        tag: object = None,
        response: Response | None = None,
        token: bytes = b"",
        identity: str | None = None,
    ):
        self.key = key
        self.data = data
        self.peer = peer
        self.exchange = exchange
        self.timeout = timeout
        self.count = 0  # retransmissions so far
        self.done = False
        self.tag = tag
        self.response = response
        self.token = token
        # Whom it is for over DTLS (the authenticated identity; None on plain CoAP): a
        # retransmission goes only to that identity's session (proxy/coap/driver.py).
        self.identity = identity
        self.replacement: Response | None = None


class Endpoint:
    def __init__(
        self,
        *,
        exchanges: ExchangeCache | None = None,
        ack_window: float = 1.0,
        ack_timeout: float = ACK_TIMEOUT,
        ack_random_factor: float = ACK_RANDOM_FACTOR,
        max_retransmit: int = MAX_RETRANSMIT,
        claims: bool = False,
        rng: random.Random | None = None,
        stats: MessagingStats | None = None,
    ) -> None:
        """``ack_window``: how long a CON request may be in flight before it gets an empty ACK
        and its answer travels separately (docs/ARCHITECTURE.md, "ACK window 1 s").
        ``claims``: a gate decides who handles each new exchange (exchanges start CHECKING).
        ``rng``: the source of message IDs and of the random initial retransmission timeout
        (tests pass a seeded one)."""
        self._exchanges = exchanges if exchanges is not None else ExchangeCache()
        self._ack_window = ack_window
        self._ack_timeout = ack_timeout
        self._ack_random_factor = ack_random_factor
        self._max_retransmit = max_retransmit
        self._first_state = CHECKING if claims else HANDLING
        self._rng = rng if rng is not None else random.Random()
        self._next_mid = self._rng.randrange(0x10000)
        # CON requests in flight: the end of their ACK window and their dedup key, in arrival
        # order (the window is the same for all, so this is also deadline order: no heap
        # needed). An exchange answered in time stays until its deadline and is skipped then.
        # Two deques of floats and ints, not one of tuples or exchanges: neither is tracked by
        # the garbage collector, so a second's worth of them does not set off collections
        # (an object kept per request did: +3 µs per request, and full collections of 7-10 ms
        # in the latency tail).
        self._ack_times: deque[float] = deque()
        self._ack_keys: deque[int] = deque()
        # Separate responses awaiting their ACK: (our MID at the peer) → state, and a heap of
        # (due, sequence, state) for their retransmissions; a done state is skipped when due.
        self._awaiting: dict[int, _Outgoing] = {}
        self._retransmits: list[tuple[float, int, _Outgoing]] = []
        self._sequence = itertools.count()
        # Tagged CONs in flight by tag (one per tag: RFC 7641 §4.5.2), the MIDs of NON
        # notifications (for a Reset) with their expiry, and the outcomes not yet collected.
        self._tagged: dict[object, _Outgoing] = {}
        self._non_tags: dict[int, object] = {}
        self._non_expiry: deque[tuple[float, int]] = deque()
        self._outcomes: list[tuple[object, int, Response | None]] = []
        # False once a graceful shutdown began (stop_accepting): no new exchange is taken.
        self._accepting = True
        self.stats = stats if stats is not None else MessagingStats()

    # -- receiving ------------------------------------------------------------------------

    def receive(
        self, datagram: bytes, peer: Peer, now: float, identity: str | None = None
    ) -> Event | None:
        """``identity``: over a secured transport (DTLS) the peer's authenticated identity;
        deduplication then keys on (identity, MID) instead of the address (docs/CONTRACT.md §5)."""
        try:
            message = decode(datagram)
        except FormatError as exc:
            self.stats.format_errors += 1
            return encode_empty(RST, exc.mid) if exc.mtype == CON else None
        except Unreadable:
            self.stats.format_errors += 1
            return None
        mtype = message.mtype
        code = message.code
        if code == 0:
            if mtype == CON:
                # A ping (§4.3). Not answered while stopping, so health checks see it going.
                return encode_empty(RST, message.mid) if self._accepting else None
            if mtype != NON:
                return self._peer_answered(peer, message.mid, mtype == RST, now)
            return None
        if code >= 64:
            # A response sent to a server: nothing asked for it (§4.2 reject a CON, §4.3 NON).
            if mtype == CON:
                return encode_empty(RST, message.mid)
            if mtype != NON:
                self._peer_answered(peer, message.mid, mtype == RST)
            return None
        if mtype >= ACK:
            # A request can only travel in a CON or NON; an ACK/RST carrying one is malformed
            # and cannot be answered (§4.2, §4.3).
            self.stats.format_errors += 1
            return None
        if identity is None:
            key = peer_key(peer[0], peer[1], message.mid)
        else:
            key = identity_key(identity, message.mid)
        exchanges = self._exchanges
        seen = exchanges.get(key)
        if seen is not None:
            return self._duplicate(seen, message.mtype, message.mid)
        if not self._accepting:
            return None  # shutting down: see stop_accepting
        self.stats.requests += 1
        try:
            # (host, port) for the handler: an IPv6 socket reports (host, port, flow, scope);
            # answers go to the address as reported (the scope matters for link-local).
            request = interpret(message, peer[:2], identity)
        except BadRequest as bad:
            # Decided by the datagram alone: every replica answers it the same way, at once.
            exchange = Exchange(key, peer, message, None, HANDLING)
            exchanges.add(key, mtype, now, exchange)
            return self.respond(exchange, Response(bad.code), now)
        state = self._first_state
        exchange = Exchange(key, peer, message, request, state)
        exchanges.add(key, mtype, now, exchange)
        if mtype == CON and state == HANDLING:
            self._ack_times.append(now + self._ack_window)
            self._ack_keys.append(key)
        return exchange

    def _duplicate(self, seen: Exchange | bytes, mtype: int, mid: int) -> Event | None:
        self.stats.duplicates += 1
        if type(seen) is bytes:
            # Answered: a CON gets the very same bytes again; a NON is ignored (§4.5).
            return seen if mtype == CON else None
        assert isinstance(seen, Exchange)
        state = seen.state
        if state == ELSEWHERE:
            if not self._accepting:
                return None  # shutting down: not taken over here (see stop_accepting)
            # Another replica had it: ask again. It may have answered by now, or its lease may
            # have run out (it died), and then this replica takes the exchange over.
            seen.state = CHECKING
            return seen
        if state == HANDLING and mtype == CON:
            # Being handled here: acknowledge so the device stops retransmitting; the answer
            # follows as a separate response.
            seen.acked = True
            return encode_empty(ACK, mid)
        # CHECKING: the store's answer is a moment away; the device will retransmit anyway.
        return None

    def _peer_answered(self, peer: Peer, mid: int, reset: bool, now: float = 0.0) -> bytes | None:
        """An ACK or RST from ``peer`` for our message ``mid``: a separate response stops
        being retransmitted (§4.2). A Reset is where RFC 7641 §3.6 ends an observation, for a
        NON notification too."""
        key = peer_key(peer[0], peer[1], mid)
        outgoing = self._awaiting.pop(key, None)
        if outgoing is not None:
            outgoing.done = True
            tag = outgoing.tag
            if tag is not None:
                if self._tagged.get(tag) is outgoing:
                    del self._tagged[tag]
                self._outcomes.append((tag, RESET if reset else ACKED, outgoing.response))
                if outgoing.replacement is not None and not reset:
                    # A newer notification waited for this one: it goes now (RFC 7641 §4.5.2).
                    return self._send_new(
                        peer,
                        outgoing.token,
                        outgoing.replacement,
                        CON,
                        now,
                        tag,
                        None,
                        outgoing.identity,
                    )
            return None
        if reset:
            tag = self._non_tags.pop(key, None)
            if tag is not None:
                self._outcomes.append((tag, RESET, None))
        return None

    # -- the gate's verdicts (proxy/gate.py) ----------------------------------------------

    def handling(self, exchange: Exchange, now: float) -> None:
        """This replica handles the exchange: its ACK window starts now."""
        exchange.state = HANDLING
        if exchange.message.mtype == CON:
            self._ack_times.append(now + self._ack_window)
            self._ack_keys.append(exchange.key)

    def elsewhere(self, exchange: Exchange) -> None:
        """Another replica holds the claim: stay silent; a retransmission asks again. An
        empty ACK would promise a separate response this replica could never send."""
        exchange.state = ELSEWHERE

    def replay(self, exchange: Exchange, record: bytes, now: float) -> bytes | None:
        """Another replica answered: its exact bytes are the answer here too (to a CON)."""
        exchange.state = ANSWERED
        exchange.record = record
        self._exchanges.complete(exchange.key, record)
        return record if exchange.message.mtype == CON else None

    # -- answering ------------------------------------------------------------------------

    def respond(
        self, exchange: Exchange, response: Response, now: float, tag: object = None
    ) -> bytes | None:
        """The datagram carrying the final ``response`` to ``exchange.peer``; None when the
        exchange was answered already (e.g. by bytes another replica stored). ``tag``: when
        the answer travels as a separate CON, its ACK, Reset or give-up is reported under it
        (:meth:`take_outcomes`; an Observe registration's answer, RFC 7641 §3.6)."""
        if exchange.state == ANSWERED:
            return None
        exchange.state = ANSWERED
        message = exchange.message
        if message.mtype == CON:
            if not exchange.acked:
                data = encode_parts(
                    ACK,
                    response.code,
                    message.mid,
                    message.token,
                    response.options,
                    response.payload,
                )
                exchange.record = data
                self._exchanges.complete(exchange.key, data)
                return data
            # Separate response (§5.2.2): a CON of its own, retransmitted until ACKed. A
            # duplicate of the request from now on gets the empty ACK again.
            self.stats.separate_responses += 1
            record = encode_empty(ACK, message.mid)
            exchange.record = record
            self._exchanges.complete(exchange.key, record)
            return self._separate(exchange, response, CON, now, tag)
        # A NON's duplicates are never answered (§4.5): its record is empty.
        self._exchanges.complete(exchange.key, b"")
        return self._separate(exchange, response, NON, now, tag)

    def respond_confirmable(
        self, exchange: Exchange, response: Response, now: float, tag: object
    ) -> list[bytes]:
        """The final ``response`` as a CON of its own, so that the device's ACK confirms it
        arrived (an acknowledged Observe route, obs contract §4): an empty ACK first when the
        request was a CON not yet acknowledged (RFC 7252 §5.2.2), or a CON answer to a NON
        request (§5.2.3 lets a server do so). Its outcome is reported under ``tag``."""
        if exchange.state == ANSWERED:
            return []
        out: list[bytes] = []
        message = exchange.message
        if message.mtype == CON and not exchange.acked:
            exchange.acked = True
            out.append(encode_empty(ACK, message.mid))
        exchange.state = ANSWERED
        record = encode_empty(ACK, message.mid) if message.mtype == CON else b""
        exchange.record = record
        self._exchanges.complete(exchange.key, record)
        self.stats.separate_responses += 1
        out.append(self._separate(exchange, response, CON, now, tag))
        return out

    def _separate(
        self, exchange: Exchange, response: Response, mtype: int, now: float, tag: object = None
    ) -> bytes:
        """A response in a message of its own (new MID, the request's token), reliable when
        ``mtype`` is CON."""
        request = exchange.request
        return self._send_new(
            exchange.peer,
            exchange.message.token,
            response,
            mtype,
            now,
            tag,
            exchange,
            request.identity if request is not None else None,
        )

    def _send_new(
        self,
        peer: Peer,
        token: bytes,
        response: Response,
        mtype: int,
        now: float,
        tag: object,
        exchange: Exchange | None,
        identity: str | None = None,
    ) -> bytes:
        mid = self._next_mid
        self._next_mid = (mid + 1) & 0xFFFF
        data = encode_parts(mtype, response.code, mid, token, response.options, response.payload)
        key = peer_key(peer[0], peer[1], mid)
        if mtype == CON:
            timeout = self._ack_timeout * self._rng.uniform(1.0, self._ack_random_factor)
            outgoing = _Outgoing(key, data, peer, exchange, timeout, tag, response, token, identity)
            self._awaiting[key] = outgoing
            if tag is not None:
                self._tagged[tag] = outgoing
            heapq.heappush(self._retransmits, (now + timeout, next(self._sequence), outgoing))
        elif tag is not None:
            self._non_tags[key] = tag
            self._non_expiry.append((now + NON_TAG_LIFETIME, key))
        return data

    # -- notifications (RFC 7641) ---------------------------------------------------------

    def notify(
        self,
        peer: Peer,
        token: bytes,
        response: Response,
        confirmable: bool,
        now: float,
        tag: object,
        identity: str | None = None,
    ) -> bytes:
        """A notification to ``peer``: a new MID, ``token``; a CON is retransmitted until
        ACKed, Reset or given up (RFC 7252 §4.2), each reported under ``tag``. A NON's MID is
        remembered for NON_TAG_LIFETIME so that a Reset to it ends the observation too.
        ``identity``: the device's authenticated identity over DTLS (see :meth:`timeout`)."""
        previous = self._tagged.pop(tag, None)
        if previous is not None:
            # The caller sends at most one CON per tag (RFC 7641 §4.5.2): a stale one stops.
            previous.done = True
            self._awaiting.pop(previous.key, None)
        return self._send_new(
            peer, token, response, CON if confirmable else NON, now, tag, None, identity
        )

    def replace(self, tag: object, response: Response) -> bool:
        """Make ``response`` take the place of the CON in flight under ``tag``: it goes out at
        that CON's next retransmission with a new MID, the counter and timeout carried over
        (RFC 7641 §4.5.2). False: nothing of ``tag`` is in flight (send it anew)."""
        outgoing = self._tagged.get(tag)
        if outgoing is None or outgoing.done:
            return False
        outgoing.replacement = response
        return True

    def forget(self, tag: object) -> None:
        """Stop retransmitting what is in flight under ``tag`` (the observation ended)."""
        outgoing = self._tagged.pop(tag, None)
        if outgoing is not None:
            outgoing.done = True
            self._awaiting.pop(outgoing.key, None)

    def take_outcomes(self) -> list[tuple[object, int, Response | None]]:
        """(tag, ACKED | RESET | GAVE_UP, the response concerned) since the last call."""
        outcomes = self._outcomes
        if outcomes:
            self._outcomes = []
        return outcomes

    # -- time -----------------------------------------------------------------------------

    def timeout(
        self, now: float, identities: list[str | None] | None = None
    ) -> list[tuple[bytes, Peer]]:
        """Everything due at ``now``: the datagrams to send, each with its peer. With
        ``identities`` (a secured transport), the authenticated identity each datagram is for
        is appended to it in the same order, so that the caller sends it only to that
        identity's session (proxy/coap/driver.py)."""
        out: list[tuple[bytes, Peer]] = []
        ack_times, ack_keys = self._ack_times, self._ack_keys
        exchanges = self._exchanges
        while ack_times and ack_times[0] <= now:
            ack_times.popleft()
            exchange = exchanges.get(ack_keys.popleft())
            if type(exchange) is Exchange and exchange.state == HANDLING and not exchange.acked:
                # Still being handled when the window closed: acknowledge, so the device stops
                # retransmitting; the answer follows separately (§5.2.2).
                exchange.acked = True
                out.append((encode_empty(ACK, exchange.message.mid), exchange.peer))
                if identities is not None:
                    request = exchange.request
                    identities.append(request.identity if request is not None else None)
        retransmits = self._retransmits
        while retransmits and retransmits[0][0] <= now:
            due, _, outgoing = heapq.heappop(retransmits)
            if outgoing.done:
                continue
            if outgoing.count >= self._max_retransmit:
                outgoing.done = True
                del self._awaiting[outgoing.key]
                peer = outgoing.peer
                log.info("separate response to %s:%s never acknowledged", peer[0], peer[1])
                if outgoing.tag is not None:
                    if self._tagged.get(outgoing.tag) is outgoing:
                        del self._tagged[outgoing.tag]
                    self._outcomes.append((outgoing.tag, GAVE_UP, outgoing.response))
                continue
            # §4.2: the timeout doubles with each retransmission, counted from when it was due
            # (not from when a late timer ran).
            outgoing.count += 1
            outgoing.timeout *= 2
            self.stats.retransmissions += 1
            if outgoing.replacement is not None:
                self._swap(outgoing)
            out.append((outgoing.data, outgoing.peer))
            if identities is not None:
                identities.append(outgoing.identity)
            heapq.heappush(retransmits, (due + outgoing.timeout, next(self._sequence), outgoing))
        non_expiry = self._non_expiry
        while non_expiry and non_expiry[0][0] <= now:
            self._non_tags.pop(non_expiry.popleft()[1], None)
        self._exchanges.expire(now)
        return out

    def _swap(self, outgoing: _Outgoing) -> None:
        """The newer notification goes out in the place of the one in flight: a new MID (it
        is a new message), the same retransmission state (RFC 7641 §4.5.2)."""
        response = outgoing.replacement
        assert response is not None
        outgoing.replacement = None
        self._awaiting.pop(outgoing.key, None)
        mid = self._next_mid
        self._next_mid = (mid + 1) & 0xFFFF
        peer = outgoing.peer
        outgoing.key = peer_key(peer[0], peer[1], mid)
        outgoing.data = encode_parts(
            CON, response.code, mid, outgoing.token, response.options, response.payload
        )
        outgoing.response = response
        self._awaiting[outgoing.key] = outgoing

    def next_deadline(self) -> float | None:
        """When :meth:`timeout` next has something to do; None: nothing, until a datagram."""
        deadline = self._exchanges.next_expiry()
        if self._ack_times:
            first = self._ack_times[0]
            if first < deadline:
                deadline = first
        if self._retransmits:
            first = self._retransmits[0][0]
            if first < deadline:
                deadline = first
        if self._non_expiry:
            first = self._non_expiry[0][0]
            if first < deadline:
                deadline = first
        return None if deadline == _INF else deadline

    # -- stopping -------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Begin a graceful shutdown: from now on no new exchange is taken. A new request gets
        silence (the device retransmits it, by then to a replica or process that serves), and
        so does a ping, so that health checks see this process going. What keeps being read:
        ACKs and RSTs for our separate responses (their retransmission stops, §4.2), and
        duplicates of exchanges already known here, which get the stored answer or, while
        still in flight, the empty ACK (§4.5), so that the device waits for the answer."""
        self._accepting = False

    @property
    def ack_window(self) -> float:
        return self._ack_window

    @property
    def awaiting_ack(self) -> int:
        """Separate CON responses sent and neither acknowledged, reset nor given up."""
        return len(self._awaiting)

    def abandon(self) -> None:
        """Stop retransmitting every separate response (shutdown)."""
        for outgoing in self._awaiting.values():
            outgoing.done = True
        self._awaiting.clear()
        self._retransmits.clear()
        self._tagged.clear()
