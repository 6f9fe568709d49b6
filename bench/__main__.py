"""``python -m bench`` (``make bench``): run the scenarios, write the results JSON (the run's one
output), then render BENCHMARKS.md's generated section from it (:mod:`bench.report`). Exit
status 1 when a scenario errored or a telemetry row is not OK (:func:`bench.harness.verdict`)."""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from bench.harness import B_SYSTEMS, SCENARIOS, SYSTEMS, Bench, Settings, workdir
from bench.report import machine, render, update_file
from bench.services import stop_all

# (flag, type, default, help): passed to Settings under the flag's name as they are.
PASSED = [
    ("--clients", int, 64, "closed-loop clients / sockets"),
    ("--timeout", float, 5.0, "per request (s)"),
    ("--loadgen-workers", int, 1, "load generator processes"),
    ("--proxy-workers", int, 1, "coap-bridge proxy --workers"),
    ("--api-workers", int, 1, "coap-bridge api --workers"),
    ("--b-clients", int, 32, "B: clients, each fetching the whole resource"),
    ("--b-loadgen-workers", int, 1, "B: load generator processes"),
    ("--r-workers", int, 2, "R: coap-bridge proxy --workers (SO_REUSEPORT)"),
    ("--r-api-workers", int, 2, "R: coap-bridge api --workers"),
    ("--dtls-loadgen-workers", int, 1, "D: DTLS load generator processes"),
    ("--h-workers", int, 1, "H: handshake client processes"),
    ("--h-concurrency", int, 8, "H: handshakes in flight per process"),
]
# Seconds; their defaults depend on --quick (main()).
WINDOWS = [
    ("--duration", "measured window of T, E, L"),
    ("--warmup", "warm-up before each window"),
    ("--m-duration", "M: seconds of T at full rate"),
    ("--h-duration", "H: measured window"),
    ("--b-duration", "B: measured window (default --duration)"),
]


def _choice(
    parser: argparse.ArgumentParser, flag: str, text: str, allowed: Iterable[str]
) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if set(chosen) - set(allowed):
        parser.error(f"{flag}: choose from {', '.join(allowed)}")
    return chosen


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add = parser.add_argument
    add("--quick", action="store_true", help="short durations (smoke test)")
    add("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + "; ".join(
        f"{name} ({scenario.description.replace('%', '%%')})"
        for name, scenario in SCENARIOS.items()))  # fmt: skip
    add("--t-systems", default=",".join(SYSTEMS), help=f"systems for T ({','.join(SYSTEMS)})")
    add("--b-systems", default=",".join(B_SYSTEMS), help=f"systems for B ({','.join(B_SYSTEMS)})")
    for flag, kind, default, text in PASSED:
        add(flag, type=kind, default=default, help=text)
    for flag, text in WINDOWS:
        add(flag, type=float, help=text + " (s)")
    add("--dtls-clients", type=int, help="D: DTLS sessions (devices with a PSK); default --clients")
    add("--results", default="build/bench-results.json", help="the results JSON to write")
    add("--output", default="BENCHMARKS.md", help="file to render the results into ('' = none)")
    add("--workdir", help="keep logs of the started processes here")
    args = parser.parse_args(argv)
    args.scenarios = _choice(parser, "--scenarios", args.scenarios.upper(), SCENARIOS)
    args.t_systems = _choice(parser, "--t-systems", args.t_systems, SYSTEMS)
    args.b_systems = _choice(parser, "--b-systems", args.b_systems, B_SYSTEMS)
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    atexit.register(stop_all)

    def pick(value: float | None, quick: float, full: float) -> float:
        return value if value is not None else quick if args.quick else full

    started = dt.datetime.now(dt.UTC).astimezone()
    t0 = time.monotonic()
    with workdir(Path(args.workdir) if args.workdir else None) as work:
        settings = Settings(
            scenarios=args.scenarios, t_systems=args.t_systems, b_systems=args.b_systems,
            duration=pick(args.duration, 1.0, 10.0), e_duration=pick(args.duration, 1.5, 15.0),
            l_duration=pick(args.duration, 1.0, 10.0), warmup=pick(args.warmup, 0.3, 2.0),
            m_duration=pick(args.m_duration, 2.0, 60.0), h_duration=pick(args.h_duration, 1.0, 5.0),
            b_duration=pick(args.b_duration or args.duration, 1.0, 10.0),
            dtls_clients=args.dtls_clients or args.clients, workdir=work, quick=args.quick,
            **{flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
               for flag, *_ in PASSED},
        )  # fmt: skip
        bench = Bench(settings)
        try:
            bench.run()
        finally:
            stop_all()
    results = {
        "date": started.strftime("%Y-%m-%d %H:%M %Z"),
        "elapsed": time.monotonic() - t0,
        "argv": argv,
        "machine": machine(bench.loadavg_start),
        "settings": settings.as_dict(),
        "rows": bench.rows,
        "redis_dedup": bench.redis_dedup,
        "notes": bench.notes,
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"[bench] wrote {path}")
    # Rendered from the file just written: the report sees only what the JSON holds.
    text = render(json.loads(path.read_text()))
    print(f"\n{text}")
    if args.output:
        update_file(Path(args.output), text)
        print(f"[bench] wrote {args.output}")
    return 1 if bench.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
