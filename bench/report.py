"""BENCHMARKS.md's generated section, rendered from the results JSON the harness writes (its
one output; ``python -m bench.report results.json --output BENCHMARKS.md`` renders it again).

Every scenario's table is declared in :data:`TABLES`: title, intro, columns (header → cell of
one row) and the lines after it (targets, CPU per request, what limited the run)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
Row = dict[str, Any]  # one row of the results JSON
REDIS_SYSTEM = "coap-bridge+redis"
R_SYSTEM = "coap-bridge --workers N"
TEMPLATE_SYSTEM = "coap-bridge, 10-field template"  # bench/harness.py (ET)
OBSERVED_SYSTEM = "coap-bridge, metrics scraped + info log"  # bench/harness.py (EO)
RB_SYSTEM = "coap-bridge, CID sessions"  # bench/harness.py (RB)

# --- the machine (recorded in the results when the run ends) ---------------------------------


def _first_line(argv: Sequence[str], pattern: str = "") -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = [x.strip() for x in (out.stdout + out.stderr).splitlines() if x.strip()]
    return next((x for x in lines if re.search(pattern, x)), "unknown")


def _proc(path: str, prefix: str) -> str:
    lines = Path(path).read_text().splitlines()
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith(prefix)), "unknown")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(loadavg_start: Sequence[float]) -> dict[str, str]:
    now, before = (" / ".join(f"{v:.2f}" for v in avg) for avg in (os.getloadavg(), loadavg_start))
    git = ["git", "-C", str(Path(__file__).resolve().parent.parent)]
    dirty = _first_line([*git, "status", "--porcelain", "-uno"]) not in ("unknown", "not found")
    return {
        "CPU": _proc("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "RAM": f"{int(_proc('/proc/meminfo', 'MemTotal:').split()[0]) / 2**20:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_version()} ({sys.executable})",
        "libcoap": _first_line(["coap-server-notls", "-h"], r"v\d"),
        **{name: _version(name) for name in ("aiocoap", "uvloop")},
        "redis-server": _first_line(["redis-server", "--version"]),
        "mosquitto": _first_line(["mosquitto", "-h"], r"version"),
        "coap-bridge": _first_line([*git, "rev-parse", "--short", "HEAD"])
        + (" + uncommitted changes" if dirty else ""),
        "load average": f"{before} at the start, {now} at the end (1 / 5 / 15 min)",
    }


# --- cells -----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}×" if value and base else "–"


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "**met**" if met else "**not met**"


def _codes(row: Row) -> str:
    return " ".join(f"{code}: {count:,}" for code, count in sorted(row["codes"].items()))


def _rate(rows: Sequence[Row], scenario: str, system: str, key: str = "rate") -> float | None:
    found = (r.get(key) for r in rows if r["scenario"] == scenario and r["system"] == system)
    return next((value for value in found if value is not None), None)


def _label(row: Row) -> str:
    if row["system"] == R_SYSTEM and row.get("proxy_workers"):
        return f"coap-bridge --workers {row['proxy_workers']}"
    return str(row["system"])


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


def _cpu_per(row: Row, parts: Sequence[str], count: int | None) -> str:
    """Server CPU µs per answered request (block, handshake) over the processes ``parts``."""
    seconds = sum(v for k, v in (row.get("cpu") or {}).items() if k in parts)
    return f"{seconds / count * 1e6:,.0f}" if seconds and count else "–"


def utilisation(row: Row) -> dict[str, float]:
    """% of one core per process (group) during the row's run, warm-up and drain included."""
    wall = row.get("wall")
    return {k: 100 * s / wall for k, s in (row.get("cpu") or {}).items()} if wall else {}


def _worker_cpu(row: Row) -> list[float]:
    wall = row.get("wall")
    return [100 * s / wall for s in row.get("worker_cpu") or []] if wall else []


def limit(row: Row) -> str:
    """What held the row back, read off the CPU each process used: the first of these that
    holds (a process near a full core is a bottleneck; else the cores everything shares)."""
    util = utilisation(row)
    if not util:
        return ""
    cores = os.cpu_count() or 1
    other = 100 * (row.get("other_cpu") or 0) / row["wall"]
    total, client = sum(util.values()) + other, max(_worker_cpu(row) or [0.0])
    servers = {k: v for k, v in util.items() if k != "load generator"}
    n = {"proxy": row.get("proxy_workers") or 1, "api": row.get("api_workers") or 1}
    full = ", ".join(f"{k} ({v:.0f}% over {n.get(k, 1)} process(es))"
                     for k, v in servers.items() if v / n.get(k, 1) >= 85)  # fmt: skip
    busiest = max(servers.items(), key=lambda item: item[1], default=("–", 0.0))
    rules = [
        (client >= 85 and full, f"both the client (load generator at {client:.0f}%) and {full}"),
        (client >= 85, f"the client: a load generator process at {client:.0f}% of a core"),
        (full, f"the server: {full}"),
        (total >= 85 * cores, f"the machine's {cores} cores: everything together used "
         f"{total:.0f}% of {cores * 100}% ({other:.0f}% outside the bench)"),
        (True, f"no process at a full core (busiest: {busiest[0]} {busiest[1]:.0f}%; total "
         f"{total:.0f}% of {cores * 100}%): waiting (round trips, batching), not CPU"),
    ]  # fmt: skip
    return next(text for holds, text in rules if holds)


def cpu_line(row: Row) -> str:
    """One line per row: CPU µs per request and % of one core per process, and the limit."""
    util, done = utilisation(row), row.get("completed")
    if not util or not done:
        return ""
    cpu = row["cpu"]
    parts = ", ".join(f"{k} {cpu[k] / done * 1e6:,.0f} µs ({util[k]:.0f}%)" for k in cpu)
    workers = _worker_cpu(row)
    per_worker = (
        f"; load generator per process: {', '.join(f'{w:.0f}%' for w in workers)}"
        if len(workers) > 1
        else ""
    )
    other = 100 * (row.get("other_cpu") or 0) / row["wall"]
    return (
        f"- {row['scenario']} {_label(row)}: CPU per request (and % of one core) — {parts}"
        f"{per_worker}; outside the bench {other:.0f}%. Limited by {limit(row)}."
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


# --- one declarative table per scenario ------------------------------------------------------

Cell = Callable[[Row, Sequence[Row]], str]  # (this row, all rows) → text


def _key(name: str, digits: int = 0, default: str = "–") -> Cell:
    return lambda r, _: default if r.get(name) is None else _num(r[name], digits)


LATENCY: list[tuple[str, Cell]] = [
    ("p50 ms", _key("p50_ms", 2)), ("p99 ms", _key("p99_ms", 2)), ("p99.9 ms", _key("p999_ms", 2)),
    ("timeouts", _key("timeouts")), ("codes", lambda r, _: _codes(r)),
]  # fmt: skip
SERVER_CPU: Cell = lambda r, _: _cpu_per(r, _SERVER_PARTS, r["completed"])  # noqa: E731
DELIVERY: list[tuple[str, Cell]] = [("lost", _key("lost")), ("duplicated", _key("duplicated"))]


@dataclass(frozen=True)
class Table:
    scenario: str
    title: str  # may name {what}, filled in by ``what(rows)``
    intro: str
    columns: Sequence[tuple[str, Cell]]
    after: Callable[[Sequence[Row], Sequence[Row]], list[str]]  # (its rows, all rows) → lines
    what: Callable[[Sequence[Row]], str] = lambda rows: ""

    def render(self, all_rows: Sequence[Row]) -> str:
        rows = [r for r in all_rows if r["scenario"] == self.scenario]
        cells = [
            [cell(r, all_rows) for _, cell in self.columns]
            if r.get("rate") is not None
            else [_label(r), short_error(r.get("error"))] + ["–"] * (len(self.columns) - 2)
            for r in rows
        ]
        title = self.title.format(what=self.what(rows))
        body = _table([header for header, _ in self.columns], cells)
        return (
            "\n\n".join([title, self.intro, body, *filter(None, self.after(rows, all_rows))]) + "\n"
        )


def _t_after(rows: Sequence[Row], all_rows: Sequence[Row]) -> list[str]:
    libcoap = _rate(rows, "T", "libcoap")
    targets = [
        f"{system} ({what}) ≥ 0.5 × libcoap — "
        + _verdict(libcoap is not None and ours >= 0.5 * libcoap)
        for system, what in (
            (REDIS_SYSTEM, "production shape, `--redis-url`"),
            ("coap-bridge", "no Redis"),
        )
        if (ours := _rate(rows, "T", system)) is not None
    ] or [f"coap-bridge ≥ 0.5 × libcoap — {_verdict(False)}"]
    return ["Target: " + "; ".join(targets) + "."]


def _e_after(rows: Sequence[Row], all_rows: Sequence[Row]) -> list[str]:
    aiocoap = _rate(rows, "E", "aiocoap")
    ours = [r for r in rows if r["system"] != "aiocoap"]
    clean = bool(ours) and all(r.get("status") == "OK" for r in ours)
    plain = [r for r in ours if r["system"] in ("coap-bridge", R_SYSTEM) and r.get("rate")]
    best = max(plain, key=lambda r: r["rate"], default=None)
    lines = []
    if best is not None:
        versus = "; ".join(f"{_label(r)}: {r['rate']:,.0f} req/s" for r in plain if r is not best)
        lines.append(
            f"Best N on this machine: **{best.get('proxy_workers', 1)} proxy worker(s) / "
            f"{best.get('api_workers')} API worker(s)**, {best['rate']:,.0f} req/s"
            + (f" ({versus})" if versus else "")
            + f". All processes share this machine's {os.cpu_count()} cores (load generator, "
            "Redis, Mosquitto and the witness included): compare the CPU per request below; "
            "differences in req/s under ~10% are noise."
        )
    met = best is not None and aiocoap is not None and best["rate"] >= aiocoap and clean
    lines.append(
        "Target: best coap-bridge ≥ 1.0 × aiocoap, zero lost or duplicated in every row — "
        f"{_verdict(met)}."
    )
    if template := _template_cost(rows):
        lines.append(template)
    if observed := _observed_cost(rows):
        lines.append(observed)
    if cpu_lines := [line for r in rows if (line := cpu_line(r))]:
        lines.append(
            "CPU per answered request and share of one core per process during each run "
            "(warm-up and drain included; server CPU in the table counts redis, mosquitto, "
            "api, proxy):\n\n" + "\n".join(cpu_lines)
        )
    return lines


def _api_us(row: Row | None) -> float | None:
    seconds = (row or {}).get("cpu", {}).get("api")
    done = (row or {}).get("completed")
    return seconds / done * 1e6 if seconds and done else None


def _template_cost(rows: Sequence[Row]) -> str:
    """ET's line: what the translation costs per message, as API CPU beside E raw's."""
    found = {r["system"]: r for r in rows if r.get("rate")}
    raw, translated = found.get("coap-bridge"), found.get(TEMPLATE_SYSTEM)
    raw_us, translated_us = _api_us(raw), _api_us(translated)
    if raw is None or translated is None or raw_us is None or translated_us is None:
        return ""
    return (
        f"Payload template (ET): a 10-field template costs the API "
        f"{translated_us - raw_us:+,.0f} µs of CPU per message ({raw_us:,.0f} → "
        f"{translated_us:,.0f} µs), {raw['rate']:,.0f} → {translated['rate']:,.0f} req/s; "
        "one run each, so differences of a few µs are within the noise."
    )


def _proxy_us(row: Row) -> float | None:
    seconds, done = row.get("cpu", {}).get("proxy"), row.get("completed")
    return seconds / done * 1e6 if seconds and done else None


def _observed_cost(rows: Sequence[Row]) -> str:
    """EO's line: E with the metrics listener scraped and the request log at info, against E
    raw (issue 18's bar: at most 3 % fewer req/s)."""
    found = {r["system"]: r for r in rows if r.get("rate")}
    raw, observed = found.get("coap-bridge"), found.get(OBSERVED_SYSTEM)
    if raw is None or observed is None:
        return ""
    change = observed["rate"] / raw["rate"] - 1
    raw_us, observed_us = _proxy_us(raw), _proxy_us(observed)
    cpu = (
        f"; proxy CPU {raw_us:,.0f} → {observed_us:,.0f} µs per request"
        if raw_us is not None and observed_us is not None
        else ""
    )
    # Another program's CPU during either run moves req/s by more than the 3 % judged here:
    # then the rates are not compared (the proxy's CPU per request still is).
    busy = max(_outside_share(raw), _outside_share(observed))
    verdict = (
        f"not judged: {busy:.0f}% of a core was used outside the bench during one of the two "
        "runs (compare the proxy CPU per request)"
        if busy > OUTSIDE_LIMIT
        else _verdict(change >= -0.03)
    )
    return (
        f"Metrics on (EO): /metrics of the proxy and the API scraped every second, request log "
        f"at info: {raw['rate']:,.0f} → {observed['rate']:,.0f} req/s ({change:+.1%}){cpu}, "
        f"{observed.get('scrapes', 0)} scrapes. Target: no more than 3 % fewer — "
        f"{verdict}; one run each, differences of a few % are within the noise."
    )


# % of one core used outside the bench above which EO's two rates are not compared.
OUTSIDE_LIMIT = 5.0


def _outside_share(row: Row) -> float:
    wall = row.get("wall")
    return 100 * (row.get("other_cpu") or 0) / wall if wall else 0.0


def _l_met(rows: Sequence[Row]) -> bool:
    last = next((r for r in reversed(rows) if r.get("rate") is not None), None)
    return last is not None and last["p99_ms"] <= 10.0 and last.get("status") == "OK"


def _b_what(rows: Sequence[Row]) -> str:
    sizes = {(r.get("resource_bytes"), r.get("block_size")) for r in rows}
    size, block = next(iter(sizes)) if len(sizes) == 1 else (None, None)
    if size and block:
        return f"{size // 1024} KiB resource, Block2 with {block}-byte blocks"
    return "a large resource fetched block-wise"


def _b_after(rows: Sequence[Row], all_rows: Sequence[Row]) -> list[str]:
    clean = bool(rows) and all(
        r.get("rate") is not None
        and not r.get("corrupt")
        and not r.get("etag_changes")
        and set(r["codes"]) == {"2.05"}
        for r in rows
    )
    lines = [line for r in rows if (line := cpu_line(r))]
    for r in rows:
        if answers := r.get("origin_answers"):
            counts = ", ".join(f"{code}: {count:,}" for code, count in sorted(answers.items()))
            lines.append(
                f"- B {r['system']}: the origin answered {counts} — "
                f"{r['origin_requests_per_block']:.3f} HTTP requests per block "
                "(206 = one range request per block; 200 = a whole body the proxy keeps)."
            )
    verdict = f"Every block right, no ETag change, only 2.05 — {_verdict(clean)}."
    return [verdict, "\n".join(lines)] if lines else [verdict]


def _b_memory(r: Row, _: Sequence[Row]) -> str:
    upper, corrected = r.get("rss_per_transfer"), r.get("rss_per_transfer_corrected")
    return (
        f"{_num(corrected / 1024 if corrected is not None else None, 1)} "
        f"(≤ {_num(upper / 1024 if upper is not None else None, 1)})"
    )


def _f_what(rows: Sequence[Row]) -> str:
    sizes = {(r.get("resource_bytes"), r.get("block_size")) for r in rows}
    size, block = next(iter(sizes)) if len(sizes) == 1 else (None, None)
    if size and block:
        return f"a {size // 1024} KiB image in {block}-byte blocks"
    return "an image block-wise"


def _f_after(rows: Sequence[Row], all_rows: Sequence[Row]) -> list[str]:
    ours = [r for r in rows if r["system"] != "libcoap"]
    clean = bool(rows) and all(r.get("status") == "OK" for r in rows)
    lines = [
        f"Every block right, the ETag constant, no timeout — {_verdict(clean and bool(ours))}."
    ]
    if cpu_lines := [line for r in rows if (line := cpu_line(r))]:
        lines.append("\n".join(cpu_lines))
    return lines


def _column(header: str, key: str, digits: int = 0) -> tuple[str, Cell]:
    return header, _key(key, digits)


SYSTEM: tuple[str, Cell] = ("system", lambda r, _: _label(r))


def _versus(scenario: str, base: str) -> Cell:
    return lambda r, rows: _ratio(r["rate"], _rate(rows, scenario, base))


TABLES: dict[str, Table] = {
    "T": Table(
        "T",
        "### T — termination: CON GET /.well-known/core, closed loop",
        f"{REDIS_SYSTEM} = `coap-bridge proxy --redis-url` with a redis-server of its own (the "
        "production shape; the proxy answers this request itself); coap-bridge = no Redis.",
        [SYSTEM, _column("req/s", "rate"), *LATENCY, ("server CPU µs/req", SERVER_CPU),
         ("× libcoap", _versus("T", "libcoap")), ("× aiocoap", _versus("T", "aiocoap"))],
        _t_after,
    ),
    "B": Table(
        "B",
        "### B — block-wise: {what} (RFC 7959), closed loop",
        "Every client fetches the whole resource block after block (Block2 from the first "
        "request), then starts over; one block request in flight, a new MID and token each; "
        "every payload checked, the ETag must hold within a transfer. libcoap serves what "
        f"`coap-client-notls -m put` stored; {REDIS_SYSTEM} is the proxy in front of "
        "`bench/origin.py` (byte ranges), route idempotent. RSS per transfer in progress: the "
        "RSS line fitted over the window, followed back to the start, above the RSS before, "
        "per client (in brackets (peak − before) / clients, an upper bound). Server CPU: "
        "libcoap or the proxy only.",
        [SYSTEM, _column("clients", "clients"), _column("block req/s", "rate"),
         _column("blocks/s", "blocks_per_second"),
         _column("transfers/s", "transfers_per_second", 1), _column("p50 ms/block", "p50_ms", 2),
         _column("p99 ms/block", "p99_ms", 2), _column("timeouts", "timeouts"),
         _column("corrupt", "corrupt"), ("codes", lambda r, _: _codes(r)),
         ("server CPU µs/block", lambda r, _: _cpu_per(r, _B_SERVER_PARTS, r["completed"])),
         ("RSS before → peak MiB",
          lambda r, _: f"{r['rss_before'] / 2**20:.1f} → {r['rss_peak'] / 2**20:.1f}"),
         ("RSS KiB / transfer in progress", _b_memory),
         ("× libcoap blocks/s", lambda r, rows: _ratio(
             r.get("blocks_per_second"), _rate(rows, "B", "libcoap", "blocks_per_second")))],
        _b_after,
        what=_b_what,
    ),
    "F": Table(
        "F",
        "### F — firmware downloads: {what} (RFC 7959 Block2) by many clients, closed loop",
        "The image (random bytes, new each run) is uploaded with `PUT /firmware/{version}` "
        "before the clock; every client then downloads it whole, block after block (Block2 "
        "from the first request, B's load generator), and starts over: every payload checked "
        "against the image, the ETag must hold within a transfer. coap-bridge = proxy (route "
        "`/firmware/{version}`, idempotent: one HTTP byte range per block) → API → Redis "
        "store, every client the one device registered for 127.0.0.1; libcoap = "
        "`coap-server-notls` serving the same bytes, PUT to /example_data. Images/s: blocks/s "
        "over the image's blocks (a transfer may outlast the window). CPU per block over "
        "every answered block, warm-up included. OK: every block right, no timeout.",
        [SYSTEM, _column("clients", "clients"), _column("blocks/s", "blocks_per_second"),
         _column("images/s", "image_transfers_per_second", 2),
         _column("whole transfers", "transfers"),
         _column("p50 ms/block", "p50_ms", 2), _column("p99 ms/block", "p99_ms", 2),
         _column("timeouts", "timeouts"), _column("corrupt", "corrupt"),
         ("proxy (libcoap) CPU µs/block", lambda r, _: _num(
             r.get("proxy_cpu_us_per_block", r.get("libcoap_cpu_us_per_block")))),
         _column("API CPU µs/block", "api_cpu_us_per_block"),
         _column("Redis CPU µs/block", "redis_cpu_us_per_block", 1),
         ("× libcoap blocks/s", lambda r, rows: _ratio(
             r.get("blocks_per_second"), _rate(rows, "F", "libcoap", "blocks_per_second"))),
         ("status", lambda r, _: r.get("status", "–"))],
        _f_after,
        what=_f_what,
    ),
    "E": Table(
        "E",
        "### E — telemetry end to end: CON POST /?t=bench/x, 100-byte payload, closed loop",
        "coap-bridge = proxy → HTTP → API → Redis + MQTT QoS 1 (Mosquitto) → 2.04, dedup in "
        "Redis; aiocoap = a POST that only answers 2.04. `--workers N`: one `coap-bridge proxy "
        "--workers N` (SO_REUSEPORT) and the API workers shown. Over DTLS: every client a "
        "device with its own PSK, its session up before the clock starts. OK: every request "
        "answered 2.04, each acknowledged message delivered once.",
        [SYSTEM,
         ("proxy / API workers", lambda r, _: (
             f"{r['proxy_workers']} / {r['api_workers']}"
             if r.get("proxy_workers") and r.get("api_workers") else "–")),
         _column("req/s", "rate"), *LATENCY, ("server CPU µs/req", SERVER_CPU),
         ("× aiocoap", _versus("E", "aiocoap")),
         ("× plain 1 worker", lambda r, rows: (
             "–" if r["system"] == "aiocoap" else _versus("E", "coap-bridge")(r, rows))),
         _column("acked", "acked"), *DELIVERY,
         ("status", lambda r, _: r.get("status", "baseline"))],
        _e_after,
    ),
    "L": Table(
        "L",
        "### L — latency: E in open loop at 50% of E's measured maximum",
        "Latency from each request's scheduled send time (bursts of ≤ 1 ms, the event loop's "
        "timer granularity).",
        [SYSTEM, _column("offered req/s", "offered_rate"), _column("achieved req/s", "rate"),
         *LATENCY, *DELIVERY, ("status", lambda r, _: r.get("status", "–"))],
        lambda rows, _: [f"Target: p99 ≤ 10 ms — {_verdict(_l_met(rows))}."],
    ),
    "H": Table(
        "H",
        "### H — DTLS handshakes: full handshakes with fresh sessions",
        "Each handshake a new UDP socket (source ports in turn from a range) and a new tinydtls "
        "context: ClientHello, HelloVerifyRequest (cookie), ClientHello, the PSK exchange, both "
        "Finished, then close_notify. PSK identities of the DTLS row. Server CPU counts the "
        "close too.",
        [SYSTEM, _column("handshakes/s", "rate"), _column("p50 ms", "p50_ms", 2),
         _column("p99 ms", "p99_ms", 2), _column("failed", "handshake_failures"),
         _column("in flight", "concurrency"), _column("client processes", "workers"),
         ("server CPU µs/handshake", lambda r, _: _cpu_per(r, ("proxy",), r["completed"])),
         ("proxy CPU", lambda r, _: f"{utilisation(r).get('proxy', 0):.0f}%"),
         ("client CPU", lambda r, _: ", ".join(f"{w:.0f}%" for w in _worker_cpu(r)) or "–"),
         ("status", lambda r, _: short_error(r["error"]) if r.get("error") else "OK")],
        lambda rows, _: [" ".join(f"Limited by {limit(r)}." for r in rows if "rate" in r)],
    ),
    "O": Table(
        "O",
        "### O — observing devices: one command each, fanned out (RFC 7641 through the proxy)",
        "Every device a UDP socket on a loopback address of its own (plain CoAP names a device "
        "by its source address), registered over the management API, observing "
        "`/commands/{iccid}` (CON GET, Observe=0) through one proxy worker before the clock "
        "starts; then one JSON command per device is queued with `POST "
        "/devices/{iccid}/commands`, many at once. Each device ACKs every CON at once. "
        "Notifications/s: devices that got their command, over the time from the first POST "
        "to the last ACK. Latency: POST answered → the device has the notification (its ACK "
        "leaves at once). Proxy RSS per relation: (RSS with the relations − RSS before) / "
        "relations. Redis per queued command: `used_memory` less client buffers across "
        "queueing one command each for other devices that do not observe (MEMORY USAGE of "
        "their keys in brackets). Delivered: `GET /devices/{iccid}/commands` of a sample. "
        "Ended: relations the proxy ended with an error notification (the device registers "
        "again, as RFC 7641 §4.2 leaves it to); 503: API calls answered 503 and made again. OK: "
        "every device got its own command exactly once and the sample is all delivered.",
        [SYSTEM, _column("devices", "devices"),
         ("registered", lambda r, _: _num((r.get("registration") or {}).get("registered"))),
         _column("notifications/s", "notifications_per_second"),
         _column("p50 ms", "p50_ms", 1), _column("p99 ms", "p99_ms", 1),
         _column("missing", "missing"), _column("duplicates", "duplicates"),
         ("delivered (sample)", lambda r, _: f"{r['delivered_sampled']:,} / {r['sampled']:,}"),
         _column("proxy B/relation", "rss_per_relation"),
         _column("proxy CPU µs/notification", "proxy_cpu_us_per_notification"),
         ("Redis B/queued command", lambda r, _: (
             f"{_num(r.get('redis_bytes_per_command'))} "
             f"({_num(r.get('redis_key_bytes_per_command'))})")),
         ("ended / 503 retried", lambda r, _: (
             f"{_num(r.get('relations_ended'))} / "
             f"{_num(sum((r.get('http_503_retried') or {}).values()))}")),
         ("status", lambda r, _: r.get("status", "–"))],
        lambda rows, _: [line for r in rows if (line := _o_line(r))],
    ),
    "RB": Table(
        "RB",
        "### RB — rebinding: idle DTLS sessions whose source ports all change at once "
        "(Connection ID, RFC 9146)",
        "Every session a device with its own PSK, set up through a fresh proxy with "
        "`bench/cid_loadgen.py` (a DTLS 1.2 client of the bench's own: tinydtls' client side "
        "offers no CID), offering a zero-length CID as a device behind a NAT does; then every "
        "session moves to a new UDP socket (a new source port, as after a NAT rebinding) and "
        "sends one CON POST (E's telemetry), all at once, retransmitted as RFC 7252 §4.2 says "
        "until answered. Handshakes: the proxy's `coap_bridge_dtls_handshakes` counter across the"
        " rebinding. Answered at first try: without a retransmission (in brackets when the last "
        "of them was answered). Over the receive buffer: UDP datagrams the kernel dropped for a "
        "full socket buffer meanwhile (machine-wide RcvbufErrors). CPU per handshake: the proxy's "
        "(Redis' in brackets) while the sessions were set up. Bytes per idle session: the "
        "slope of the proxy's RSS over the sessions, read after each fifth of them is set up, "
        "from the first fifth on (which also holds one-off growth); Redis: `used_memory` (less "
        "client buffers) across it per session (MEMORY USAGE of a stored session's key and of its"
        " identity's set of CIDs in brackets). The second row is the same without CID, a client "
        "as today: the proxy cannot tell a new address is an old session, so nothing is answered "
        "until the client handshakes again (the client here does not).",
        [SYSTEM, _column("sessions", "sessions"),
         _column("handshakes during rebinding", "handshakes_during"),
         _column("answered", "answered"), ("codes", lambda r, _: _codes(r) or "–"),
         _column("unanswered", "unanswered"), _column("retransmitted", "retransmissions"),
         ("answered at first try (within s)", lambda r, _: (
             f"{_num(r.get('first_try'))} ({_num(r.get('first_try_seconds'), 2)})")),
         _column("time to answer all s", "seconds", 2), _column("p50 ms", "p50_ms", 1),
         _column("p99 ms", "p99_ms", 1),
         _column("proxy CPU µs/request", "proxy_cpu_us_per_request"),
         _column("over the receive buffer", "udp_receive_buffer_errors"),
         ("proxy (Redis) CPU µs/handshake", lambda r, _: (
             f"{_num(r.get('setup_proxy_cpu_us_per_handshake'))} "
             f"({_num(r.get('setup_redis_cpu_us_per_handshake'))})")),
         _column("proxy B/idle session", "bytes_per_idle_session"),
         ("Redis B/session", lambda r, _: _rb_redis(r)),
         ("status", lambda r, _: r.get("status", "–"))],
        lambda rows, _: [_rb_after(rows)],
    ),
}  # fmt: skip


def _rb_redis(row: Row) -> str:
    if not row.get("cid"):
        return "–"
    if row.get("redis_key_bytes") is None:
        return "none stored"
    return (f"{_num(row.get('redis_bytes_per_session'))} ({_num(row['redis_key_bytes'])} + "
            f"{_num(row.get('redis_identity_key_bytes'))})")  # fmt: skip


def _rb_after(rows: Sequence[Row]) -> str:
    cid = next((r for r in rows if r["system"] == RB_SYSTEM and "answered" in r), None)
    if cid is None:
        return ""
    met = cid.get("status") == "OK"
    text = (f"Target: every request after the rebinding answered 2.04 with no handshake — "
            f"{_verdict(met)}.")  # fmt: skip
    if cid.get("address_updates_during") is not None:
        text += (f" The proxy moved {_num(cid['address_updates_during'])} sessions to their new "
                 "address (`coap_bridge_dtls_address_updates`).")  # fmt: skip
    if cid.get("redis_key_bytes") is None:
        text += " No DTLS session was found in Redis: the proxy did not store any."
    elif cid.get("redis_key_bytes_count") is not None:
        text += f" Sessions stored in Redis: {_num(cid['redis_key_bytes_count'])}."
    return text


def _o_line(row: Row) -> str:
    """Where the fan-out's time went: CPU per notification of each process, the POST rate,
    set-up times, and why the API answered 503 if it did."""
    util, done = utilisation(row), row.get("received")
    if not util or not done:
        return ""
    cpu = row["cpu"]
    parts = ", ".join(f"{k} {cpu[k] / done * 1e6:,.0f} µs ({util[k]:.0f}%)" for k in cpu)
    other = 100 * (row.get("other_cpu") or 0) / row["wall"]
    reasons = "; ".join(row.get("http_503_reasons") or [])
    return (
        f"- O: CPU per notification (and % of one core over {row['wall']:.1f} s) — {parts}; "
        f"outside the bench {other:.0f}%. POSTs answered at "
        f"{row.get('posts_per_second') or 0:,.0f}/s; devices set up in "
        f"{row.get('devices_setup_s', 0):.1f} s, registered in {row.get('register_s', 0):.1f} s."
        + (f" 503 answers said: {reasons.replace('|', '/')}" if reasons else "")
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table_m(rows: Sequence[Row], redis_dedup: dict[str, Any] | None) -> str:
    cells: list[list[str]] = []
    proxy_ok, redis_ok = False, None
    for r in (r for r in rows if r["scenario"] == "M"):
        if r.get("rate") is None:
            cells.append(["proxy RSS", short_error(r.get("error"))])
            continue
        per = r.get("bytes_per_exchange")
        proxy_ok = per is not None and per <= 300
        cells += [
            ["load", f"T (CON GET /.well-known/core) at full rate, {r['rate']:,.0f} req/s "
                     f"for {r['window']:.0f} s"],
            ["proxy RSS before → after", f"{_mib(r['rss_before'])} → {_mib(r['rss_after'])} "
                                         f"(Δ {r['rss_delta'] / 2**20:+.1f} MiB)"],
            ["exchanges held (sent within 247 s)", _num(r["exchanges_held"])],
            ["**proxy bytes per exchange**", f"**{_num(per)}**"],
            ["RSS during the run (MiB)",
             ", ".join(f"{t:.0f} s: {b / 2**20:.0f}" for t, b in r.get("rss_samples", []))],
        ]  # fmt: skip
    name, dedup = "Redis bytes per dedup entry", redis_dedup or {}
    if not dedup.get("keys_sampled"):
        why = "E not run" if redis_dedup is None else "no Redis dedup keys"
        cells.append([name, f"n/a ({why})"])
    else:
        redis_ok = dedup["bytes_per_entry"] <= 150
        cells.append([f"**{name}** (`MEMORY USAGE`, cb:dd:*)",
                      f"**{dedup['bytes_per_entry']:,.0f}** (mean of {dedup['keys_sampled']} keys; "
                      f"{dedup['dbsize']:,} keys in the db after E and L)"])  # fmt: skip
    return (
        "### M — memory\n\n" + _table(["measure", "value"], cells)
        + f"\n\nTarget: ≤ 300 B proxy memory per exchange — {_verdict(proxy_ok)}; "
        f"≤ 150 B Redis per dedup entry — {_verdict(redis_ok)}.\n"
    )  # fmt: skip


# One line per entry, filled in from the run's settings.
SETTINGS = [
    "command: `python -m bench {argv}`",
    "scenarios: {scenarios}; T systems: {t_systems}",
    "closed loop: {clients} clients (one UDP socket and one request in flight each), warm-up "
    "{warmup:g} s, measured window T {duration:g} s, E {e_duration:g} s; L {l_duration:g} s; "
    "M {m_duration:g} s",
    "request timeout {timeout:g} s (counted, then a new MID; no retransmission)",
    "B: {b_systems}; {b_clients} clients, {b_kib} KiB in {b_block_size}-byte blocks, window "
    "{b_duration:g} s, {b_loadgen_workers} load generator process(es)",
    "MQTT witness of E and L: mosquitto_sub (MQTT 5, QoS 1)",
    "load generator worker processes: {loadgen_workers}; proxy workers: {proxy_workers}; "
    "API workers: {api_workers}",
    "M runs the proxy with COAP_BRIDGE_DEDUP_MAX_ENTRIES={m_dedup_max_entries:,} so that no "
    "exchange is evicted before its 247 s",
    "R: proxy --workers {r_workers}, API --workers {r_api_workers}; D: {dtls_clients} DTLS "
    "sessions (devices with a PSK each), {dtls_loadgen_workers} load generator process(es), "
    "window {e_duration:g} s; H: {h_workers} client process(es) × {h_concurrency} handshakes "
    "in flight, window {h_duration:g} s",
    "every proxy gets a free port for coaps (or `--coaps-port=off`), never 5684",
    "every process on 127.0.0.1; all of them share the machine's cores with the load "
    "generator and the MQTT subscriber",
]


F_SETTINGS = (
    "F: {f_clients} clients, a {f_kib} KiB firmware image in {f_block_size}-byte blocks, "
    "window {f_duration:g} s, {b_loadgen_workers} load generator process(es)"
)
RB_SETTINGS = (
    "RB: {rb_sessions:,} DTLS sessions (devices with a PSK each), {rb_concurrency} handshakes "
    "at once while setting up, answers awaited up to {rb_timeout:g} s (5 s without CID)"
)
O_SETTINGS = (
    "O: {o_devices:,} observing devices in {o_loadgen_workers} process(es), {o_concurrency} "
    "HTTP requests in flight, {memory:,} other devices with a waiting command for Redis memory"
)


def settings_text(s: dict[str, Any], argv: Sequence[str]) -> str:
    values = s | {"argv": " ".join(argv), "scenarios": ",".join(s["scenarios"]),
                  "t_systems": ", ".join(s["t_systems"]), "b_systems": ", ".join(s["b_systems"]),
                  "b_kib": s["b_size"] // 1024}  # fmt: skip
    lines = [line.format(**values) for line in SETTINGS]
    if "F" in s["scenarios"] and "f_clients" in s:
        lines.insert(5, F_SETTINGS.format(**s, f_kib=s["f_size"] // 1024))
    if "RB" in s["scenarios"] and "rb_sessions" in s:
        lines.insert(-2, RB_SETTINGS.format(**s))
    if "O" in s["scenarios"] and "o_devices" in s:
        lines.insert(-2, O_SETTINGS.format(
            **s, memory=s.get("o_memory_devices") or s["o_devices"]))  # fmt: skip
    return "\n".join(f"- {line}" for line in lines)


def render(results: dict[str, Any]) -> str:
    """The generated section of BENCHMARKS.md from the results JSON."""
    rows, chosen = results["rows"], results["settings"]["scenarios"]
    parts = [
        "## Latest run (generated by `make bench`; edits here are overwritten)\n",
        f"Date: {results['date']} · run took {results['elapsed']:.0f} s\n",
        "Machine:\n",
        "\n".join(f"- {k}: {v}" for k, v in results["machine"].items()) + "\n",
        "Settings:\n",
        settings_text(results["settings"], results["argv"]) + "\n",
    ]
    # E's table also holds the rows of R, D, ET and EO (E through --workers N, over DTLS, with
    # a template, with metrics scraped).
    shown = {"T": "T", "B": "B", "E": ("E", "L", "R", "D", "ET", "EO"), "L": "L", "H": "H",
             "RB": ("RB",), "O": "O", "F": "F"}  # fmt: skip
    parts += [TABLES[t].render(rows) for t, by in shown.items() if set(by) & set(chosen)]
    if "M" in chosen:
        parts.append(table_m(rows, results.get("redis_dedup")))
    if notes := results.get("notes"):
        parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(parts)


def update_file(path: Path, generated: str) -> None:
    """Replace what lies between the markers; keep everything else (the hand-written part)."""
    block = f"{START}\n{generated.rstrip()}\n{END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = text.find(START), text.find(END)
    if start != -1 and end > start:
        path.write_text(text[:start] + block + text[end + len(END) :])
    else:
        path.write_text(text.rstrip() + "\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("results", help="the results JSON of a run")
    parser.add_argument("--output", default="BENCHMARKS.md", help="file to update ('' = print)")
    args = parser.parse_args(argv)
    text = render(json.loads(Path(args.results).read_text()))
    if args.output:
        update_file(Path(args.output), text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
