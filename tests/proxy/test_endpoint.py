"""The sans-IO endpoint (proxy/coap/endpoint.py): RFC 7252 §4 messaging without sockets or a loop.

Every test feeds datagrams and a clock and reads back the datagrams the endpoint decides to
send; the handler is the test itself (it calls ``respond`` when it wants). Tables give one row
per rule; a hypothesis state machine drives whole exchanges (a device sending, retransmitting,
acknowledging and resetting, time passing, answers coming early or late) and checks the
invariants of §4 after every step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import cast

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import ACK, CON, NON, RST, Message, decode, encode_empty, encode_parts
from proxy.coap.endpoint import MAX_RETRANSMIT, Endpoint
from proxy.coap.exchanges import CHECKING, ELSEWHERE, HANDLING, Exchange, ExchangeCache
from proxy.coap.requests import Response

PEER = ("192.0.2.1", 40000)
OTHER = ("192.0.2.2", 40000)
TOKEN = b"\xaa\xbb"
CHANGED = Response(status.CHANGED)
CONTENT = Response(status.CONTENT, [(opt.CONTENT_FORMAT, b"")], b"payload")


class LowRandom(random.Random):
    """The initial retransmission timeout at its lower bound, ACK_TIMEOUT (§4.2)."""

    def uniform(self, a: float, b: float) -> float:
        return a


def endpoint(**kwargs: object) -> Endpoint:
    kwargs.setdefault("rng", LowRandom(7))
    return Endpoint(**kwargs)  # type: ignore[arg-type]


def post(mid: int, mtype: int = CON, options=None, token: bytes = TOKEN) -> bytes:
    return encode_parts(mtype, status.POST, mid, token, options or [(11, b"data")], b"hi")


def message(data: bytes | None) -> Message:
    assert isinstance(data, bytes)
    return decode(data)


def exchange(event: object) -> Exchange:
    assert isinstance(event, Exchange), event
    return event


# -- what a datagram alone decides, one row per rule -------------------------------------------

FORMAT_ERRORS = [
    pytest.param(bytes([0x49, 0x02, 0x00, 0x10]) + bytes(9), id="tkl-9"),
    pytest.param(bytes([0x40, 0x02, 0x00, 0x10, 0xF1, 0x00]), id="delta-nibble-15"),
    pytest.param(bytes([0x40, 0x02, 0x00, 0x10, 0xB5, 0x61]), id="option-past-end"),
    pytest.param(bytes([0x40, 0x02, 0x00, 0x10, 0xFF]), id="marker-without-payload"),
]


@pytest.mark.parametrize("datagram", FORMAT_ERRORS)
def test_a_format_error_in_a_con_is_reset(datagram: bytes) -> None:
    ep = endpoint()
    assert message(ep.receive(datagram, PEER, 0.0)) == Message(RST, 0, 0x10)
    assert ep.stats.format_errors == 1


@pytest.mark.parametrize("datagram", FORMAT_ERRORS)
def test_a_format_error_in_a_non_is_dropped(datagram: bytes) -> None:
    ep = endpoint()
    assert ep.receive(bytes([datagram[0] | 0x10]) + datagram[1:], PEER, 0.0) is None
    assert ep.stats.format_errors == 1


# (datagram, the answer: None = silence, else (type, code, MID))
IMMEDIATE = [
    pytest.param(encode_empty(CON, 4242), (RST, 0, 4242), id="ping-is-reset"),
    pytest.param(encode_empty(NON, 4242), None, id="empty-non-ignored"),
    pytest.param(encode_empty(ACK, 4242), None, id="ack-for-nothing-ignored"),
    pytest.param(encode_empty(RST, 4242), None, id="rst-for-nothing-ignored"),
    pytest.param(
        encode_parts(CON, status.CONTENT, 7, b"", [], b""), (RST, 0, 7), id="con-response"
    ),
    pytest.param(encode_parts(NON, status.CONTENT, 7, b"", [], b""), None, id="non-response"),
    pytest.param(encode_parts(ACK, status.CONTENT, 7, b"", [], b""), None, id="ack-response"),
    pytest.param(encode_parts(ACK, status.POST, 7, b"", [], b""), None, id="request-in-ack"),
    pytest.param(encode_parts(RST, status.POST, 7, b"", [], b""), None, id="request-in-rst"),
    pytest.param(b"\x40\x01", None, id="shorter-than-a-header"),
    pytest.param(b"\x80\x01\x00\x07", None, id="version-2"),
    pytest.param(
        post(8, options=[(11, b"data"), (99, b"x")]),
        (ACK, status.BAD_OPTION, 8),
        id="unknown-critical-con",
    ),
    pytest.param(
        post(8, NON, options=[(11, b"data"), (99, b"x")]),
        (NON, status.BAD_OPTION, None),
        id="unknown-critical-non",
    ),
    pytest.param(
        post(9, options=[(opt.PROXY_URI, b"coap://elsewhere/")]),
        (ACK, status.PROXYING_NOT_SUPPORTED, 9),
        id="proxy-uri",
    ),
    pytest.param(
        post(10, options=[(11, b"\xff")]), (ACK, status.BAD_REQUEST, 10), id="path-not-utf8"
    ),
]


@pytest.mark.parametrize(("datagram", "answer"), IMMEDIATE)
def test_what_the_datagram_alone_decides(
    datagram: bytes, answer: tuple[int, int, int | None] | None
) -> None:
    ep = endpoint()
    event = ep.receive(datagram, PEER, 0.0)
    if answer is None:
        assert event is None
        return
    reply = message(event)
    mtype, code, mid = answer
    assert (reply.mtype, reply.code) == (mtype, code)
    if mid is not None:
        assert reply.mid == mid
    if code:
        assert reply.payload == b""  # errors carry no payload
        assert reply.token == TOKEN
    assert ep.next_deadline() is None or mtype != RST


def test_a_refused_request_is_answered_the_same_way_again() -> None:
    ep = endpoint()
    datagram = post(8, options=[(11, b"data"), (99, b"x")])
    first = ep.receive(datagram, PEER, 0.0)
    assert ep.receive(datagram, PEER, 0.5) == first
    assert ep.stats.duplicates == 1


def test_an_unknown_elective_option_is_ignored() -> None:
    ep = endpoint()
    request = exchange(ep.receive(post(11, options=[(11, b"data"), (98, b"x")]), PEER, 0.0))
    assert request.request is not None
    assert request.request.path == "/data"


# -- CON and NON, piggybacked and separate -------------------------------------------------------


def test_a_con_answered_in_time_is_piggybacked_and_replayed_byte_for_byte() -> None:
    ep = endpoint()
    ex = exchange(ep.receive(post(100), PEER, 0.0))
    assert ex.token == TOKEN
    assert ex.peer == PEER
    answer = ep.respond(ex, CONTENT, 0.3)
    assert message(answer) == Message(ACK, status.CONTENT, 100, TOKEN, CONTENT.options, b"payload")
    assert ep.receive(post(100), PEER, 5.0) == answer
    assert ep.timeout(1.5) == []  # the ACK window passed: nothing, it was answered
    assert ep.stats.requests == 1
    assert ep.stats.duplicates == 1


def test_a_non_gets_a_non_with_a_new_mid_and_its_duplicates_nothing() -> None:
    ep = endpoint(rng=LowRandom(1))
    ex = exchange(ep.receive(post(101, NON, token=b"\x07"), PEER, 0.0))
    reply = message(ep.respond(ex, CHANGED, 0.1))
    assert (reply.mtype, reply.code, reply.token) == (NON, status.CHANGED, b"\x07")
    assert ep.receive(post(101, NON, token=b"\x07"), PEER, 0.2) is None
    assert ep.timeout(100.0) == []  # nothing to retransmit for a NON


def test_the_ack_window_passing_gives_an_empty_ack_then_a_separate_con() -> None:
    ep = endpoint(ack_window=1.0)
    ex = exchange(ep.receive(post(102), PEER, 10.0))
    assert ep.next_deadline() == pytest.approx(11.0)
    assert ep.timeout(10.99) == []
    [(empty, peer)] = ep.timeout(11.0)
    assert (message(empty), peer) == (Message(ACK, 0, 102), PEER)
    separate = message(ep.respond(ex, CHANGED, 11.5))
    assert (separate.mtype, separate.code, separate.token) == (CON, status.CHANGED, TOKEN)
    assert ep.stats.separate_responses == 1
    # A duplicate of the request from now on gets the empty ACK again.
    assert message(ep.receive(post(102), PEER, 12.0)) == Message(ACK, 0, 102)


def test_a_duplicate_while_in_flight_is_acknowledged_and_not_handed_out_again() -> None:
    ep = endpoint()
    ex = exchange(ep.receive(post(103), PEER, 0.0))
    assert message(ep.receive(post(103), PEER, 0.1)) == Message(ACK, 0, 103)
    assert ep.timeout(2.0) == []  # acknowledged already: no second empty ACK
    assert message(ep.respond(ex, CHANGED, 0.2)).mtype == CON


def test_a_duplicate_non_in_flight_is_ignored() -> None:
    ep = endpoint()
    exchange(ep.receive(post(104, NON), PEER, 0.0))
    assert ep.receive(post(104, NON), PEER, 0.1) is None


def test_the_same_mid_from_another_endpoint_is_another_exchange() -> None:
    ep = endpoint()
    exchange(ep.receive(post(105), PEER, 0.0))
    exchange(ep.receive(post(105), OTHER, 0.0))
    exchange(ep.receive(post(105), (PEER[0], PEER[1] + 1), 0.0))


def test_over_dtls_the_identity_is_the_endpoint_not_the_address() -> None:
    ep = endpoint()
    ex = exchange(ep.receive(post(106), PEER, 0.0, identity="dev-1"))
    answer = ep.respond(ex, CHANGED, 0.1)
    # The device's address changed (NAT rebinding): still the same exchange (docs/CONTRACT.md §5).
    assert ep.receive(post(106), OTHER, 0.2, identity="dev-1") == answer
    exchange(ep.receive(post(106), PEER, 0.3, identity="dev-2"))


def test_an_ipv6_socket_address_is_the_peer_as_host_and_port() -> None:
    # An IPv6 socket reports (host, port, flowinfo, scope_id): the handler gets (host, port)
    # (the forwarder names it in Forwarded), answers go to the address as reported.
    ep = endpoint()
    address = cast(tuple[str, int], ("fe80::1", 5683, 0, 2))
    ex = exchange(ep.receive(post(108), address, 0.0))
    assert ex.request is not None
    assert ex.request.peer == ("fe80::1", 5683)
    assert ex.peer == address


def test_an_exchange_is_answered_once() -> None:
    ep = endpoint()
    ex = exchange(ep.receive(post(107), PEER, 0.0))
    assert ep.respond(ex, CHANGED, 0.1) is not None
    assert ep.respond(ex, CONTENT, 0.2) is None


# -- separate responses: retransmission, ACK, RST, give-up --------------------------------------


def separate_response(ep: Endpoint, mid: int, at: float = 0.0) -> Message:
    ex = exchange(ep.receive(post(mid), PEER, at))
    ep.timeout(at + 1.0)  # the empty ACK
    return message(ep.respond(ex, CHANGED, at + 1.0))


def test_retransmissions_back_off_exponentially_then_give_up() -> None:
    ep = endpoint(ack_timeout=2.0)
    sent = separate_response(ep, 200)
    schedule = []
    now = 1.0
    while (deadline := ep.next_deadline()) is not None and deadline < 200.0:
        now = deadline
        for data, peer in ep.timeout(now):
            assert peer == PEER
            assert message(data) == sent
            schedule.append(now - 1.0)
    # RFC 7252 §4.2: timeouts 2, 4, 8, 16 s, then given up after MAX_RETRANSMIT (4).
    assert schedule == [2.0, 6.0, 14.0, 30.0]
    assert ep.stats.retransmissions == MAX_RETRANSMIT
    assert ep.awaiting_ack == 0


@pytest.mark.parametrize("reply", [ACK, RST])
def test_an_ack_or_reset_from_the_peer_stops_retransmission(reply: int) -> None:
    ep = endpoint()
    sent = separate_response(ep, 201)
    assert ep.receive(encode_empty(reply, sent.mid), PEER, 2.0) is None
    assert ep.awaiting_ack == 0
    assert ep.timeout(100.0) == []


def test_an_ack_from_another_peer_does_not_stop_retransmission() -> None:
    ep = endpoint()
    sent = separate_response(ep, 202)
    ep.receive(encode_empty(ACK, sent.mid), OTHER, 2.0)
    assert ep.awaiting_ack == 1
    assert [message(d) for d, _ in ep.timeout(3.0)] == [sent]


def test_the_initial_timeout_is_random_between_ack_timeout_and_its_random_factor() -> None:
    starts = set()
    for seed in range(20):
        ep = Endpoint(ack_timeout=2.0, ack_random_factor=1.5, rng=random.Random(seed))
        separate_response(ep, 203)
        deadline = ep.next_deadline()
        assert deadline is not None
        assert 3.0 <= deadline <= 4.5
        starts.add(deadline)
    assert len(starts) > 1


def test_separate_responses_take_consecutive_mids() -> None:
    ep = endpoint()
    first = separate_response(ep, 204)
    second = separate_response(ep, 205)
    assert second.mid == (first.mid + 1) & 0xFFFF


# -- expiry of dedup state ----------------------------------------------------------------------


@pytest.mark.parametrize(("mtype", "lifetime"), [(CON, 247.0), (NON, 145.0)])
def test_an_exchange_is_remembered_for_its_lifetime_then_forgotten(
    mtype: int, lifetime: float
) -> None:
    ep = endpoint(exchanges=ExchangeCache())
    ex = exchange(ep.receive(post(300, mtype), PEER, 0.5))
    ep.respond(ex, CHANGED, 0.6)
    ep.timeout(0.5 + lifetime - 0.01)
    assert not isinstance(ep.receive(post(300, mtype), PEER, lifetime), Exchange)
    deadline = ep.next_deadline()
    assert deadline is not None
    assert deadline <= 0.5 + lifetime + 1.0
    assert ep.timeout(deadline) == []
    assert ep.next_deadline() is None
    exchange(ep.receive(post(300, mtype), PEER, deadline))  # a new exchange now


# -- graceful stop --------------------------------------------------------------------------------


def test_stopping_takes_nothing_new_but_finishes_what_it_has() -> None:
    ep = endpoint()
    answered = exchange(ep.receive(post(400), PEER, 0.0))
    replay = ep.respond(answered, CHANGED, 0.1)
    late = exchange(ep.receive(post(401), PEER, 0.0))
    ep.timeout(1.0)
    sent = message(ep.respond(late, CHANGED, 1.5))
    in_flight = exchange(ep.receive(post(402), PEER, 1.6))
    ep.stop_accepting()
    assert ep.receive(post(403), PEER, 2.0) is None  # new: silence
    assert ep.receive(encode_empty(CON, 9), PEER, 2.0) is None  # ping: silence
    assert ep.receive(post(400), PEER, 2.0) == replay  # known: still answered
    assert message(ep.receive(post(402), PEER, 2.0)) == Message(ACK, 0, 402)
    assert ep.receive(encode_empty(ACK, sent.mid), PEER, 2.1) is None
    assert ep.awaiting_ack == 0
    assert message(ep.respond(in_flight, CHANGED, 2.2)).mtype == CON


def test_abandon_stops_every_retransmission() -> None:
    ep = endpoint()
    separate_response(ep, 500)
    ep.abandon()
    assert ep.awaiting_ack == 0
    assert ep.timeout(100.0) == []


# -- the gate's verdicts --------------------------------------------------------------------------


def test_with_claims_a_new_exchange_waits_for_the_gate() -> None:
    ep = endpoint(claims=True)
    ex = exchange(ep.receive(post(600), PEER, 0.0))
    assert ex.state == CHECKING
    assert ep.receive(post(600), PEER, 0.1) is None  # the store's answer is a moment away
    assert ep.timeout(5.0) == []  # no ACK window before this replica knows it handles it
    ep.handling(ex, 5.0)
    assert ex.state == HANDLING
    assert ep.timeout(5.9) == []
    assert message(ep.timeout(6.0)[0][0]) == Message(ACK, 0, 600)


def test_busy_elsewhere_is_silence_and_a_retransmission_asks_again() -> None:
    ep = endpoint(claims=True)
    ex = exchange(ep.receive(post(601), PEER, 0.0))
    ep.elsewhere(ex)
    assert ex.state == ELSEWHERE
    assert ep.timeout(3.0) == []
    again = ep.receive(post(601), PEER, 3.0)
    assert again is ex
    assert ex.state == CHECKING
    ep.elsewhere(ex)
    ep.stop_accepting()
    assert ep.receive(post(601), PEER, 6.0) is None  # stopping: not taken over here


def test_bytes_another_replica_stored_are_the_answer_here_too() -> None:
    ep = endpoint(claims=True)
    stored = encode_parts(ACK, status.CHANGED, 602, TOKEN, [], b"")
    ex = exchange(ep.receive(post(602), PEER, 0.0))
    assert ep.replay(ex, stored, 0.1) == stored
    assert ep.receive(post(602), PEER, 0.2) == stored
    assert ep.respond(ex, CHANGED, 0.3) is None
    non = exchange(ep.receive(post(603, NON), PEER, 0.0))
    assert ep.replay(non, b"", 0.1) is None


# -- whole exchanges, driven by hypothesis --------------------------------------------------------


@dataclass
class Sent:
    """What the model device sent and what it got back, per request MID."""

    mtype: int
    token: bytes
    arrived: float
    handed_out: int = 0  # times the endpoint handed the exchange to the handler
    answered: bytes | None = None  # the piggybacked answer, or the empty ACK once separate
    empty_acks: int = 0
    separate: bytes | None = None
    separate_acked: bool = False
    exchange: Exchange | None = None
    retransmissions: list[float] = field(default_factory=list)


class Exchanges(RuleBasedStateMachine):
    """One device talking to one endpoint. The device sends CON/NON requests (fresh MIDs),
    retransmits them, pings, ACKs or resets separate responses; the handler answers exchanges
    in any order; time passes in steps. Checked throughout: each exchange reaches the handler
    once; a duplicate CON gets exactly what the first answer was (or the empty ACK); every CON
    is acknowledged once the ACK window passed; separate responses repeat the same bytes, at
    most MAX_RETRANSMIT times, and stop when ACKed or reset; the deadline is never behind."""

    in_flight = Bundle("in_flight")
    separate = Bundle("separate")

    def __init__(self) -> None:
        super().__init__()
        self.ep = endpoint(ack_window=1.0, ack_timeout=2.0, rng=random.Random(3))
        self.now = 0.0
        self.next_mid = 1
        self.sent: dict[int, Sent] = {}
        self.separate_mids: dict[int, int] = {}  # our MID → request MID

    def _handle(self, mid: int, out: object) -> None:
        """What came back for a request ``mid``."""
        sent = self.sent[mid]
        if isinstance(out, Exchange):
            assert out.message.mid == mid
            assert out.token == sent.token
            assert out.peer == PEER
            sent.handed_out += 1
            sent.exchange = out
            return
        if out is None:
            # Only a NON's duplicates go unanswered (no gate here, so nothing is CHECKING).
            assert sent.mtype == NON
            return
        assert isinstance(out, bytes)
        reply = decode(out)
        assert sent.mtype == CON, "a NON request never gets a duplicate answered"
        assert reply.mid == mid
        if reply.code == 0:
            assert reply.mtype == ACK
            sent.empty_acks += 1
        else:
            assert sent.answered == out

    def _timeout(self) -> None:
        for data, peer in self.ep.timeout(self.now):
            assert peer == PEER
            reply = decode(data)
            if reply.mtype == ACK:
                assert reply.code == 0
                sent = self.sent[reply.mid]
                assert sent.answered is None, "empty ACK after the answer"
                sent.empty_acks += 1
            else:
                request_mid = self.separate_mids[reply.mid]
                sent = self.sent[request_mid]
                assert data == sent.separate
                assert not sent.separate_acked
                sent.retransmissions.append(self.now)
                assert len(sent.retransmissions) <= MAX_RETRANSMIT

    @rule(target=in_flight, confirmable=st.booleans(), token=st.binary(max_size=8))
    def request(self, confirmable: bool, token: bytes) -> int:
        mid = self.next_mid
        self.next_mid += 1
        mtype = CON if confirmable else NON
        self.sent[mid] = Sent(mtype, token, self.now)
        self._handle(mid, self.ep.receive(post(mid, mtype, token=token), PEER, self.now))
        assert self.sent[mid].handed_out == 1
        return mid

    def _recent(self) -> list[int]:
        # A device retransmits within MAX_TRANSMIT_SPAN (45 s), well inside the lifetimes.
        return sorted(mid for mid, sent in self.sent.items() if self.now - sent.arrived < 100)

    @precondition(lambda self: bool(self._recent()))
    @rule(data=st.data())
    def retransmit(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(self._recent()))
        sent = self.sent[mid]
        out = self.ep.receive(post(mid, sent.mtype, token=sent.token), PEER, self.now)
        self._handle(mid, out)

    @rule(target=separate, mid=consumes(in_flight), code=st.sampled_from([65, 68, 69, 132]))
    def answer(self, mid: int, code: int) -> int:
        sent = self.sent[mid]
        assert sent.exchange is not None
        acked_before = sent.empty_acks > 0
        data = self.ep.respond(sent.exchange, Response(code), self.now)
        assert data is not None
        reply = decode(data)
        assert reply.code == code
        assert reply.token == sent.token
        if sent.mtype == NON:
            assert reply.mtype == NON
            return -1
        if not acked_before:
            assert (reply.mtype, reply.mid) == (ACK, mid)
            sent.answered = data
            return -1
        assert reply.mtype == CON
        sent.answered = encode_empty(ACK, mid)
        sent.separate = data
        self.separate_mids[reply.mid] = mid
        return reply.mid

    @rule(our_mid=consumes(separate), kind=st.sampled_from([ACK, RST]))
    def acknowledge(self, our_mid: int, kind: int) -> None:
        if our_mid < 0:
            return
        self.sent[self.separate_mids[our_mid]].separate_acked = True
        assert self.ep.receive(encode_empty(kind, our_mid), PEER, self.now) is None

    @rule()
    def ping(self) -> None:
        assert decode(self.ep.receive(encode_empty(CON, 0xFFFF), PEER, self.now) or b"") == (
            Message(RST, 0, 0xFFFF)
        )

    @rule(dt=st.sampled_from([0.05, 0.5, 0.99, 1.0, 2.0, 3.7, 10.0, 40.0]))
    def wait(self, dt: float) -> None:
        self.now += dt
        self._timeout()

    @rule()
    def until_next_deadline(self) -> None:
        deadline = self.ep.next_deadline()
        if deadline is not None and deadline - self.now < 300.0:
            self.now = max(self.now, deadline)
            self._timeout()

    @invariant()
    def handed_out_once(self) -> None:
        assert all(sent.handed_out == 1 for sent in self.sent.values())

    @invariant()
    def deadline_is_ahead(self) -> None:
        # Time only moves in the rules that then run timeout(now): nothing due is left behind.
        deadline = self.ep.next_deadline()
        assert deadline is None or deadline > self.now

    @invariant()
    def cons_past_their_window_are_acknowledged(self) -> None:
        for sent in self.sent.values():
            if sent.mtype == CON and sent.answered is None and self.now >= sent.arrived + 1.0:
                assert sent.empty_acks >= 1

    @invariant()
    def separate_responses_stop_when_acknowledged_or_given_up(self) -> None:
        awaiting = sum(
            1
            for sent in self.sent.values()
            if sent.separate is not None
            and not sent.separate_acked
            and len(sent.retransmissions) < MAX_RETRANSMIT
        )
        unacknowledged = sum(
            1
            for sent in self.sent.values()
            if sent.separate is not None and not sent.separate_acked
        )
        # Given up after the last retransmission's doubled timeout: between the two.
        assert awaiting <= self.ep.awaiting_ack <= unacknowledged


Exchanges.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_whole_exchanges = Exchanges.TestCase
