"""policies/dedup.py: how a batch of record operations becomes the script's ARGV, and how a
claim's reply reads."""

from __future__ import annotations

import pytest

from policies import dedup


def test_record_argv_is_op_value_ttl_per_key_in_order() -> None:
    ops: list[dedup.RecordOp] = [
        (dedup.ANSWER, "k1", b"d\x44", 247_000),
        (dedup.CLAIM, "k2", b"", 10_000),
        (dedup.RELEASE, "k3", b"", 0),
    ]
    assert dedup.record_argv(ops) == [
        b"a", b"d\x44", 247_000,
        b"c", b"", 10_000,
        b"r", b"", 0,
    ]  # fmt: skip
    assert dedup.record_argv([]) == []


@pytest.mark.parametrize(
    ("reply", "meaning"),
    [
        (None, dedup.OWNED),
        (b"c", dedup.BUSY),
        (b"d", b""),
        (b"d\x60\x44\x12\x34", b"\x60\x44\x12\x34"),
    ],
)
def test_a_claims_reply_reads(reply: bytes | None, meaning: object) -> None:
    assert dedup.read_claim(reply) == meaning
