"""The pure parts of the bench: datagram templates and patching, MID rotation, source ports,
percentiles, result merging, delivery check, BENCHMARKS.md markers."""

from __future__ import annotations

import math
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import aiocoap
import pytest

from bench.harness import verdict
from bench.loadgen import (
    BUCKET_SECONDS,
    BUCKETS,
    MID_SPACE,
    LoadResult,
    MidSequence,
    PortPool,
    RequestSpec,
    build_template,
    code_name,
    empty_ack,
    histogram_percentile,
    patch,
)
from bench.report import END, START, update_file
from bench.subscriber import check_delivery


def test_wkc_template_decodes_as_con_get_with_patched_mid_and_token() -> None:
    template = build_template(RequestSpec())
    assert template.seq_offset == -1
    data = patch(bytearray(template.data), template.seq_offset, 0xBEEF, 0x01020304, 99)
    message = aiocoap.Message.decode(data)
    assert message.mtype == aiocoap.CON
    assert message.code == aiocoap.GET
    assert message.mid == 0xBEEF
    assert message.token == bytes([1, 2, 3, 4])
    assert message.opt.uri_path == (".well-known", "core")
    assert message.payload == b""


def test_telemetry_template_carries_query_and_sequence_id_in_a_100_byte_payload() -> None:
    template = build_template(RequestSpec.telemetry("bench/x", 100))
    buffer = bytearray(template.data)
    first = patch(buffer, template.seq_offset, 1, 7, 0x1122334455667788)
    second = patch(buffer, template.seq_offset, 2, 8, 42)
    message = aiocoap.Message.decode(first)
    assert message.code == aiocoap.POST
    assert message.opt.uri_path == ()
    assert message.opt.uri_query == ("t=bench/x",)
    assert len(message.payload) == 100
    assert message.payload[:8] == bytes.fromhex("1122334455667788")
    assert message.payload[8:] == b"x" * 92
    # patch returns a copy: the earlier datagram is not changed by the next patch.
    assert aiocoap.Message.decode(first).mid == 1
    again = aiocoap.Message.decode(second)
    assert (again.mid, again.token, again.payload[:8]) == (2, bytes([0, 0, 0, 8]), bytes(7) + b"*")
    # Only MID, token and sequence id differ between two requests.
    differing = [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b]
    assert all(2 <= i < 8 or template.seq_offset <= i < template.seq_offset + 8 for i in differing)


def test_payload_must_hold_the_sequence_id() -> None:
    with pytest.raises(ValueError, match="sequence id"):
        build_template(RequestSpec.telemetry(size=4))


def test_empty_ack_and_code_names() -> None:
    message = aiocoap.Message.decode(empty_ack(0x1234))
    assert (message.mtype, message.code, message.mid) == (aiocoap.ACK, aiocoap.EMPTY, 0x1234)
    assert code_name(0x44) == "2.04"
    assert code_name(0x84) == "4.04"


def test_mid_sequence_uses_every_mid_once_then_is_exhausted() -> None:
    mids = MidSequence(start=65530)
    seen = set()
    for expected_counter in range(MID_SPACE):
        mid, counter = mids.take()
        assert counter == expected_counter
        assert mids.counter_of(mid) == counter
        seen.add(mid)
    assert len(seen) == MID_SPACE
    assert mids.exhausted
    with pytest.raises(ValueError, match="65536"):
        mids.take()


def test_mid_sequence_random_start_wraps_around() -> None:
    mids = MidSequence(start=0xFFFF)
    assert mids.take() == (0xFFFF, 0)
    assert mids.take() == (0, 1)
    assert not mids.exhausted


def _busy_neighbour() -> tuple[int, socket.socket]:
    """A free port ``base`` whose neighbour ``base + 1`` is held by a socket of ours (another
    process may take a port between the kernel's pick and our bind: pick again)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            busy.bind(("127.0.0.1", base + 1))
        except OSError:
            busy.close()
            continue
        return base, busy
    raise AssertionError("no free pair of neighbouring UDP ports in 50 tries")


def test_port_pool_hands_out_each_port_once_and_skips_busy_ones() -> None:
    base, busy = _busy_neighbour()
    pool = PortPool(base, base + 3)
    opened: list[socket.socket] = []
    try:
        opened = [pool.open("127.0.0.1", 9) for _ in range(3)]
        ports = [sock.getsockname()[1] for sock in opened]
        assert ports[:2] == [base, base + 2]
        assert pool.fallbacks == 1  # range used up: the kernel chose the third one
        assert len(set(ports)) == 3
    finally:
        busy.close()
        for sock in opened:
            sock.close()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of raw samples: what the histogram must agree with."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def test_histogram_percentile_matches_raw_samples_within_a_bucket() -> None:
    samples = [0.0001 * i for i in range(1, 1001)] + [2.0, 3.0]  # two beyond the histogram
    hist = [0] * BUCKETS
    overflow = []
    for sample in samples:
        index = int(sample / BUCKET_SECONDS)
        if index < BUCKETS:
            hist[index] += 1
        else:
            overflow.append(sample)
    ordered = sorted(samples)
    for q in (0.5, 0.9, 0.99):
        assert abs(histogram_percentile(hist, overflow, q) - percentile(ordered, q)) <= (
            BUCKET_SECONDS * 1.01
        )
    assert histogram_percentile(hist, overflow, 1.0) == 3.0
    assert histogram_percentile(hist, sorted(overflow), 0.999) == 2.0  # rank 1001 of 1002
    assert math.isnan(histogram_percentile([0] * 10, [], 0.5))


def test_results_merge() -> None:
    a = LoadResult(sent=10, in_window=8, window=2.0, codes={"2.05": 9}, acked_seqs=b"\x01" * 8)
    b = LoadResult(sent=5, in_window=4, window=2.0, codes={"2.05": 4, "RST": 1})
    a.hist[3] = 2
    b.hist[3] = 1
    b.overflow.append(1.5)
    a.merge(b)
    assert (a.sent, a.in_window, a.rate) == (15, 12, 6.0)
    assert a.codes == {"2.05": 13, "RST": 1}
    assert a.hist[3] == 3
    assert a.overflow == [1.5]
    assert list(a.acked()) == [0x0101010101010101]


def test_check_delivery_counts_lost_and_duplicated() -> None:
    assert check_delivery([1, 2, 3], Counter({1: 1, 2: 1, 3: 1, 4: 1})) == (0, 0)
    assert check_delivery([1, 2, 3], Counter({1: 1, 3: 3})) == (1, 2)


def test_update_file_keeps_hand_written_text(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    update_file(path, "first")
    assert START in path.read_text()
    assert "first" in path.read_text()
    path.write_text(
        "# Mine\n\nhand notes\n\n" + path.read_text().split("\n\n", 2)[-1] + "\nafter\n"
    )
    update_file(path, "second")
    text = path.read_text()
    assert "hand notes" in text
    assert "after" in text
    assert "second" in text
    assert "first" not in text
    assert text.count(START) == 1
    assert text.count(END) == 1
    other = tmp_path / "OTHER.md"
    other.write_text("no markers\n")
    update_file(other, "gen")
    assert other.read_text().startswith("no markers\n")
    assert f"{START}\ngen\n{END}" in (other.read_text())


def test_port_pool_with_wrap_hands_ports_out_in_turn_skips_busy_ones_and_wraps() -> None:
    low, busy = _busy_neighbour()
    cycle = PortPool(low, low + 3, wrap=True)
    with busy:
        ports = []
        for _ in range(3):
            sock = cycle.open("127.0.0.1", 9)
            ports.append(sock.getsockname()[1])
            sock.close()
    assert ports == [low, low + 2, low]


def test_limit_names_the_client_the_server_or_the_cores() -> None:
    from bench.report import limit

    def row(cpu: dict[str, float], workers: list[float], other: float = 0.0) -> dict[str, Any]:
        return {"cpu": cpu, "wall": 10.0, "other_cpu": other, "proxy_workers": 1,
                "completed": 1, "worker_cpu": workers}  # fmt: skip

    assert limit(row({"proxy": 3.0, "load generator": 9.5}, [9.5])).startswith("the client")
    assert limit(row({"proxy": 9.5, "load generator": 1.0}, [1.0])).startswith("the server")
    cores = os.cpu_count() or 1
    busy = row({"proxy": 5.0, "load generator": 1.0}, [1.0], other=10.0 * cores)
    assert limit(busy).startswith(f"the machine's {cores} cores")
    assert limit(row({"proxy": 1.0, "load generator": 1.0}, [1.0])).startswith("no process")


@pytest.mark.parametrize(
    ("sent", "codes", "timeouts", "lost", "duplicated", "status"),
    [
        (100, {"2.04": 100}, 0, 0, 0, "OK"),
        (0, {}, 0, 0, 0, "FAILED"),  # nothing sent
        (100, {}, 100, 0, 0, "FAILED"),  # everything timed out: nothing acked, nothing lost
        (100, {"2.04": 90}, 10, 0, 0, "FAILED"),  # some timed out
        (100, {"2.04": 99, "5.03": 1}, 0, 0, 0, "FAILED"),  # another code
        (100, {"5.02": 100}, 0, 0, 0, "FAILED"),
        (100, {"2.04": 100}, 0, 1, 0, "FAILED"),  # acked, never delivered
        (100, {"2.04": 100}, 0, 0, 1, "FAILED"),  # delivered twice
    ],
)
def test_telemetry_row_is_ok_only_when_every_request_was_acknowledged_and_delivered_once(
    sent: int, codes: dict[str, int], timeouts: int, lost: int, duplicated: int, status: str
) -> None:
    result = LoadResult(sent=sent, completed=sum(codes.values()), codes=codes, timeouts=timeouts)
    assert verdict(result, lost, duplicated) == status
