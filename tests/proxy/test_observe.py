"""RFC 7641 on the server side without sockets: the relations (proxy/coap/observe.py) and the
endpoint's notifications (proxy/coap/endpoint.py: notify, replace, outcomes by MID)."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import observing
from proxy.coap import codes
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, NON, RST, Message, decode, encode_empty, uint_bytes
from proxy.coap.codes import GET
from proxy.coap.endpoint import ACKED, GAVE_UP, RESET, Endpoint
from proxy.coap.observe import (
    CON_INTERVAL,
    REPLACE,
    SEND,
    SEQUENCE_MODULO,
    LimitReached,
    Notification,
    ObserveRoute,
    Observers,
    observe_value,
)
from proxy.coap.requests import Request, Response

PEER = ("192.0.2.1", 5683)
CON_ROUTE = ObserveRoute("/obs", confirmable=True, acknowledged=False)
NON_ROUTE = ObserveRoute("/obs", confirmable=False, acknowledged=False)
ACK_ROUTE = ObserveRoute("/commands/1", confirmable=True, acknowledged=True)


def request(token: bytes = b"t1", peer: tuple[str, int] = PEER, observe: int | None = 0) -> Request:
    options = [] if observe is None else [(opt.OBSERVE, uint_bytes(observe))]
    message = Message(CON, GET, 1, token, options, b"")
    return Request(GET, "/obs", [], message, peer)


def content(payload: bytes, cf: int = 0, etag: bytes | None = None) -> Response:
    options = [(opt.CONTENT_FORMAT, uint_bytes(cf))]
    if etag is not None:
        options.insert(0, (opt.ETAG, etag))
    return Response(codes.CONTENT, options, payload)


def observe_of(response: Response) -> int | None:
    return next((int.from_bytes(v, "big") for n, v in response.options if n == opt.OBSERVE), None)


def test_observe_value_reads_the_option() -> None:
    assert observe_value(request(observe=0)) == 0
    assert observe_value(request(observe=1)) == 1
    assert observe_value(request(observe=None)) is None


def test_registration_answer_carries_observe_and_notifications_increase() -> None:
    observers = Observers()
    relation = observers.register(request(), NON_ROUTE, 0.0)
    first = observers.first_answer(relation, content(b"a"), 0.0)
    assert observe_of(first) is not None
    note = observers.offer(relation, content(b"b"), 1.0)
    assert note is not None
    assert note.action == SEND
    assert not note.confirmable
    assert observe_of(note.response) == observe_of(first) + 1  # type: ignore[operator]


def test_the_same_representation_is_not_notified_again() -> None:
    observers = Observers()
    relation = observers.register(request(), NON_ROUTE, 0.0)
    observers.first_answer(relation, content(b"a", etag=b"1"), 0.0)
    assert observers.offer(relation, content(b"a", etag=b"1"), 1.0) is None
    assert observers.offer(relation, content(b"a", etag=b"2"), 1.0) is not None


def test_one_con_in_flight_and_a_newer_state_replaces_it() -> None:
    observers = Observers()
    relation = observers.register(request(), CON_ROUTE, 0.0)
    observers.first_answer(relation, content(b"a"), 0.0)
    first = observers.offer(relation, content(b"b"), 1.0)
    assert first is not None
    assert first.action == SEND
    assert first.confirmable
    second = observers.offer(relation, content(b"c"), 2.0)
    assert second is not None
    assert second.action == REPLACE
    # An ACK of the replaced one leaves the newer one in flight; its own ACK frees the slot.
    observers.outcome(relation, ACKED, first.response)
    assert relation.in_flight is second.response
    observers.outcome(relation, ACKED, second.response)
    assert relation.in_flight is None


def test_a_con_at_least_every_24_hours() -> None:
    observers = Observers()
    relation = observers.register(request(), NON_ROUTE, 0.0)
    observers.first_answer(relation, content(b"a"), 0.0)
    note = observers.offer(relation, content(b"b"), CON_INTERVAL - 1)
    assert note is not None
    assert not note.confirmable
    note = observers.offer(relation, content(b"c"), CON_INTERVAL)
    assert note is not None
    assert note.confirmable


def test_errors_and_a_new_content_format_end_the_relation_without_observe() -> None:
    observers = Observers()
    relation = observers.register(request(), CON_ROUTE, 0.0)
    observers.first_answer(relation, content(b"a", cf=0), 0.0)
    note = observers.offer(relation, content(b"<a/>", cf=41), 1.0)
    assert note is not None
    assert note.final
    assert note.response.code == codes.NOT_ACCEPTABLE
    assert observe_of(note.response) is None
    assert not relation.active
    assert len(observers) == 0
    assert observers.offer(relation, content(b"b"), 2.0) is None  # nothing after the end
    relation = observers.register(request(token=b"t2"), CON_ROUTE, 0.0)
    observers.first_answer(relation, content(b"a"), 0.0)
    note = observers.offer(relation, Response(codes.NOT_FOUND), 1.0)
    assert note is not None
    assert note.final
    assert note.response.code == codes.NOT_FOUND


def test_reset_and_give_up_end_the_relation() -> None:
    observers = Observers()
    for kind, token in ((RESET, b"r"), (GAVE_UP, b"g")):
        relation = observers.register(request(token=token), CON_ROUTE, 0.0)
        observers.outcome(relation, kind, None)
        assert not relation.active
        assert observers.get(relation.key) is None


def test_an_acknowledged_route_skips_empty_states_and_keeps_each_entrys_format() -> None:
    observers = Observers()
    relation = observers.register(request(), ACK_ROUTE, 0.0)
    first = observers.first_answer(relation, Response(codes.CONTENT), 0.0)
    assert not observers.confirm_first(relation, first)
    note = observers.offer(relation, content(b"{}", cf=50, etag=b"c1"), 1.0)
    assert note is not None
    assert note.confirmable
    observers.outcome(relation, ACKED, note.response)
    assert observers.offer(relation, Response(codes.CONTENT), 2.0) is None
    note = observers.offer(relation, content(b"\x01", cf=42, etag=b"c2"), 3.0)
    assert note is not None
    assert not note.final


def test_limits_per_device_and_in_total() -> None:
    observers = Observers(max_per_device=2, max_total=3)
    observers.register(request(token=b"1"), NON_ROUTE, 0.0)
    observers.register(request(token=b"2", peer=("192.0.2.1", 9)), NON_ROUTE, 0.0)
    try:
        observers.register(request(token=b"3"), NON_ROUTE, 0.0)
        raise AssertionError("a third relation for one device")
    except LimitReached:
        pass
    # The same key again replaces (not counted twice).
    observers.register(request(token=b"1"), NON_ROUTE, 0.0)
    observers.register(request(token=b"1", peer=("192.0.2.2", 1)), NON_ROUTE, 0.0)
    try:
        observers.register(request(token=b"9", peer=("192.0.2.3", 1)), NON_ROUTE, 0.0)
        raise AssertionError("over the total")
    except LimitReached:
        pass
    assert len(observers) == 3


@given(st.lists(st.binary(min_size=1, max_size=4), min_size=1, max_size=40))
def test_sequence_numbers_are_fresh_in_24_bit_arithmetic(states: list[bytes]) -> None:
    observers = Observers()
    relation = observers.register(request(), NON_ROUTE, 0.0)
    relation.sequence = SEQUENCE_MODULO - 5  # across the wrap
    last = observe_of(observers.first_answer(relation, content(b"start"), 0.0))
    assert last is not None
    for n, payload in enumerate(states):
        note = observers.offer(relation, content(payload + b"%d" % n), float(n))
        assert note is not None
        value = observe_of(note.response)
        assert value is not None
        assert value < SEQUENCE_MODULO
        assert 0 < (value - last) % SEQUENCE_MODULO < SEQUENCE_MODULO // 2
        last = value


# -- the endpoint ---------------------------------------------------------------------------


def test_a_con_notification_is_retransmitted_replaced_and_acked_by_mid() -> None:
    ep = Endpoint(rng=random.Random(1), ack_timeout=1.0)
    tag = object()
    data = ep.notify(PEER, b"t", content(b"a"), True, 0.0, tag)
    sent = decode(data)
    assert sent.mtype == CON
    assert sent.token == b"t"
    assert ep.replace(tag, content(b"b"))
    due = ep.timeout(1.6)  # the first retransmission (ACK_TIMEOUT 1 s × 1–1.5)
    assert len(due) == 1
    newer = decode(due[0][0])
    assert newer.payload == b"b"
    assert newer.mid != sent.mid
    assert ep.receive(encode_empty(ACK, sent.mid), PEER, 1.7) is None  # the old MID: stale
    assert ep.take_outcomes() == []
    ep.receive(encode_empty(ACK, newer.mid), PEER, 1.8)
    [(got, kind, _)] = ep.take_outcomes()
    assert got is tag
    assert kind == ACKED
    assert ep.awaiting_ack == 0


def test_an_ack_before_the_replacement_went_out_sends_it_at_once() -> None:
    ep = Endpoint(rng=random.Random(2))
    tag = object()
    first = decode(ep.notify(PEER, b"t", content(b"a"), True, 0.0, tag))
    ep.replace(tag, content(b"b"))
    out = ep.receive(encode_empty(ACK, first.mid), PEER, 0.5)
    assert isinstance(out, bytes)
    assert decode(out).payload == b"b"
    assert ep.take_outcomes()[0][1] == ACKED
    assert ep.awaiting_ack == 1


def test_a_reset_to_a_non_notification_is_reported() -> None:
    ep = Endpoint(rng=random.Random(3))
    tag = object()
    sent = decode(ep.notify(PEER, b"t", content(b"a"), False, 0.0, tag))
    assert sent.mtype == NON
    ep.receive(encode_empty(RST, sent.mid), PEER, 1.0)
    assert ep.take_outcomes() == [(tag, RESET, None)]


def test_a_con_notification_never_acknowledged_is_given_up() -> None:
    ep = Endpoint(rng=random.Random(4), ack_timeout=1.0, max_retransmit=2)
    tag = object()
    ep.notify(PEER, b"t", content(b"a"), True, 0.0, tag)
    sent, outcomes = 0, []
    for now in range(1, 60):
        sent += len(ep.timeout(float(now)))
        outcomes += ep.take_outcomes()
    assert sent == 2
    assert [kind for _, kind, _ in outcomes] == [GAVE_UP]
    assert ep.awaiting_ack == 0


def test_forget_stops_retransmission() -> None:
    ep = Endpoint(rng=random.Random(5), ack_timeout=1.0)
    tag = object()
    ep.notify(PEER, b"t", content(b"a"), True, 0.0, tag)
    ep.forget(tag)
    assert ep.timeout(100.0) == []
    assert ep.awaiting_ack == 0


class _FlakyOrigin:
    """A handler whose origin answers 5.03, then 5.02, then the new state (a unit test of the
    retry rule: the answers are the point, not the transport)."""

    def __init__(self, answers: list[Response]) -> None:
        self.answers = answers
        self.fetches = 0

    async def handle(self, request: Request) -> Response:
        self.fetches += 1
        return self.answers.pop(0)

    def observe_route(self, request: Request) -> ObserveRoute | None:
        return NON_ROUTE

    async def acknowledge(self, request: Request, etag: bytes) -> int:
        raise AssertionError("not an acknowledged route")


class _Driver:
    def __init__(self) -> None:
        self.sent: list[Response] = []

    def notify(self, note: Notification) -> None:
        self.sent.append(note.response)


async def test_a_fetch_the_origin_could_not_answer_is_tried_again_not_notified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(observing, "FETCH_RETRY_FIRST", 0.01)
    observers = Observers()
    relation = observers.register(request(), NON_ROUTE, 0.0)
    observers.first_answer(relation, content(b"old"), 0.0)
    origin = _FlakyOrigin(
        [Response(codes.SERVICE_UNAVAILABLE), Response(codes.BAD_GATEWAY), content(b"new")]
    )
    driver = _Driver()
    watcher = observing.Observing(observers, origin)
    watcher.bind(driver)  # type: ignore[arg-type]
    watcher.refresh(relation)  # one change announced, once
    for _ in range(200):
        if driver.sent:
            break
        await asyncio.sleep(0.01)
    await watcher.aclose()
    assert origin.fetches == 3
    assert [r.payload for r in driver.sent] == [b"new"]  # the errors were never notified
    assert relation.active
