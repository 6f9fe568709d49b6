"""The harness still works end to end: ``python -m bench --quick`` for T (our proxy), a tiny
E (aiocoap baseline + the whole chain with Redis, Mosquitto and the MQTT check), E over DTLS
(8 devices with their own PSKs, 8 sessions), a short burst of DTLS handshakes, O with 20
observing devices (each on a loopback address of its own) through the real chain, and F (2
clients downloading a 64 KiB firmware image through proxy, API and Redis, and from libcoap).

No assertion on speed: only that rows come out, requests were answered with the expected codes,
nothing was lost or duplicated, the report was written, and no process was left behind."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.report import END, START

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _processes_under(directory: Path) -> list[str]:
    """Processes whose working directory lies in ``directory`` (every service the harness
    starts runs in a subdirectory of its workdir)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd.startswith(str(directory)):
            found.append(f"{entry}: {cwd}")
    return found


def _run(tmp_path: Path, *args: str) -> tuple[dict[tuple[str, str], dict[str, Any]], str]:
    raw = tmp_path / "results.json"
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    command = [
        sys.executable, "-m", "bench", "--quick", "--duration", "1", "--warmup", "0.2",
        "--clients", "8", "--results", str(raw), "--workdir", str(work), *args,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    log = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, log
    assert not _processes_under(work), log
    rows = {(row["scenario"], row["system"]): row for row in json.loads(raw.read_text())["rows"]}
    for row in rows.values():
        assert "error" not in row, log
        if row["scenario"] not in ("H", "O"):
            assert row["completed"] > 0, log
            assert row["in_window"] > 0, log
    return rows, log


def _assert_chain_clean(row: dict[str, Any], log: str) -> None:
    assert set(row["codes"]) == {"2.04"}, log
    assert row["acked"] == row["codes"]["2.04"] > 0, log
    assert row["lost"] == 0, log
    assert row["duplicated"] == 0, log
    assert row["status"] == "OK", log


def test_quick_run_of_t_e_and_dtls(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    output.write_text("# Hand-written\n\nkeep me\n")
    rows, log = _run(
        tmp_path, "--scenarios", "T,E,D,H", "--t-systems", "coap-bridge", "--output", str(output),
        "--h-duration", "0.3", "--h-concurrency", "1",
    )  # fmt: skip
    assert set(rows) == {
        ("T", "coap-bridge"),
        ("E", "aiocoap"),
        ("E", "coap-bridge"),
        ("E", "coap-bridge over DTLS"),
        ("H", "coap-bridge"),
    }, log
    assert set(rows["T", "coap-bridge"]["codes"]) == {"2.05"}, log
    assert set(rows["E", "aiocoap"]["codes"]) == {"2.04"}, log
    _assert_chain_clean(rows["E", "coap-bridge"], log)
    dtls = rows["E", "coap-bridge over DTLS"]
    _assert_chain_clean(dtls, log)
    assert dtls["sockets"] == 8, log  # every session was established
    assert dtls["handshake_failures"] == 0, log
    handshakes = rows["H", "coap-bridge"]
    assert handshakes["in_window"] > 0, log
    assert handshakes["handshake_failures"] == 0, log

    text = output.read_text()
    assert text.startswith("# Hand-written\n\nkeep me\n")
    assert START in text
    assert END in text
    assert "### T" in text
    assert "### E" in text
    assert "### H" in text
    assert "Machine:" in text


def test_quick_t_in_the_production_shape_and_b(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    rows, log = _run(
        tmp_path, "--scenarios", "T,B", "--t-systems", "coap-bridge+redis,libcoap",
        "--b-clients", "4", "--output", str(output),
    )  # fmt: skip
    assert set(rows) == {
        ("T", "coap-bridge+redis"),
        ("T", "libcoap"),
        ("B", "libcoap"),
        ("B", "coap-bridge+redis"),
    }, log
    for system in ("coap-bridge+redis", "libcoap"):
        assert set(rows["T", system]["codes"]) == {"2.05"}, log
    assert set(rows["T", "coap-bridge+redis"]["cpu"]) >= {"coap-bridge", "redis"}, log
    for system in ("libcoap", "coap-bridge+redis"):
        block = rows["B", system]
        assert set(block["codes"]) == {"2.05"}, log
        assert block["corrupt"] == block["etag_changes"] == block["timeouts"] == 0, log
        assert block["transfers"] > 0, log
        assert block["blocks_per_transfer"] == 256, log
        assert block["block_sizes"] == {"1024": block["completed"]}, log  # never over 1024
        assert block["rss_peak"] >= block["rss_before"] > 0, log
    assert sum(rows["B", "coap-bridge+redis"]["origin_answers"].values()) > 0, log
    text = output.read_text()
    assert "### T" in text
    assert "### B" in text
    assert "coap-bridge+redis (production shape" in text


def test_quick_o_fans_commands_out_to_observing_devices(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    rows, log = _run(
        tmp_path, "--scenarios", "O", "--o-devices", "20", "--o-memory-devices", "20",
        "--output", str(output),
    )  # fmt: skip
    assert set(rows) == {("O", "coap-bridge")}, log
    row = rows["O", "coap-bridge"]
    assert row["status"] == "OK", log
    assert row["registration"] == {"registered": 20}, log
    assert row["sockets"] == 20, log
    assert row["received"] == 20, log
    assert row["missing"] == row["duplicates"] == row["wrong"] == 0, log
    assert row["post_codes"] == {"201": 20}, log
    assert row["delivered_sampled"] == row["sampled"] == 20, log
    assert row["notifications_per_second"] > 0, log
    assert row["p99_ms"] >= row["p50_ms"] > 0, log
    assert row["redis_key_bytes_per_command"] > 0, log
    assert row["cpu"]["proxy"] >= 0, log
    # RSS (pages), CPU (clock ticks) and used_memory are too coarse for 20 devices to be
    # sure to move; they must be there.
    for key in ("rss_per_relation", "proxy_cpu_us_per_notification", "redis_bytes_per_command"):
        assert row[key] is not None, log
    text = output.read_text()
    assert "### O" in text
    assert "| coap-bridge | 20 | 20 |" in text


def test_quick_f_downloads_firmware_through_the_chain_and_from_libcoap(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    rows, log = _run(
        tmp_path, "--scenarios", "F", "--f-clients", "2", "--f-size", str(64 * 1024),
        "--f-duration", "2", "--output", str(output),
    )  # fmt: skip
    assert set(rows) == {("F", "libcoap"), ("F", "coap-bridge")}, log
    for row in rows.values():
        assert row["status"] == "OK", log
        assert row["codes"] == {"2.05": row["completed"]}, log
        assert row["corrupt"] == row["etag_changes"] == row["timeouts"] == 0, log
        assert row["blocks_per_transfer"] == 64, log
        assert row["block_sizes"] == {"1024": row["completed"]}, log  # never over 1024
        assert row["blocks_per_second"] > 0, log
        assert row["image_transfers_per_second"] > 0, log
        assert row["transfers"] > 0, log
        assert row["p99_ms"] >= row["p50_ms"] > 0, log
    assert rows["F", "libcoap"]["libcoap_cpu_us_per_block"] is not None, log
    chain = rows["F", "coap-bridge"]
    # Every block crossed the proxy and the API; Redis's share may stay under one clock tick.
    assert chain["proxy_cpu_us_per_block"] > 0, log
    assert chain["api_cpu_us_per_block"] > 0, log
    assert chain["redis_cpu_us_per_block"] is not None, log
    # The API's tag as a CoAP ETag: 6 bytes of the image's sha256 in base64url (docs/API.md).
    tag = base64.urlsafe_b64encode(bytes.fromhex(chain["image_sha256"])[:6])
    assert bytes.fromhex(chain["etag"]) == tag, log
    text = output.read_text()
    assert "### F" in text
    assert "| libcoap | 2 |" in text
    assert "| coap-bridge | 2 |" in text
