"""Local deduplication of incoming exchanges (RFC 7252 §4.5).

An entry is created when a CON or NON is first seen and kept at least EXCHANGE_LIFETIME (CON)
or NON_LIFETIME (NON). While the request is in flight the entry holds its :class:`Exchange`;
afterwards it holds the exact bytes sent, so a duplicate CON gets the very same response again.

Memory per entry is what a busy proxy pays for 247 s, so the layout is lean (measured in
``tests/proxy/test_exchanges.py``): the key is one int packing (address family, IP, port, MID),
the value is the response ``bytes`` itself, and expiry is tracked in one-second buckets (a list
of keys per second) instead of a timestamp per entry. An entry may so live up to one bucket
longer than its lifetime, never shorter.

Memory is bounded twice over: entries expire, and the table never holds more than
``max_entries`` (the oldest go first when it is full).
"""

from __future__ import annotations

import socket
from collections import deque

from proxy.coap.codec import CON, Message
from proxy.coap.requests import Request

# RFC 7252 §4.8.2 with the default transmission parameters.
EXCHANGE_LIFETIME = 247.0
NON_LIFETIME = 145.0
BUCKET_SECONDS = 1.0

_IPV6_FLAG = 1 << 128
_INF = float("inf")


def peer_key(ip: str, port: int, mid: int) -> int:
    """(ip, port, MID) as one int; IPv4 and IPv6 addresses never collide."""
    try:
        address = int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except OSError:
        # IPv6, possibly with a zone ("fe80::1%eth0"): the zone is part of the peer.
        host, _, zone = ip.partition("%")
        address = _IPV6_FLAG | int.from_bytes(socket.inet_pton(socket.AF_INET6, host), "big")
        if zone:
            address |= (hash(zone) & 0xFFFF_FFFF) << 129
    return (address << 32) | (port << 16) | mid


HANDLING = 0  # this replica is processing the request
CHECKING = 1  # the gate (proxy/gate.py) is asking the shared store who processes it
ELSEWHERE = 2  # another replica holds the claim and has not answered yet
ANSWERED = 3  # the final response went out (the cache entry holds its bytes from then on)


def identity_key(identity: str, mid: int) -> int:
    """(PSK identity, MID) as one int, negative so it never meets a :func:`peer_key`."""
    return -((int.from_bytes(b"\x01" + identity.encode(), "big") << 16) | mid) - 1


class Exchange:
    """A request not answered yet: the cache entry while in flight, and the handle a handler's
    answer is given back with (proxy/coap/endpoint.py). ``request`` is None for a request
    refused by its datagram alone (answered at once). ``record``: what a duplicate gets once
    answered (the gate writes it to the shared store). ``claim``: the shared store's key when
    the gate claimed the exchange. The token (``message.token``) is what later answers to the
    same request (RFC 7641 notifications) are matched by at the client."""

    __slots__ = ("acked", "claim", "key", "message", "peer", "record", "request", "state")

    def __init__(
        self,
        key: int,
        peer: tuple[str, int],
        message: Message,
        request: Request | None,
        state: int = HANDLING,
    ) -> None:
        self.key = key
        self.peer = peer
        self.message = message
        self.request = request
        self.state = state
        # True once an empty ACK went out (the final response then travels as a separate CON).
        self.acked = False
        self.record = b""
        self.claim: str | None = None

    @property
    def token(self) -> bytes:
        return self.message.token


Entry = Exchange | bytes


class _Lifetimes:
    """Keys in one-second buckets, oldest first, for one lifetime class."""

    __slots__ = ("buckets", "lifetime")

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.buckets: deque[tuple[float, list[int]]] = deque()

    def add(self, key: int, now: float) -> None:
        start = now - now % BUCKET_SECONDS
        buckets = self.buckets
        if buckets and buckets[-1][0] == start:
            buckets[-1][1].append(key)
        else:
            buckets.append((start, [key]))

    def pop_expired(self, now: float) -> list[int] | None:
        buckets = self.buckets
        # A bucket's newest key arrived just before start + BUCKET_SECONDS.
        if buckets and buckets[0][0] + BUCKET_SECONDS + self.lifetime <= now:
            return buckets.popleft()[1]
        return None

    def next_expiry(self) -> float:
        buckets = self.buckets
        return buckets[0][0] + BUCKET_SECONDS + self.lifetime if buckets else _INF

    def oldest(self) -> float:
        return self.buckets[0][0] if self.buckets else float("inf")

    def pop_oldest_key(self) -> int | None:
        buckets = self.buckets
        while buckets:
            keys = buckets[0][1]
            if keys:
                return keys.pop()
            buckets.popleft()
        return None


class ExchangeCache:
    def __init__(
        self,
        *,
        max_entries: int = 1_000_000,
        exchange_lifetime: float = EXCHANGE_LIFETIME,
        non_lifetime: float = NON_LIFETIME,
    ) -> None:
        self._entries: dict[int, Entry] = {}
        self._con = _Lifetimes(exchange_lifetime)
        self._non = _Lifetimes(non_lifetime)
        self._max_entries = max_entries
        # When expire() next has work, as far as add() is concerned: one comparison per add
        # instead of a look at the buckets (the endpoint's timer also calls expire()). It may
        # lag (a NON added to a table holding only CON entries is dropped when the oldest CON
        # bucket is), never lead.
        self._expiry = _INF

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: int) -> Entry | None:
        return self._entries.get(key)

    def add(self, key: int, mtype: int, now: float, exchange: Exchange) -> None:
        """Record a new exchange as in flight. The caller has checked ``key`` is absent."""
        if now >= self._expiry:
            self.expire(now)
        entries = self._entries
        if len(entries) >= self._max_entries:
            self._evict_oldest()
        entries[key] = exchange
        (self._con if mtype == CON else self._non).add(key, now)
        if self._expiry == _INF:
            self._expiry = self.next_expiry()

    def complete(self, key: int, response: bytes) -> None:
        """Replace the in-flight marker by the bytes to replay (unless evicted meanwhile)."""
        if key in self._entries:
            self._entries[key] = response

    def expire(self, now: float) -> None:
        entries = self._entries
        for lifetimes in (self._con, self._non):
            while (keys := lifetimes.pop_expired(now)) is not None:
                for key in keys:
                    entries.pop(key, None)
        self._expiry = self.next_expiry()

    def next_expiry(self) -> float:
        """When :meth:`expire` next has something to drop (inf: nothing is kept)."""
        con, non = self._con.next_expiry(), self._non.next_expiry()
        return con if con < non else non

    def _evict_oldest(self) -> None:
        # The entry in the oldest bucket has had the most of its lifetime.
        lifetimes = self._con if self._con.oldest() <= self._non.oldest() else self._non
        key = lifetimes.pop_oldest_key()
        if key is not None:
            self._entries.pop(key, None)
