"""Observe (RFC 7641) on the server side, sans-IO: relations, sequence numbers, which message
type each notification travels in, at most one confirmable notification in flight, and the
limits.

:class:`Observers` is pure state over a clock the caller supplies, like the endpoint
(:mod:`proxy.coap.endpoint`). It never sends: it says what to send. The asyncio glue
(:mod:`proxy.observing`) asks it

- :meth:`Observers.register` when a GET with Observe=0 on an observable route got a 2.xx answer
  (None: over a limit, the answer goes out without Observe, §4.1 allows it),
- :meth:`Observers.first_answer` for the registration answer (Observe = sequence number),
- :meth:`Observers.offer` for each new representation fetched from the origin: a
  :class:`Notification` to send, a replacement for the confirmable one still in flight
  (§4.5.2), or nothing (same representation, or an empty one on an acknowledged queue),
- :meth:`Observers.outcome` when the device acknowledged, reset or never acknowledged a
  notification (§3.6, §4.5),

and removes relations by :meth:`Observers.remove` (Observe=1, a GET without Observe with the
same token, §3.6). A relation's key is (peer endpoint or PSK identity, token) (§3.1, §4.1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from proxy.coap import codes
from proxy.coap import options as opt
from proxy.coap.codec import parse_uint, uint_bytes
from proxy.coap.requests import Request, Response

# RFC 7641 §4.4: 24-bit sequence numbers.
SEQUENCE_MODULO = 1 << 24
# RFC 7641 §4.5: a server that notifies mostly in NON messages sends a CON at least this often.
CON_INTERVAL = 24 * 3600.0
# The Observe values of a request (§2).
REGISTER = 0
DEREGISTER = 1

# Outcomes of a sent notification (reported by the endpoint).
ACKED = 0
RESET = 1
GAVE_UP = 2

# What :meth:`Observers.offer` decides.
SEND = 0  # a new notification: send it
REPLACE = 1  # a CON of this relation is in flight: this one replaces it (§4.5.2)


class LimitReached(Exception):
    """Over --max-observers-per-device or --max-observers (the answer goes without Observe)."""


def observe_value(request: Request) -> int | None:
    """The request's Observe option (§2), None when absent or not a uint of 0–3 bytes."""
    for number, value in request.message.options:
        if number == opt.OBSERVE:
            return parse_uint(value) if len(value) <= 3 else None
        if number > opt.OBSERVE:
            break
    return None


def block2_num(request: Request) -> tuple[int, int] | None:
    """(NUM, SZX) of the request's Block2 option, None without one."""
    for number, value in request.message.options:
        if number == opt.BLOCK2:
            raw = parse_uint(value)
            return raw >> 4, raw & 0x07
    return None


def device_of(request: Request) -> str:
    """Who a relation belongs to for the per-device limit: the PSK identity over DTLS, else the
    source address (docs/CONTRACT.md §2)."""
    return "id:" + request.identity if request.identity is not None else request.peer[0]


def relation_key(request: Request) -> tuple[str, bytes]:
    """(peer endpoint or PSK identity, token): the key of a relation (RFC 7641 §3.1, §4.1)."""
    who = (
        "id:" + request.identity
        if request.identity is not None
        else f"{request.peer[0]}:{request.peer[1]}"
    )
    return who, request.message.token


@dataclass(frozen=True, slots=True)
class ObserveRoute:
    """What a handler says about an observable route for one request."""

    # The origin path the change feed names (the route's target, expanded).
    origin_path: str
    # Every notification is a CON (the device confirms each, RFC 7641 §4.5).
    confirmable: bool
    # The representations are a queue the device consumes: an ACKed notification is
    # acknowledged to the origin (docs: obs contract §4); empty ones are not notified.
    acknowledged: bool


@dataclass(slots=True, eq=False)
class Relation:
    key: tuple[str, bytes]
    device: str
    request: Request  # the registration, replayed (Observe removed) to fetch new states
    route: ObserveRoute
    registered: float
    sequence: int = 0
    # What the device was last sent (ETag, else a digest of code, format and payload) and the
    # Content-Format the relation was established with (§4.2: a change ends it, 4.06).
    last_tag: bytes | None = None
    content_format: int | None = None
    last_con: float = 0.0
    in_flight: Response | None = None  # the CON notification not yet acknowledged
    active: bool = True
    # Driver-side state (proxy/observing.py): where notifications go (the address the
    # registration came from), who sends them, a refresh running, another one wanted.
    peer: tuple[Any, ...] = ()
    owner: Any = None
    refreshing: bool = False
    stale: bool = False


def relation_record_id(relation: Relation) -> str:
    """The relation's name in the shared records (stores/relations.py): device and token."""
    return f"{relation.key[0]}|{relation.key[1].hex()}"


@dataclass(frozen=True, slots=True)
class Notification:
    relation: Relation
    action: int  # SEND or REPLACE
    confirmable: bool
    response: Response
    final: bool  # an error or 4.06: the relation ends once it is sent (§4.2)


def _content_format(response: Response) -> int | None:
    for number, value in response.options:
        if number == opt.CONTENT_FORMAT:
            return parse_uint(value)
    return None


def _etag(response: Response) -> bytes | None:
    for number, value in response.options:
        if number == opt.ETAG:
            return value
    return None


def state_tag(response: Response) -> bytes:
    """What tells two representations apart: the origin's ETag, else a digest of the code, the
    Content-Format and the payload (obs contract §3: "differs (ETag, else body)")."""
    etag = _etag(response)
    if etag is not None:
        return b"e" + etag
    digest = hashlib.blake2b(digest_size=12)
    digest.update(bytes((response.code,)))
    cf = _content_format(response)
    digest.update(b"-" if cf is None else uint_bytes(cf))
    digest.update(response.payload)
    return b"d" + digest.digest()


def with_observe(response: Response, sequence: int) -> Response:
    """``response`` with the Observe option (a new Response: handlers may share theirs)."""
    options = [o for o in response.options if o[0] != opt.OBSERVE]
    options.append((opt.OBSERVE, uint_bytes(sequence)))
    options.sort(key=lambda o: o[0])
    return Response(response.code, options, response.payload, response.size)


def without_observe(response: Response) -> Response:
    if not any(number == opt.OBSERVE for number, _ in response.options):
        return response
    options = [o for o in response.options if o[0] != opt.OBSERVE]
    return Response(response.code, options, response.payload, response.size)


class Observers:
    """Every relation of one proxy process (both transports), bounded."""

    def __init__(
        self,
        *,
        max_per_device: int = 4,
        max_total: int = 100_000,
        con_interval: float = CON_INTERVAL,
    ) -> None:
        self.max_per_device = max_per_device
        self.max_total = max_total
        self.con_interval = con_interval
        self._relations: dict[tuple[str, bytes], Relation] = {}
        self._per_device: dict[str, int] = {}
        self._by_path: dict[str, dict[tuple[str, bytes], Relation]] = {}
        # Told of every relation that starts (True) or ends (False): the shared records of
        # which replica holds what (stores/relations.py).
        self.listener: Callable[[Relation, bool], None] | None = None

    def __len__(self) -> int:
        return len(self._relations)

    def __iter__(self) -> Iterator[Relation]:
        return iter(list(self._relations.values()))

    def get(self, key: tuple[str, bytes]) -> Relation | None:
        return self._relations.get(key)

    def on_path(self, origin_path: str) -> list[Relation]:
        """The relations whose resource is ``origin_path`` (what a change event names)."""
        found = self._by_path.get(origin_path)
        return list(found.values()) if found else []

    def register(self, request: Request, route: ObserveRoute, now: float) -> Relation:
        """A new relation for ``request`` (replacing one with the same key, §4.1: "the entry
        in the list of observers is updated"); :class:`LimitReached` over a limit."""
        key = relation_key(request)
        device = device_of(request)
        old = self._relations.get(key)
        count = self._per_device.get(device, 0) - (1 if old is not None else 0)
        if count >= self.max_per_device:
            raise LimitReached(f"{count} relations for {device}")
        if old is None and len(self._relations) >= self.max_total:
            raise LimitReached(f"{len(self._relations)} relations in all")
        relation = Relation(key, device, request, route, now, last_con=now)
        if old is not None:
            # The numbers go on increasing across the re-registration (§4.4).
            relation.sequence = old.sequence
            self.remove(old)
        self._relations[key] = relation
        self._per_device[device] = self._per_device.get(device, 0) + 1
        self._by_path.setdefault(route.origin_path, {})[key] = relation
        if self.listener is not None:
            self.listener(relation, True)
        return relation

    def remove(self, relation: Relation) -> bool:
        """End a relation; False when it had ended already. Nothing is sent for it after."""
        if self._relations.get(relation.key) is not relation:
            relation.active = False
            return False
        relation.active = False
        del self._relations[relation.key]
        left = self._per_device[relation.device] - 1
        if left:
            self._per_device[relation.device] = left
        else:
            del self._per_device[relation.device]
        on_path = self._by_path[relation.route.origin_path]
        del on_path[relation.key]
        if not on_path:
            del self._by_path[relation.route.origin_path]
        if self.listener is not None:
            self.listener(relation, False)
        return True

    def _next_sequence(self, relation: Relation) -> int:
        relation.sequence = (relation.sequence + 1) % SEQUENCE_MODULO
        return relation.sequence

    def first_answer(self, relation: Relation, response: Response, now: float) -> Response:
        """The registration's 2.xx answer with Observe (§3.1, §4.1); what it carries is what
        the device has seen."""
        relation.last_tag = state_tag(response)
        relation.content_format = _content_format(response)
        return with_observe(response, self._next_sequence(relation))

    def confirm_first(self, relation: Relation, response: Response) -> bool:
        """Whether the registration answer must travel as a CON of its own (the device's ACK
        is the delivery that an acknowledged route reports): a queue entry (with an ETag)."""
        return relation.route.acknowledged and _etag(response) is not None

    def confirmable_now(self, relation: Relation, now: float) -> bool:
        """CON for routes that want every notification confirmed, and at least one per
        ``con_interval`` otherwise (§4.5)."""
        return relation.route.confirmable or now - relation.last_con >= self.con_interval

    def offer(self, relation: Relation, response: Response, now: float) -> Notification | None:
        """A representation fetched from the origin after a change: what to send, if anything.

        - An error, or a 2.xx in another Content-Format than the relation was established
          with (4.06), ends the relation: sent once, without Observe (§4.2; TD_COAP_OBS_07,
          _08). Not on acknowledged routes: each queue entry has its own format.
        - The same representation as last sent: nothing.
        - An empty representation without ETag on an acknowledged route: nothing (the queue
          is empty; only the registration answer may be empty).
        - A CON still in flight: the new notification replaces it (§4.5.2: never more than
          one CON in flight, the newest state wins).
        """
        if not relation.active:
            return None
        if response.code >= codes.BAD_REQUEST or not 64 <= response.code < 96:
            return self._final(relation, without_observe(response), now)
        cf = _content_format(response)
        if cf != relation.content_format:
            if (
                relation.content_format is not None
                and response.payload
                and not relation.route.acknowledged
            ):
                return self._final(relation, Response(codes.NOT_ACCEPTABLE), now)
            # The first representation with a format (the registration answer was empty), or
            # a queue whose entries each carry their own format (commands).
            relation.content_format = cf
        tag = state_tag(response)
        if tag == relation.last_tag:
            return None
        if relation.route.acknowledged and _etag(response) is None and not response.payload:
            relation.last_tag = tag
            return None
        relation.last_tag = tag
        notification = with_observe(response, self._next_sequence(relation))
        if relation.in_flight is not None:
            relation.in_flight = notification
            return Notification(relation, REPLACE, True, notification, False)
        confirmable = self.confirmable_now(relation, now)
        if confirmable:
            relation.in_flight = notification
            relation.last_con = now
        return Notification(relation, SEND, confirmable, notification, False)

    def _final(self, relation: Relation, response: Response, now: float) -> Notification:
        confirmable = relation.in_flight is not None or self.confirmable_now(relation, now)
        action = REPLACE if relation.in_flight is not None else SEND
        self.remove(relation)
        return Notification(relation, action, confirmable, response, True)

    def sent_confirmable(self, relation: Relation, response: Response, now: float) -> None:
        """The registration answer went out as a CON of its own (it is in flight)."""
        relation.in_flight = response
        relation.last_con = now

    def outcome(self, relation: Relation, kind: int, response: Response | None) -> None:
        """The device acknowledged (ACKED), reset (RESET, §3.6) or never acknowledged
        (GAVE_UP, §4.5) ``response`` of this relation; the latter two end it. An ACK for a
        notification that a newer one replaced leaves the newer one in flight."""
        if kind != ACKED:
            relation.in_flight = None
            self.remove(relation)
        elif response is None or relation.in_flight is response:
            relation.in_flight = None
