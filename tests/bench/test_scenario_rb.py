"""Scenario RB (rebinding): DTLS sessions with a Connection ID (RFC 9146) whose source ports all
change at once, through the real chain and proxy, and its table in the report.

No assertion on speed: only that with a CID every request after the rebinding is answered 2.04
and the proxy ran no handshake for it, that without one nothing is answered (the proxy drops
the records as stateless), and that the memory figures and the report come out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.harness import RB_PLAIN, RB_SYSTEM
from bench.report import TABLES
from tests.bench.test_bench_smoke import ROOT, _processes_under


def _row(system: str, **figures: Any) -> dict[str, Any]:
    base = {
        "scenario": "RB", "system": system, "sessions": 3, "handshakes_during": 0.0,
        "answered": 3, "codes": {"2.04": 3}, "unanswered": 0, "retransmissions": 0,
        "seconds": 0.5, "rate": 6.0, "p50_ms": 1.0, "p99_ms": 2.0,
        "proxy_cpu_us_per_request": 100.0, "udp_receive_buffer_errors": 0,
        "bytes_per_idle_session": 1500.0, "cid": True, "redis_bytes_per_session": 900.0,
        "redis_key_bytes": 600.0, "redis_identity_key_bytes": 200.0, "status": "OK",
    }  # fmt: skip
    return base | figures


def test_report_states_the_target_and_redis_bytes() -> None:
    text = TABLES["RB"].render([_row(RB_SYSTEM)])
    assert "| coap-bridge, CID sessions | 3 | 0 | 3 | 2.04: 3 |" in text
    assert "900 (600 + 200)" in text
    assert "no handshake — **met**" in text


def test_report_says_when_a_handshake_ran_or_nothing_was_stored() -> None:
    failed = _row(RB_SYSTEM, handshakes_during=3.0, status="FAILED", redis_key_bytes=None)
    plain = _row(RB_PLAIN, cid=False, answered=0, codes={}, unanswered=3, status="reference")
    text = TABLES["RB"].render([failed, plain])
    assert "**not met**" in text
    assert "none stored" in text
    assert "the proxy did not store any" in text
    assert "| coap-bridge, sessions without CID | 3 | 0 | 0 | – | 3 |" in text


@pytest.mark.integration
def test_quick_rb_answers_every_cid_session_after_rebinding_without_a_handshake(
    tmp_path: Path,
) -> None:
    # As tests/bench/test_bench_smoke.py runs the harness; its row checks fit load rows, and
    # RB's rows count requests after a rebinding instead.
    output, raw, work = tmp_path / "BENCHMARKS.md", tmp_path / "results.json", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    command = [
        sys.executable, "-m", "bench", "--quick", "--scenarios", "RB", "--rb-sessions", "20",
        "--rb-timeout", "20", "--results", str(raw), "--workdir", str(work),
        "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    log = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, log
    assert not _processes_under(work), log
    rows = {(row["scenario"], row["system"]): row for row in json.loads(raw.read_text())["rows"]}
    assert all("error" not in row for row in rows.values()), log
    assert set(rows) == {("RB", RB_SYSTEM), ("RB", RB_PLAIN)}, log
    cid = rows["RB", RB_SYSTEM]
    assert cid["status"] == "OK", log
    assert cid["sessions"] == 20, log
    assert cid["cid_length"] == 8, log  # the proxy's CIDs are 8 bytes
    assert cid["codes"] == {"2.04": 20}, log
    assert cid["handshakes_during"] == 0, log
    assert cid["sessions_after"] == 20, log  # moved, not duplicated
    if cid["address_updates_during"] is not None:  # when the proxy exports the counter
        assert cid["address_updates_during"] == 20, log
    assert cid["bytes_per_idle_session"] is not None, log
    plain = rows["RB", RB_PLAIN]
    assert plain["sessions"] == 20, log
    assert plain["cid_length"] == 0, log
    assert plain["answered"] == 0, log
    assert plain["handshakes_during"] == 0, log
    assert plain["dropped_stateless_during"] >= 20, log
    assert "### RB — rebinding" in output.read_text()
