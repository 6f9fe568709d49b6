"""Tables (Markdown, printed and written to BENCHMARKS.md) and the machine description."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.harness import Row, Settings

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"

# --- machine ---------------------------------------------------------------------------------


def _first_line(argv: Sequence[str], pattern: str = "") -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    for line in (out.stdout + out.stderr).splitlines():
        if line.strip() and (not pattern or re.search(pattern, line)):
            return line.strip()
    return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "unknown"


def machine() -> dict[str, str]:
    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "RAM": _ram(),
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_version()} ({sys.executable})",
        "libcoap": _first_line(["coap-server-notls", "-h"], r"v\d"),
        "aiocoap": _version("aiocoap"),
        "uvloop": _version("uvloop"),
        "redis-server": _first_line(["redis-server", "--version"]),
        "mosquitto": _first_line(["mosquitto", "-h"], r"version"),
        "coap-bridge": _git(),
    }


# --- formatting ------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return "–"
    return f"{value / base:.2f}×"


def _codes(row: Row) -> str:
    if row.result is None:
        return "–"
    return " ".join(f"{code}: {count:,}" for code, count in sorted(row.result.codes.items()))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _rate(rows: Sequence[Row], scenario: str, system: str) -> float | None:
    for row in rows:
        if row.scenario == scenario and row.system == system and row.result is not None:
            return row.result.rate
    return None


def _latency_cells(row: Row) -> list[str]:
    r = row.result
    if r is None:
        return ["–"] * 3
    return [_num(r.p50_ms, 2), _num(r.p99_ms, 2), _num(r.p999_ms, 2)]


def short_error(error: str | None) -> str:
    """One line for a table cell: the first line (what failed) and the last (why)."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return "ERROR"
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return "ERROR: " + text.replace("|", "\\|")[:300]


_SERVER_PARTS = ("coap-bridge", "libcoap", "aiocoap", "redis", "mosquitto", "api", "proxy")


def _cpu_per_request(row: Row) -> str:
    """CPU µs per answered request of the system under test (all its processes)."""
    cpu = row.extra.get("cpu") or {}
    seconds = sum(v for k, v in cpu.items() if k in _SERVER_PARTS)
    if row.result is None or not row.result.completed or not seconds:
        return "–"
    return f"{seconds / row.result.completed * 1e6:,.0f}"


def cpu_breakdown(row: Row) -> str:
    cpu = row.extra.get("cpu") or {}
    if row.result is None or not row.result.completed or not cpu:
        return ""
    parts = ", ".join(
        f"{name} {seconds / row.result.completed * 1e6:,.0f}" for name, seconds in cpu.items()
    )
    return f"CPU µs per request, {row.scenario} {row.system}: {parts}."


def _error_row(row: Row, width: int) -> list[str]:
    return [row.system, short_error(row.error)] + ["–"] * (width - 2)


def table_t(rows: Sequence[Row]) -> str:
    header = ["system", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "timeouts", "codes",
              "server CPU µs/req", "× libcoap", "× aiocoap"]  # fmt: skip
    libcoap, aiocoap = _rate(rows, "T", "libcoap"), _rate(rows, "T", "aiocoap")
    cells = []
    for row in rows:
        if row.scenario != "T":
            continue
        if row.result is None:
            cells.append(_error_row(row, len(header)))
            continue
        rate = row.result.rate
        cells.append(
            [row.system, _num(rate), *_latency_cells(row), _num(row.result.timeouts),
             _codes(row), _cpu_per_request(row), _ratio(rate, libcoap), _ratio(rate, aiocoap)]
        )  # fmt: skip
    ours = _rate(rows, "T", "coap-bridge")
    verdict = _verdict(ours is not None and libcoap is not None and ours >= 0.5 * libcoap)
    return (
        "### T — termination: CON GET /.well-known/core, closed loop\n\n"
        + _table(header, cells)
        + f"\n\nTarget: coap-bridge ≥ 0.5 × libcoap — {verdict}.\n"
    )


def table_e(rows: Sequence[Row]) -> str:
    header = ["system", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "timeouts", "codes",
              "server CPU µs/req", "× aiocoap", "acked", "lost", "duplicated",
              "status"]  # fmt: skip
    aiocoap = _rate(rows, "E", "aiocoap")
    cells = []
    for row in rows:
        if row.scenario != "E":
            continue
        if row.result is None:
            cells.append(_error_row(row, len(header)))
            continue
        rate = row.result.rate
        x = row.extra
        cells.append(
            [row.system, _num(rate), *_latency_cells(row), _num(row.result.timeouts),
             _codes(row), _cpu_per_request(row), _ratio(rate, aiocoap), _num(x.get("acked")),
             _num(x.get("lost")),
             _num(x.get("duplicated")), x.get("status", "baseline")]
        )  # fmt: skip
    ours = _rate(rows, "E", "coap-bridge")
    e_rows = [r for r in rows if r.scenario == "E" and r.system == "coap-bridge"]
    clean = bool(e_rows) and all(r.extra.get("status") == "OK" for r in e_rows)
    met = ours is not None and aiocoap is not None and ours >= aiocoap and clean
    breakdown = "\n".join(cpu_breakdown(r) for r in e_rows if cpu_breakdown(r))
    return (
        "### E — telemetry end to end: CON POST /?t=bench/x, 100-byte payload, closed loop\n\n"
        "coap-bridge = proxy → HTTP → API → Redis + MQTT QoS 1 (Mosquitto) → PUBACK → 2.04; "
        "aiocoap = a POST resource that only answers 2.04.\n\n"
        + _table(header, cells)
        + f"\n\nTarget: coap-bridge ≥ 1.0 × aiocoap, zero lost or duplicated — {_verdict(met)}.\n"
        + (f"\n{breakdown} (server CPU counts redis, mosquitto, api, proxy; warm-up and "
           "drain included.)\n" if breakdown else "")
    )  # fmt: skip


def table_l(rows: Sequence[Row]) -> str:
    header = ["system", "offered req/s", "achieved req/s", "p50 ms", "p99 ms", "p99.9 ms",
              "timeouts", "codes", "lost", "duplicated", "status"]  # fmt: skip
    cells = []
    met = False
    for row in rows:
        if row.scenario != "L":
            continue
        if row.result is None:
            cells.append(_error_row(row, len(header)))
            continue
        x = row.extra
        cells.append(
            [row.system, _num(row.result.offered_rate), _num(row.result.rate),
             *_latency_cells(row), _num(row.result.timeouts), _codes(row),
             _num(x.get("lost")), _num(x.get("duplicated")), x.get("status", "–")]
        )  # fmt: skip
        met = row.result.p99_ms <= 10.0 and x.get("status") == "OK"
    return (
        "### L — latency: E in open loop at 50% of E's measured maximum\n\n"
        "Latency counts from each request's scheduled send time (requests go out in bursts "
        "of ≤ 1 ms, the event loop's timer granularity).\n\n"
        + _table(header, cells)
        + f"\n\nTarget: p99 ≤ 10 ms — {_verdict(met)}.\n"
    )


def table_m(rows: Sequence[Row], redis_dedup: dict[str, Any] | None) -> str:
    lines = ["### M — memory\n"]
    cells: list[list[str]] = []
    proxy_ok = False
    for row in rows:
        if row.scenario != "M":
            continue
        if row.result is None:
            cells.append(["proxy RSS", short_error(row.error)])
            continue
        x = row.extra
        per = x.get("bytes_per_exchange")
        proxy_ok = per is not None and per <= 300
        samples = ", ".join(f"{t:.0f} s: {b / 2**20:.0f}" for t, b in x.get("rss_samples", []))
        cells += [
            ["load", f"T (CON GET /.well-known/core) at full rate, {row.result.rate:,.0f} req/s "
                     f"for {row.result.window:.0f} s"],
            ["proxy RSS before → after", f"{x['rss_before'] / 2**20:.1f} MiB → "
                                         f"{x['rss_after'] / 2**20:.1f} MiB "
                                         f"(Δ {x['rss_delta'] / 2**20:+.1f} MiB)"],
            ["exchanges held (sent within 247 s)", _num(x["exchanges_held"])],
            ["**proxy bytes per exchange**", f"**{_num(per)}**"],
            ["RSS during the run (MiB)", samples],
        ]  # fmt: skip
    redis_ok: bool | None = False
    if redis_dedup is None:
        cells.append(["Redis bytes per dedup entry", "n/a (E not run)"])
        redis_ok = None
    elif not redis_dedup.get("keys_sampled"):
        cells.append(["Redis bytes per dedup entry", "n/a (no Redis dedup keys)"])
        redis_ok = None
    else:
        per_entry = redis_dedup["bytes_per_entry"]
        redis_ok = per_entry <= 150
        cells.append(
            ["**Redis bytes per dedup entry** (`MEMORY USAGE`, cb:dd:*)",
             f"**{per_entry:,.0f}** (mean of {redis_dedup['keys_sampled']} keys; "
             f"{redis_dedup['dbsize']:,} keys in the db after E and L)"]
        )  # fmt: skip
    lines.append(_table(["measure", "value"], cells))
    lines.append(
        f"\nTarget: ≤ 300 B proxy memory per exchange — {_verdict(proxy_ok)}; "
        f"≤ 150 B Redis per dedup entry — {_verdict(redis_ok)}.\n"
    )
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    if met is None:
        return "n/a"
    return "**met**" if met else "**not met**"


def settings_text(settings: Settings, argv: Sequence[str]) -> str:
    s = settings
    return "\n".join(
        [
            f"- command: `{' '.join(['python -m bench', *argv])}`",
            f"- scenarios: {','.join(s.scenarios)}; T systems: {', '.join(s.t_systems)}",
            f"- closed loop: {s.clients} clients (one UDP socket and one request in flight "
            f"each), warm-up {s.warmup:g} s, measured window T {s.duration:g} s, "
            f"E {s.e_duration:g} s; L {s.l_duration:g} s; M {s.m_duration:g} s",
            f"- request timeout {s.timeout:g} s (counted, then a new MID; no retransmission)",
            f"- MQTT witness of E and L: {s.subscriber} (MQTT 5, QoS 1)",
            f"- load generator worker processes: {s.loadgen_workers}; proxy workers: "
            f"{s.proxy_workers}; API workers: {s.api_workers}",
            f"- M runs the proxy with COAP_BRIDGE_DEDUP_MAX_ENTRIES={s.m_dedup_max_entries:,} "
            "so that no exchange is evicted before its 247 s",
            "- every process on 127.0.0.1; all of them share the machine's cores with the load "
            "generator and the MQTT subscriber",
        ]
    )


def render(
    bench_rows: Sequence[Row],
    settings: Settings,
    argv: Sequence[str],
    redis_dedup: dict[str, Any] | None,
    notes: Sequence[str] = (),
    started: dt.datetime | None = None,
    elapsed: float | None = None,
) -> str:
    now = started or dt.datetime.now(dt.UTC).astimezone()
    parts = [
        "## Latest run (generated by `make bench`; edits here are overwritten)\n",
        f"Date: {now.strftime('%Y-%m-%d %H:%M %Z')}"
        + (f" · run took {elapsed:.0f} s" if elapsed is not None else "")
        + "\n",
        "Machine:\n",
        "\n".join(f"- {k}: {v}" for k, v in machine().items()) + "\n",
        "Settings:\n",
        settings_text(settings, argv) + "\n",
    ]
    chosen = settings.scenarios
    if "T" in chosen:
        parts.append(table_t(bench_rows))
    if "E" in chosen or "L" in chosen:
        parts.append(table_e(bench_rows))
    if "L" in chosen:
        parts.append(table_l(bench_rows))
    if "M" in chosen:
        parts.append(table_m(bench_rows, redis_dedup))
    if notes:
        parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(parts)


def update_file(path: Path, generated: str) -> None:
    """Replace what lies between the markers; keep everything else (the hand-written part)."""
    block = f"{START}\n{generated.rstrip()}\n{END}"
    if path.exists():
        text = path.read_text()
        start, end = text.find(START), text.find(END)
        if start != -1 and end > start:
            text = text[:start] + block + text[end + len(END) :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = (
            "# Benchmarks\n\n"
            "Run `make bench` (or `python -m bench --help`) to measure. The section between the "
            "`bench:` markers is written by the harness; write by hand only outside it.\n\n"
            + block
            + "\n"
        )
    path.write_text(text)
