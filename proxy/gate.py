"""The gate between the CoAP endpoint and the handler: who, of all replicas, handles a request.

The endpoint (:mod:`proxy.coap.endpoint`) deduplicates what reaches this process (RFC 7252
§4.5); a device's retransmission can reach another replica, though. With a shared
:class:`~stores.ledger.Ledger` (``--redis-url``) the gate claims each new exchange there
before the handler runs (docs/ARCHITECTURE.md, docs/CONTRACT.md §5):

- OWNED: this replica handles it; its answer is written to the store, so a retransmission that
  reaches another replica gets the very same bytes;
- BUSY: another replica holds the claim: silence here (state ELSEWHERE), so that the device's
  retransmission asks again, by when the answer is stored or the lease has lapsed;
- bytes: another replica answered: replay them;
- the store down: handled on local dedup alone, logged once per outage, and the store is not
  asked again for ``retry_after`` seconds, so an outage costs one timeout, not one per request.

The claim is skipped where it buys nothing (issue 13 §4): when ``handler.needs_claim(request)``
is False — what the proxy answers itself, and safe methods on routes the policy marks
idempotent — the local exchange cache is all the deduplication needed, and nothing is written
to the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from proxy.coalesce import Coalescer
from proxy.coap.codec import CON
from proxy.coap.endpoint import MessagingStats
from proxy.coap.exchanges import EXCHANGE_LIFETIME, NON_LIFETIME, Exchange
from proxy.coap.requests import Request, RequestHandler
from stores.ledger import Claim, Ledger, LedgerUnavailable, Outcome

log = logging.getLogger(__name__)


class Gate:
    def __init__(
        self,
        handler: RequestHandler,
        ledger: Ledger,
        key: Callable[[str, int, int, str | None], str],
        *,
        lease: float = 10.0,
        max_batch: int = 512,
        retry_after: float = 1.0,
        stats: MessagingStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``key`` names an exchange in the ledger from (ip, port, MID, PSK identity)
        (``stores.keys.dedup_key``). ``lease`` bounds a claim: a replica that dies after
        claiming blocks the exchange for at most that long. Concurrent claims go to the ledger
        together, up to ``max_batch`` in one call (proxy/coalesce.py). ``stats``: the
        endpoint's, so that one object counts the whole messaging layer."""
        self._handler = handler
        self.ledger = ledger
        self._claims: Coalescer[str, Outcome] = Coalescer(
            self._claim_batch, max_batch=max_batch, max_concurrency=1, name="dedup"
        )
        self._key = key
        self._lease = lease
        self._retry_after = retry_after
        self._clock = clock
        self._down_until = -float("inf")
        self._down = False
        self.stats = stats if stats is not None else MessagingStats()

    def key_for(self, request: Request) -> str | None:
        """The store's key for the exchange of ``request``, or None when it needs no claim."""
        if not self._handler.needs_claim(request):
            self.stats.claims_skipped += 1
            return None
        peer = request.peer
        return self._key(peer[0], peer[1], request.message.mid, request.identity)

    async def _claim_batch(self, keys: list[str]) -> list[Outcome]:
        return await self.ledger.claim(keys, self._lease)

    async def claim(self, exchange: Exchange, key: str) -> Outcome:
        """OWNED, BUSY, or the bytes another replica answered with. OWNED also while the
        store is down; the answer is still written if the store is back by then."""
        exchange.claim = key
        now = self._clock()
        if now < self._down_until:
            self.stats.shared_unavailable += 1
            return Claim.OWNED
        try:
            result = await self._claims.submit(key)
        except LedgerUnavailable as exc:
            self.stats.shared_unavailable += 1
            self._down_until = now + self._retry_after
            if not self._down:
                self._down = True
                log.warning(
                    "shared dedup unavailable, serving with local dedup only "
                    "(a retransmission reaching another replica may be processed twice): %s",
                    exc,
                )
            return Claim.OWNED
        if self._down:
            self._down = False
            log.warning("shared dedup available again")
        if result is Claim.BUSY:
            self.stats.shared_busy += 1
        elif result is not Claim.OWNED:
            self.stats.shared_replays += 1
        return result

    def answered(self, exchange: Exchange) -> None:
        """The endpoint answered ``exchange``: what its duplicates get, on every replica."""
        key = exchange.claim
        if key is not None and not self._down:
            lifetime = EXCHANGE_LIFETIME if exchange.message.mtype == CON else NON_LIFETIME
            self.ledger.record(key, exchange.record, lifetime)
