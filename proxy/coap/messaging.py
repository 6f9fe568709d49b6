"""The CoAP messaging layer for a server (RFC 7252 §4), on an asyncio datagram transport.

The protocol object only turns datagrams into events; the per-request work (routing,
forwarding) is done by a :class:`RequestHandler` passed in. What this layer owns:

- decoding, and the answers to malformed input: a format error in a CON is Reset, in a NON
  dropped (§4.2, §4.3); an Empty CON ("CoAP ping") is Reset (§4.3);
- unknown critical options → 4.02 (§5.4.1);
- deduplication (§4.5) through :class:`ExchangeCache`;
- piggybacked responses when the handler answers within the ACK window, else an empty ACK and
  a separate CON response retransmitted with exponential back-off until ACKed or Reset (§4.2,
  §5.2.2); NON requests get NON responses (§5.2.3).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from policies import status
from proxy.coap.codec import (
    ACK,
    CON,
    NON,
    RST,
    FormatError,
    Message,
    Unreadable,
    decode,
    encode_empty,
    encode_parts,
)
from proxy.coap.exchanges import (
    CHECKING,
    ELSEWHERE,
    EXCHANGE_LIFETIME,
    HANDLING,
    NON_LIFETIME,
    ExchangeCache,
    Pending,
    identity_key,
    peer_key,
)
from proxy.coap.requests import BadRequest, Request, RequestHandler, Response, interpret
from proxy.state.base import Claim, ClaimResult, DedupStore, DedupUnavailable

log = logging.getLogger(__name__)

# RFC 7252 §4.8 default transmission parameters.
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4


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


@dataclass(slots=True)
class SharedDedup:
    """Cluster-wide deduplication (SPEC §4): a :class:`DedupStore` and how to use it.

    ``key`` names an exchange in the store (policies.keys.dedup_key). ``lease`` bounds a claim:
    a replica that dies after claiming blocks the exchange for at most that long.
    ``retry_after``: after the store failed, serve on local dedup alone for this long before
    asking it again, so an outage costs one timeout, not one per request.
    """

    store: DedupStore
    key: Callable[[str, int, int, str | None], str]  # (ip, port, MID, PSK identity)
    lease: float = 10.0
    retry_after: float = 1.0


class CoapServerProtocol(asyncio.DatagramProtocol):
    def __init__(
        self,
        handler: RequestHandler,
        *,
        exchanges: ExchangeCache | None = None,
        ack_window: float = 1.0,
        ack_timeout: float = ACK_TIMEOUT,
        max_retransmit: int = MAX_RETRANSMIT,
        shared: SharedDedup | None = None,
        identity_of: Callable[[tuple[str, int]], str | None] | None = None,
    ) -> None:
        """``identity_of``: for a secured transport (DTLS), the authenticated identity of a
        peer address; deduplication then keys on (identity, MID), SPEC §4."""
        self._handler = handler
        self._exchanges = exchanges if exchanges is not None else ExchangeCache()
        self._ack_window = ack_window
        self._ack_timeout = ack_timeout
        self._max_retransmit = max_retransmit
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._next_mid = random.randrange(0x10000)
        # Separate CON responses awaiting the device's ACK: peer_key → retransmit timer.
        self._awaiting_ack: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._shared = shared
        self._identity_of = identity_of
        self._shared_down_until = 0.0
        self._shared_down = False
        # False once a graceful shutdown began (stop_accepting): no new exchange is taken.
        self._accepting = True
        self.stats = MessagingStats()

    # -- asyncio plumbing -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport is not a DatagramTransport subclass.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._awaiting_ack.values():
            timer.cancel()
        self._awaiting_ack.clear()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the peer is gone; retransmission gives up itself.
        log.debug("datagram error: %s", exc)

    def stop_accepting(self) -> None:
        """Begin a graceful shutdown: from now on no new exchange is taken. A new request gets
        silence (the device retransmits it, by then to a replica or process that serves), and
        so does a ping, so that health checks see this process going. What keeps being read:
        ACKs and RSTs for our separate responses (their retransmission stops, §4.2), and
        duplicates of exchanges already known here, which get the stored answer or, while
        still in flight, the empty ACK (§4.5), so that the device waits for the answer."""
        self._accepting = False

    async def drain(self, grace: float | None = None) -> bool:
        """Without ``grace``: wait for every request being handled (tests use it, and the
        shutdown after the transport has closed).

        With ``grace`` seconds (a graceful shutdown, after :meth:`stop_accepting`, transport
        still open): wait until every request in flight has been answered and every separate
        CON response has been acknowledged, reset or given up (retransmitted per §4.2
        meanwhile), for at most that long. What is left then is abandoned: its handlers are
        cancelled and its retransmissions stopped. True when nothing was abandoned."""
        if grace is None:
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            return True
        deadline = self._loop.time() + grace
        while self._tasks or self._awaiting_ack:
            left = deadline - self._loop.time()
            if left <= 0:
                break
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=left)
            else:
                # Retransmission timers end in _retransmit/_peer_answered, not in a task.
                await asyncio.sleep(min(left, 0.02))
        if not self._tasks and not self._awaiting_ack:
            return True
        log.warning(
            "drain timeout: %d request(s) still in flight, %d separate response(s) not "
            "acknowledged; abandoned",
            len(self._tasks),
            len(self._awaiting_ack),
        )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for timer in self._awaiting_ack.values():
            timer.cancel()
        self._awaiting_ack.clear()
        return False

    # -- receiving --------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = self._transport
        if transport is None:
            return
        try:
            message = decode(data)
        except FormatError as exc:
            self.stats.format_errors += 1
            if exc.mtype == CON:
                transport.sendto(encode_empty(RST, exc.mid), addr)
            return
        except Unreadable:
            self.stats.format_errors += 1
            return
        mtype = message.mtype
        code = message.code
        ip, port = addr[0], addr[1]
        if code == 0:
            if mtype == CON:
                if self._accepting:
                    transport.sendto(encode_empty(RST, message.mid), addr)
            elif mtype != NON:
                self._peer_answered(peer_key(ip, port, message.mid))
            return
        if code >= 64:
            # A response sent to a server: nothing asked for it (§4.2 reject a CON, §4.3 NON).
            if mtype == CON:
                transport.sendto(encode_empty(RST, message.mid), addr)
            elif mtype in (ACK, RST):
                self._peer_answered(peer_key(ip, port, message.mid))
            return
        if mtype >= ACK:
            # A request can only travel in a CON or NON; an ACK/RST carrying one is malformed
            # and cannot be answered (§4.2, §4.3).
            self.stats.format_errors += 1
            return
        identity = self._identity_of(addr) if self._identity_of is not None else None
        if identity is None:
            key = peer_key(ip, port, message.mid)
        else:
            key = identity_key(identity, message.mid)
        seen = self._exchanges.get(key)
        if seen is not None:
            self._duplicate(key, seen, message, addr, identity)
            return
        if not self._accepting:
            return  # shutting down: see stop_accepting
        self.stats.requests += 1
        state = HANDLING if self._shared is None else CHECKING
        pending = self._exchanges.add(key, mtype, self._loop.time(), state)
        self._start(key, pending, message, addr, identity)

    def _start(
        self,
        key: int,
        pending: Pending,
        message: Message,
        addr: tuple[str, int],
        identity: str | None,
    ) -> None:
        try:
            request = interpret(message, (addr[0], addr[1]), identity)
        except BadRequest as bad:
            # Decided by the datagram alone: every replica answers it the same way.
            pending.state = HANDLING
            self._respond(key, pending, message, addr, Response(bad.code))
            return
        task = self._loop.create_task(self._serve(key, pending, request, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _duplicate(
        self,
        key: int,
        seen: Pending | bytes,
        message: Message,
        addr: tuple[str, int],
        identity: str | None,
    ) -> None:
        self.stats.duplicates += 1
        transport = self._transport
        if transport is None:
            return
        if isinstance(seen, bytes):
            if message.mtype == CON:
                transport.sendto(seen, addr)
            return  # duplicate NON: silently ignored (§4.5)
        if seen.state == ELSEWHERE:
            if not self._accepting:
                return  # shutting down: not taken over here (see stop_accepting)
            # Another replica had it: ask again. It may have answered by now, or its lease may
            # have run out (it died), and then this replica takes the exchange over.
            seen.state = CHECKING
            self._start(key, seen, message, addr, identity)
        elif seen.state == HANDLING and message.mtype == CON:
            # Being handled here: acknowledge so the device stops retransmitting; the answer
            # follows as a separate response.
            seen.acked = True
            transport.sendto(encode_empty(ACK, message.mid), addr)
        # CHECKING: the store's answer is a moment away; the device will retransmit anyway.

    # -- handling ---------------------------------------------------------------------------

    async def _claim(self, shared: SharedDedup, shared_key: str) -> ClaimResult:
        now = self._loop.time()
        if now < self._shared_down_until:
            self.stats.shared_unavailable += 1
            return Claim.OWNED
        try:
            result = await shared.store.claim(shared_key, shared.lease)
        except DedupUnavailable as exc:
            self.stats.shared_unavailable += 1
            self._shared_down_until = now + shared.retry_after
            if not self._shared_down:
                self._shared_down = True
                log.warning(
                    "shared dedup unavailable, serving with local dedup only "
                    "(a retransmission reaching another replica may be processed twice): %s",
                    exc,
                )
            return Claim.OWNED
        if self._shared_down:
            self._shared_down = False
            log.warning("shared dedup available again")
        return result

    def _remember(self, key: int, message: Message, record: bytes, shared_key: str | None) -> None:
        """What a duplicate gets from now on, here and (shared) on every replica."""
        self._exchanges.complete(key, record)
        shared = self._shared
        if shared is not None and shared_key is not None and not self._shared_down:
            lifetime = EXCHANGE_LIFETIME if message.mtype == CON else NON_LIFETIME
            shared.store.complete(shared_key, record, lifetime)

    async def _serve(
        self, key: int, pending: Pending, request: Request, addr: tuple[str, int]
    ) -> None:
        message = request.message
        shared = self._shared
        shared_key = None
        if shared is not None:
            shared_key = shared.key(addr[0], addr[1], message.mid, request.identity)
        if shared is not None and shared_key is not None and pending.state == CHECKING:
            claim = await self._claim(shared, shared_key)
            if claim is Claim.BUSY:
                self.stats.shared_busy += 1
                pending.state = ELSEWHERE
                return
            if isinstance(claim, bytes):
                self.stats.shared_replays += 1
                self._exchanges.complete(key, claim)
                if message.mtype == CON and self._transport is not None:
                    self._transport.sendto(claim, addr)
                return
            pending.state = HANDLING
        timer: asyncio.TimerHandle | None = None
        if message.mtype == CON:
            timer = self._loop.call_later(
                self._ack_window, self._send_empty_ack, pending, message.mid, addr
            )
        try:
            response = await self._handler.handle(request)
        except Exception:
            self.stats.handler_errors += 1
            log.exception(
                "request handler failed for %s %s", status.code_text(request.method), request.path
            )
            response = Response(status.INTERNAL_SERVER_ERROR)
        if timer is not None:
            timer.cancel()
        self._respond(key, pending, message, addr, response, shared_key)

    def _send_empty_ack(self, pending: Pending, mid: int, addr: tuple[str, int]) -> None:
        # Only ever scheduled while the request is in flight, and cancelled when it completes.
        if not pending.acked and self._transport is not None:
            pending.acked = True
            self._transport.sendto(encode_empty(ACK, mid), addr)

    def _respond(
        self,
        key: int,
        pending: Pending,
        message: Message,
        addr: tuple[str, int],
        response: Response,
        shared_key: str | None = None,
    ) -> None:
        transport = self._transport
        if transport is None:
            return
        if message.mtype == CON and not pending.acked:
            data = encode_parts(
                ACK, response.code, message.mid, message.token, response.options, response.payload
            )
            self._remember(key, message, data, shared_key)
            transport.sendto(data, addr)
            return
        mid = self._new_mid()
        if message.mtype == CON:
            # Separate response (§5.2.2): a CON of its own, retransmitted until ACKed. A
            # duplicate of the request from now on gets the empty ACK again.
            self.stats.separate_responses += 1
            self._remember(key, message, encode_empty(ACK, message.mid), shared_key)
            data = encode_parts(
                CON, response.code, mid, message.token, response.options, response.payload
            )
            transport.sendto(data, addr)
            timeout = self._ack_timeout * random.uniform(1.0, ACK_RANDOM_FACTOR)
            self._schedule_retransmit(peer_key(addr[0], addr[1], mid), data, addr, timeout, 0)
        else:
            self._remember(key, message, b"", shared_key)  # a NON's duplicates are never answered
            data = encode_parts(
                NON, response.code, mid, message.token, response.options, response.payload
            )
            transport.sendto(data, addr)

    def _new_mid(self) -> int:
        mid = self._next_mid
        self._next_mid = (mid + 1) & 0xFFFF
        return mid

    # -- separate-response reliability --------------------------------------------------------

    def _schedule_retransmit(
        self,
        key: int,
        data: bytes,
        addr: tuple[str, int],
        timeout: float,
        count: int,
    ) -> None:
        self._awaiting_ack[key] = self._loop.call_later(
            timeout, self._retransmit, key, data, addr, timeout, count
        )

    def _retransmit(
        self,
        key: int,
        data: bytes,
        addr: tuple[str, int],
        timeout: float,
        count: int,
    ) -> None:
        if count >= self._max_retransmit or self._transport is None:
            self._awaiting_ack.pop(key, None)
            log.info("separate response to %s:%s never acknowledged", addr[0], addr[1])
            return
        self.stats.retransmissions += 1
        self._transport.sendto(data, addr)
        self._schedule_retransmit(key, data, addr, timeout * 2, count + 1)

    def _peer_answered(self, key: int) -> None:
        timer = self._awaiting_ack.pop(key, None)
        if timer is not None:
            timer.cancel()
