"""Local deduplication of incoming exchanges (RFC 7252 §4.5).

An entry is created when a CON or NON is first seen and kept for EXCHANGE_LIFETIME (CON) or
NON_LIFETIME (NON). While the request is in flight the entry has no response; afterwards it
holds the exact bytes sent, so a duplicate CON gets the very same response again.

Memory is bounded twice over: entries expire (each lifetime class has a FIFO of expiry times,
which is already in expiry order because the lifetime is constant), and the table never holds
more than ``max_entries`` (the oldest entries go first when it is full).
"""

from __future__ import annotations

from collections import deque

from proxy.coap.codec import CON

# RFC 7252 §4.8.2 with the default transmission parameters.
EXCHANGE_LIFETIME = 247.0
NON_LIFETIME = 145.0

PeerKey = tuple[str, int, int]  # (ip, port, MID)


class Exchange:
    """What is remembered about one incoming request."""

    __slots__ = ("acked", "response")

    def __init__(self) -> None:
        # Encoded response to replay for a duplicate; None while the request is in flight.
        self.response: bytes | None = None
        # True once an empty ACK went out (the final response then travels as a separate CON).
        self.acked = False


class ExchangeCache:
    def __init__(
        self,
        *,
        max_entries: int = 1_000_000,
        exchange_lifetime: float = EXCHANGE_LIFETIME,
        non_lifetime: float = NON_LIFETIME,
    ) -> None:
        self._entries: dict[PeerKey, Exchange] = {}
        self._con_expiry: deque[tuple[float, PeerKey]] = deque()
        self._non_expiry: deque[tuple[float, PeerKey]] = deque()
        self._max_entries = max_entries
        self._exchange_lifetime = exchange_lifetime
        self._non_lifetime = non_lifetime

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: PeerKey) -> Exchange | None:
        return self._entries.get(key)

    def add(self, key: PeerKey, mtype: int, now: float) -> Exchange:
        """Record a new exchange. The caller has checked that ``key`` is not present."""
        self.expire(now)
        entries = self._entries
        if len(entries) >= self._max_entries:
            self._evict_oldest()
        exchange = Exchange()
        entries[key] = exchange
        if mtype == CON:
            self._con_expiry.append((now + self._exchange_lifetime, key))
        else:
            self._non_expiry.append((now + self._non_lifetime, key))
        return exchange

    def expire(self, now: float) -> None:
        for queue in (self._con_expiry, self._non_expiry):
            while queue and queue[0][0] <= now:
                _, key = queue.popleft()
                self._entries.pop(key, None)

    def _evict_oldest(self) -> None:
        con, non = self._con_expiry, self._non_expiry
        # The entry expiring soonest is the one that has had the most of its lifetime.
        queue = con if con and (not non or con[0][0] <= non[0][0]) else non
        if queue:
            _, key = queue.popleft()
            self._entries.pop(key, None)
