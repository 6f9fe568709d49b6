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

from bench.harness import REDIS_SYSTEM, Row, Settings

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


def _loadavg(start: tuple[float, float, float] | None) -> str:
    now = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    if start is None:
        return f"{now} (1 / 5 / 15 min) at the end"
    before = " / ".join(f"{v:.2f}" for v in start)
    return f"{before} at the start, {now} at the end (1 / 5 / 15 min)"


def machine(loadavg_start: tuple[float, float, float] | None = None) -> dict[str, str]:
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
        "load average": _loadavg(loadavg_start),
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
# B: the CoAP server under test; its HTTP origin (and Redis) are shown apart.
_B_SERVER_PARTS = ("libcoap", "proxy")


def _cpu_per_request(row: Row) -> str:
    """CPU µs per answered request of the system under test (all its processes)."""
    cpu = row.extra.get("cpu") or {}
    seconds = sum(v for k, v in cpu.items() if k in _SERVER_PARTS)
    if row.result is None or not row.result.completed or not seconds:
        return "–"
    return f"{seconds / row.result.completed * 1e6:,.0f}"


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
    targets = []
    for system, what in ((REDIS_SYSTEM, "production shape, `--redis-url`"),
                         ("coap-bridge", "no Redis")):  # fmt: skip
        ours = _rate(rows, "T", system)
        if ours is not None:
            met = libcoap is not None and ours >= 0.5 * libcoap
            targets.append(f"{system} ({what}) ≥ 0.5 × libcoap — {_verdict(met)}")
    if not targets:
        targets.append(f"coap-bridge ≥ 0.5 × libcoap — {_verdict(False)}")
    return (
        "### T — termination: CON GET /.well-known/core, closed loop\n\n"
        f"{REDIS_SYSTEM} = `coap-bridge proxy --redis-url` with a redis-server of its own "
        "(the cross-replica claim of the production shape; the proxy answers this request "
        "itself); coap-bridge = the same proxy without Redis.\n\n"
        + _table(header, cells)
        + "\n\nTarget: "
        + "; ".join(targets)
        + ".\n"
    )


R_SYSTEM = "coap-bridge --workers N"
DTLS_SYSTEM = "coap-bridge over DTLS"


def _workers(row: Row) -> str:
    proxy, api = row.extra.get("proxy_workers"), row.extra.get("api_workers")
    return f"{proxy} / {api}" if proxy and api else "–"


def _label(row: Row) -> str:
    if row.system == R_SYSTEM and row.extra.get("proxy_workers"):
        return f"coap-bridge --workers {row.extra['proxy_workers']}"
    return row.system


def utilisation(row: Row) -> dict[str, float]:
    """% of one core per process (group) during the row's run, warm-up and drain included."""
    cpu, wall = row.extra.get("cpu") or {}, row.extra.get("wall")
    if not wall:
        return {}
    return {name: 100 * seconds / wall for name, seconds in cpu.items()}


def _worker_cpu(row: Row) -> list[float]:
    result = row.result if row.result is not None else row.handshakes
    wall = row.extra.get("wall")
    if result is None or not wall or not result.worker_cpu:
        return []
    return [100 * seconds / wall for seconds in result.worker_cpu]


def limit(row: Row) -> str:
    """What held the row back, read off the CPU each process used (a heuristic: a process near
    a full core is the bottleneck; otherwise the machine's cores, shared by everything)."""
    util = utilisation(row)
    if not util:
        return ""
    cores = os.cpu_count() or 1
    other = 100 * (row.extra.get("other_cpu") or 0) / row.extra["wall"]
    total = sum(util.values()) + other
    workers = _worker_cpu(row)
    servers = {k: v for k, v in util.items() if k != "load generator"}
    processes = {"proxy": row.extra.get("proxy_workers") or 1,
                 "api": row.extra.get("api_workers") or 1}  # fmt: skip
    saturated = [
        f"{name} ({v:.0f}% over {processes.get(name, 1)} process(es))"
        for name, v in servers.items()
        if v / processes.get(name, 1) >= 85
    ]
    if workers and max(workers) >= 85:
        return (
            f"the client: a load generator process at {max(workers):.0f}% of a core "
            "(the server had CPU to spare)"
            if not saturated
            else f"both the client (load generator at {max(workers):.0f}%) and {saturated[0]}"
        )
    if saturated:
        return "the server: " + ", ".join(saturated)
    if total >= 0.85 * cores * 100:
        return (
            f"the machine's {cores} cores: everything together used {total:.0f}% of "
            f"{cores * 100}% ({other:.0f}% by processes outside the bench), no single process "
            "at a full core"
        )
    busiest = max(servers.items(), key=lambda item: item[1]) if servers else ("–", 0.0)
    return (
        f"no process at a full core (busiest: {busiest[0]} {busiest[1]:.0f}%; total "
        f"{total:.0f}% of {cores * 100}%): waiting (round trips, batching), not CPU"
    )


def cpu_line(row: Row) -> str:
    """One line per row: CPU µs per request and % of one core per process, and the limit."""
    util = utilisation(row)
    result = row.result
    if not util or result is None or not result.completed:
        return ""
    cpu = row.extra.get("cpu") or {}
    parts = ", ".join(
        f"{name} {cpu[name] / result.completed * 1e6:,.0f} µs ({util[name]:.0f}%)" for name in cpu
    )
    workers = _worker_cpu(row)
    per_worker = (
        f"; load generator per process: {', '.join(f'{w:.0f}%' for w in workers)}"
        if workers and len(workers) > 1
        else ""
    )
    other = 100 * (row.extra.get("other_cpu") or 0) / row.extra["wall"]
    return (
        f"- {row.scenario} {_label(row)}: CPU per request (and % of one core) — {parts}"
        f"{per_worker}; outside the bench {other:.0f}%. Limited by {limit(row)}."
    )


def table_e(rows: Sequence[Row]) -> str:
    header = ["system", "proxy / API workers", "req/s", "p50 ms", "p99 ms", "p99.9 ms",
              "timeouts", "codes", "server CPU µs/req", "× aiocoap", "× plain 1 worker", "acked",
              "lost", "duplicated", "status"]  # fmt: skip
    aiocoap = _rate(rows, "E", "aiocoap")
    one = _rate(rows, "E", "coap-bridge")
    cells = []
    e_rows = [r for r in rows if r.scenario == "E"]
    for row in e_rows:
        if row.result is None:
            cells.append([_label(row), *_error_row(row, len(header))[1:]])
            continue
        rate = row.result.rate
        x = row.extra
        versus_one = _ratio(rate, one) if row.system != "aiocoap" else "–"
        cells.append(
            [_label(row), _workers(row), _num(rate), *_latency_cells(row),
             _num(row.result.timeouts), _codes(row), _cpu_per_request(row), _ratio(rate, aiocoap),
             versus_one, _num(x.get("acked")), _num(x.get("lost")), _num(x.get("duplicated")),
             x.get("status", "baseline")]
        )  # fmt: skip
    ours = [r for r in e_rows if r.system != "aiocoap"]
    clean = bool(ours) and all(r.extra.get("status") == "OK" for r in ours)
    plain = [r for r in ours if r.system in ("coap-bridge", R_SYSTEM) and r.result is not None]
    best = max(plain, key=lambda r: r.result.rate if r.result else 0.0, default=None)
    best_rate = best.result.rate if best is not None and best.result is not None else None
    met = best_rate is not None and aiocoap is not None and best_rate >= aiocoap and clean
    lines = [
        "### E — telemetry end to end: CON POST /?t=bench/x, 100-byte payload, closed loop\n",
        "coap-bridge = proxy → HTTP → API → Redis + MQTT QoS 1 (Mosquitto) → PUBACK → 2.04, "
        "dedup shared in Redis; aiocoap = a POST resource that only answers 2.04. "
        "`--workers N`: the same chain through one `coap-bridge proxy --workers N` "
        "(SO_REUSEPORT: N processes on one port, the kernel spreads clients by source address; "
        "dedup shared through Redis) and the API with the workers shown. Over DTLS: "
        "every client is a device with its own PSK identity (dedup keys on identity and MID), "
        "its session established before the clock starts, one request in flight each.\n",
        _table(header, cells),
        "",
    ]
    if best is not None and best.result is not None:
        n = best.extra.get("proxy_workers", 1)
        others = [r for r in plain if r is not best and r.result is not None]
        versus = "; ".join(
            f"{_label(r)}: {r.result.rate:,.0f} req/s" for r in others if r.result is not None
        )
        lines.append(
            f"Best N on this machine: **{n} proxy worker(s) / {best.extra.get('api_workers')} "
            f"API worker(s)**, {best.result.rate:,.0f} req/s"
            + (f" ({versus})" if versus else "")
            + f". All processes share this machine's {os.cpu_count()} cores (load generator, "
            "Redis, Mosquitto and the witness included): compare the CPU per request below; "
            "differences in req/s under ~10% are noise.\n"
        )
    lines.append(
        f"Target: best coap-bridge ≥ 1.0 × aiocoap, zero lost or duplicated in every row — "
        f"{_verdict(met)}.\n"
    )
    cpu_lines = [cpu_line(r) for r in e_rows if cpu_line(r)]
    if cpu_lines:
        lines.append(
            "CPU per answered request and share of one core per process during each run "
            "(warm-up and drain included; server CPU in the table counts redis, mosquitto, "
            "api, proxy):\n\n" + "\n".join(cpu_lines) + "\n"
        )
    return "\n".join(lines)


def table_h(rows: Sequence[Row]) -> str:
    header = ["system", "handshakes/s", "p50 ms", "p99 ms", "failed", "in flight",
              "client processes", "server CPU µs/handshake", "proxy CPU", "client CPU",
              "status"]  # fmt: skip
    cells = []
    notes = []
    for row in rows:
        if row.scenario != "H":
            continue
        h = row.handshakes
        if h is None:
            cells.append(_error_row(row, len(header)))
            continue
        util = utilisation(row)
        proxy_seconds = (row.extra.get("cpu") or {}).get("proxy")
        per = f"{proxy_seconds / h.completed * 1e6:,.0f}" if proxy_seconds and h.completed else "–"
        clients = ", ".join(f"{w:.0f}%" for w in _worker_cpu(row)) or "–"
        cells.append(
            [row.system, _num(h.rate), _num(h.p50_ms, 2), _num(h.p99_ms, 2), _num(h.failed),
             _num(h.concurrency), _num(h.workers), per, f"{util.get('proxy', 0):.0f}%", clients,
             short_error(row.error) if row.error else "OK"]
        )  # fmt: skip
        notes.append(f"Limited by {limit(row)}.")
    return (
        "### H — DTLS handshakes: full handshakes with fresh sessions\n\n"
        "Each handshake is a new UDP socket (source ports taken in turn from a range of 4,000 "
        "per client process) and a new tinydtls client context: ClientHello, "
        "HelloVerifyRequest (cookie), ClientHello, ServerHello…Done, ClientKeyExchange + "
        "Finished, Finished, then close_notify (so the proxy frees the peer). PSK identities "
        "are the devices of the DTLS row, keys mirrored from Redis. Server CPU per handshake "
        "counts the close too. No baseline in this run.\n\n"
        + _table(header, cells)
        + ("\n\n" + " ".join(notes) if notes else "")
        + "\n"
    )


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


def table_b(rows: Sequence[Row]) -> str:
    header = ["system", "clients", "block req/s", "blocks/s", "transfers/s", "p50 ms/block",
              "p99 ms/block", "timeouts", "corrupt", "codes", "server CPU µs/block",
              "RSS before → peak MiB", "RSS KiB / transfer in progress",
              "× libcoap blocks/s"]  # fmt: skip
    b_rows = [r for r in rows if r.scenario == "B"]
    base = next((r.extra.get("blocks_per_second") for r in b_rows if r.system == "libcoap"), None)
    cells = []
    for row in b_rows:
        r = row.result
        if r is None:
            cells.append(_error_row(row, len(header)))
            continue
        x = row.extra
        cpu = x.get("cpu") or {}
        seconds = sum(v for k, v in cpu.items() if k in _B_SERVER_PARTS)
        per_block = f"{seconds / r.completed * 1e6:,.0f}" if seconds and r.completed else "–"
        upper, corrected = x.get("rss_per_transfer"), x.get("rss_per_transfer_corrected")
        memory = (
            f"{_num(corrected / 1024 if corrected is not None else None, 1)} "
            f"(≤ {_num(upper / 1024 if upper is not None else None, 1)})"
        )
        cells.append(
            [row.system, _num(x.get("clients")), _num(r.rate), _num(x.get("blocks_per_second")),
             _num(x.get("transfers_per_second"), 1), _num(r.p50_ms, 2), _num(r.p99_ms, 2),
             _num(r.timeouts), _num(x.get("corrupt")), _codes(row), per_block,
             f"{x['rss_before'] / 2**20:.1f} → {x['rss_peak'] / 2**20:.1f}", memory,
             _ratio(x.get("blocks_per_second"), base)]
        )  # fmt: skip
    sizes = {(r.extra.get("resource_bytes"), r.extra.get("block_size")) for r in b_rows}
    size, block = next(iter(sizes)) if len(sizes) == 1 else (None, None)
    what = (
        f"{size // 1024} KiB resource, Block2 with {block}-byte blocks"
        if size and block
        else "a large resource fetched block-wise"
    )
    cpu_lines = [cpu_line(r) for r in b_rows if cpu_line(r)]
    for row in b_rows:
        answers = row.extra.get("origin_answers")
        if answers:
            counts = ", ".join(f"{code}: {count:,}" for code, count in sorted(answers.items()))
            cpu_lines.append(
                f"- B {row.system}: the origin answered {counts} — "
                f"{row.extra['origin_requests_per_block']:.3f} HTTP requests per block "
                "(206 = one range request per block; 200 = a whole body the proxy keeps)."
            )
    clean = bool(b_rows) and all(
        r.result is not None
        and not r.extra.get("corrupt")
        and not r.extra.get("etag_changes")
        and set(r.result.codes) == {"2.05"}
        for r in b_rows
    )
    return (
        f"### B — block-wise: {what} (RFC 7959), closed loop\n\n"
        "Every client fetches the whole resource block after block (early negotiation: "
        "Block2 in the first request), then starts over; one block request in flight per "
        "client, a new MID and token for each. Every payload is checked against the expected "
        "bytes, the ETag must hold within a transfer. libcoap = `coap-server-notls` serving "
        "what a `coap-client-notls -m put -b` stored at /example_data; "
        f"{REDIS_SYSTEM} = `coap-bridge proxy --redis-url` in front of the bench's HTTP origin "
        "(`bench/origin.py`, byte ranges, ETag), route marked idempotent. "
        "Latency and req/s per block request; a transfer counts when its last block arrives "
        "inside the window. RSS per transfer in progress: the server's RSS line fitted over "
        "the window, followed back to the start of the load, above the RSS before, divided by "
        "the clients (in brackets the plain (peak − before) / clients, an upper bound that "
        "also holds the per-request growth such as the 247 s exchange cache). Server CPU "
        "counts libcoap or the proxy only; Redis and the origin are in the line below.\n\n"
        + _table(header, cells)
        + f"\n\nEvery block right, no ETag change, only 2.05 — {_verdict(clean)}.\n"
        + ("\n" + "\n".join(cpu_lines) + "\n" if cpu_lines else "")
    )


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
            f"- B: {', '.join(s.b_systems)}; {s.b_clients} clients, {s.b_size // 1024} KiB in "
            f"{s.b_block_size}-byte blocks, window {s.b_duration:g} s, "
            f"{s.b_loadgen_workers} load generator process(es)",
            f"- MQTT witness of E and L: {s.subscriber} (MQTT 5, QoS 1)",
            f"- load generator worker processes: {s.loadgen_workers}; proxy workers: "
            f"{s.proxy_workers}; API workers: {s.api_workers}",
            f"- M runs the proxy with COAP_BRIDGE_DEDUP_MAX_ENTRIES={s.m_dedup_max_entries:,} "
            "so that no exchange is evicted before its 247 s",
            f"- R: proxy --workers {s.r_workers}, API --workers {s.r_api_workers}; D: "
            f"{s.dtls_clients} DTLS sessions (devices with a PSK each), "
            f"{s.dtls_loadgen_workers} load generator process(es), window {s.e_duration:g} s; "
            f"H: {s.h_workers} client process(es) × {s.h_concurrency} handshakes in flight, "
            f"window {s.h_duration:g} s",
            "- every proxy gets a free port for coaps (or `--coaps-port=off`), never 5684",
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
    loadavg_start: tuple[float, float, float] | None = None,
) -> str:
    now = started or dt.datetime.now(dt.UTC).astimezone()
    parts = [
        "## Latest run (generated by `make bench`; edits here are overwritten)\n",
        f"Date: {now.strftime('%Y-%m-%d %H:%M %Z')}"
        + (f" · run took {elapsed:.0f} s" if elapsed is not None else "")
        + "\n",
        "Machine:\n",
        "\n".join(f"- {k}: {v}" for k, v in machine(loadavg_start).items()) + "\n",
        "Settings:\n",
        settings_text(settings, argv) + "\n",
    ]
    chosen = settings.scenarios
    if "T" in chosen:
        parts.append(table_t(bench_rows))
    if "B" in chosen:
        parts.append(table_b(bench_rows))
    if set(chosen) & {"E", "L", "R", "D"}:
        parts.append(table_e(bench_rows))
    if "L" in chosen:
        parts.append(table_l(bench_rows))
    if "H" in chosen:
        parts.append(table_h(bench_rows))
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
