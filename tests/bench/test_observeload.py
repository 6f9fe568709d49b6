"""Scenario O's devices without sockets (bench/observeload.py :class:`Devices`): registration
with retransmission, separate responses, ACKs, duplicates, wrong payloads, error
notifications and registering again."""

from __future__ import annotations

import json
import math

from bench.observeload import (
    ACK_TIMEOUT,
    FAILED,
    MAX_RETRANSMIT,
    REGISTERED,
    SENT,
    Devices,
    command_payload,
    device_address,
    percentile,
)
from proxy.coap import codec
from proxy.coap.codec import ACK, CON, NON, RST
from proxy.coap.codes import CONTENT, GET, SERVICE_UNAVAILABLE
from proxy.coap.options import ETAG, OBSERVE, URI_PATH

ICCID = "8988280667100000007"


def _devices(count: int = 1, window: int = 256) -> Devices:
    return Devices([(n + 7, f"89882806671{n + 7:08d}") for n in range(count)], window)


def _registered(devices: Devices, index: int = 0) -> None:
    """Answer device ``index``'s registration with a piggybacked 2.05 + Observe."""
    mid, token = devices.mids[index], devices.tokens[index]
    answer = codec.encode_parts(ACK, CONTENT, mid, token, [(OBSERVE, b"\x01")], b"")
    assert devices.received(index, answer, 1.0) == []
    assert devices.state[index] == REGISTERED


def _notification(devices: Devices, mid: int, payload: bytes, code: int = CONTENT) -> bytes:
    options = [(ETAG, b"abcdefgh"), (OBSERVE, b"\x02")] if code == CONTENT else []
    return codec.encode_parts(CON, code, mid, devices.tokens[0], options, payload)


def _command(n: int = 7) -> bytes:
    return json.dumps(command_payload(n), separators=(",", ":")).encode()


def test_registration_is_a_con_get_with_observe_0_on_the_commands_path() -> None:
    devices = _devices()
    [(index, data)] = devices.start_registering(0.0)
    message = codec.decode(data)
    assert index == 0
    assert message.mtype == CON
    assert message.code == GET
    assert (OBSERVE, b"") in message.options
    assert [v for n, v in message.options if n == URI_PATH] == [b"commands", ICCID.encode()]
    assert message.token == devices.tokens[0]


def test_window_paces_registrations() -> None:
    devices = _devices(count=5, window=2)
    assert len(devices.start_registering(0.0)) == 2
    _registered(devices, 0)
    assert [i for i, _ in devices.poll(0.1)] == [2]
    assert not devices.done_registering


def test_unanswered_registration_is_retransmitted_then_fails() -> None:
    devices = _devices()
    [(_, first)] = devices.start_registering(0.0)
    now, sent = 0.0, []
    for _ in range(MAX_RETRANSMIT + 1):
        now += ACK_TIMEOUT * 1.5 * 2**MAX_RETRANSMIT  # past any deadline
        sent += devices.poll(now)
    assert [data for _, data in sent] == [first] * MAX_RETRANSMIT  # same MID each time
    assert devices.state[0] == FAILED
    assert devices.done_registering


def test_empty_ack_then_separate_con_response_is_acked_and_registers() -> None:
    devices = _devices()
    devices.start_registering(0.0)
    assert devices.received(0, codec.encode_empty(ACK, devices.mids[0]), 0.1) == []
    assert devices.state[0] != SENT
    separate = codec.encode_parts(CON, CONTENT, 4242, devices.tokens[0], [(OBSERVE, b"")], b"")
    assert devices.received(0, separate, 0.2) == [(0, codec.encode_empty(ACK, 4242))]
    assert devices.state[0] == REGISTERED
    assert devices.commands[0] == 0  # an empty registration answer is no command


def test_command_notification_is_acked_and_counted_once() -> None:
    devices = _devices()
    devices.start_registering(0.0)
    _registered(devices)
    note = _notification(devices, 100, _command())
    assert devices.received(0, note, 5.0) == [(0, codec.encode_empty(ACK, 100))]
    # The same MID again: a retransmission (our ACK was late), ACKed again, not counted.
    assert devices.received(0, note, 6.0) == [(0, codec.encode_empty(ACK, 100))]
    result = devices.collect()
    assert result.commands == [1]
    assert result.acked_at == [5.0]
    assert result.retransmitted == 1
    assert result.wrong == [0]
    assert devices.commands_received == 1


def test_the_same_command_in_a_new_message_is_a_duplicate_and_a_foreign_one_wrong() -> None:
    devices = _devices()
    devices.start_registering(0.0)
    _registered(devices)
    devices.received(0, _notification(devices, 100, _command()), 5.0)
    devices.received(0, _notification(devices, 101, _command()), 6.0)
    devices.received(0, _notification(devices, 102, _command(n=8)), 7.0)
    result = devices.collect()
    assert result.commands == [3]
    assert result.wrong == [1]
    assert result.acked_at == [5.0]  # the first one


def test_error_notification_ends_the_relation_and_the_device_registers_again() -> None:
    devices = _devices()
    devices.start_registering(0.0)
    _registered(devices)
    ended = _notification(devices, 100, b"", SERVICE_UNAVAILABLE)
    assert devices.received(0, ended, 5.0) == [(0, codec.encode_empty(ACK, 100))]
    assert devices.poll(5.1) == []  # a pause first
    first_mid = devices.mids[0]
    [(_, again)] = devices.poll(7.0)
    message = codec.decode(again)
    assert (OBSERVE, b"") in message.options
    assert message.mid != first_mid  # a new request, not a retransmission
    result = devices.collect()
    assert result.ended == 1
    assert result.reregistered == 1
    assert result.notified == {"5.03": 1}
    assert result.commands == [0]


def test_non_and_foreign_tokens() -> None:
    devices = _devices()
    devices.start_registering(0.0)
    _registered(devices)
    non = codec.encode_parts(NON, CONTENT, 7, devices.tokens[0], [(OBSERVE, b"\x03")], _command())
    assert devices.received(0, non, 1.0) == []  # nothing to ACK
    foreign = codec.encode_parts(CON, CONTENT, 8, b"zzzz", [], b"x")
    assert devices.received(0, foreign, 1.0) == [(0, codec.encode_empty(RST, 8))]
    result = devices.collect()
    assert result.non == 1
    assert result.commands == [1]


def test_device_addresses_are_distinct_loopback_addresses_and_never_the_bench_own() -> None:
    addresses = [device_address(n) for n in range(70_000)]
    assert len(set(addresses)) == len(addresses)
    assert all(a.startswith("127.") and a != "127.0.0.1" for a in addresses)
    assert all(not a.endswith((".0", ".255")) for a in addresses)


def test_percentile_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.99) == 4.0
    assert math.isnan(percentile([], 0.5))
