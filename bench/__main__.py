"""``python -m bench`` (``make bench``): run the scenarios, write the results JSON (the run's one
output), then render BENCHMARKS.md's generated section from it (:mod:`bench.report`). Exit
status 1 when a scenario errored or E/L lost or duplicated a message."""

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

# Passed from the command line to Settings as they are.
PASSED = (
    "clients", "loadgen_workers", "proxy_workers", "api_workers", "timeout", "subscriber",
    "r_workers", "r_api_workers", "dtls_loadgen_workers", "h_workers", "h_concurrency",
    "b_clients", "b_loadgen_workers",
)  # fmt: skip


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
    add("--b-clients", type=int, default=32, help="B: clients, each fetching the whole resource")
    add("--b-duration", type=float, help="B: measured window (s)")
    add("--b-loadgen-workers", type=int, default=1, help="B: load generator processes")
    add("--duration", type=float, help="measured window of T, E, L (s)")
    add("--warmup", type=float, help="warm-up before each window (s)")
    add("--m-duration", type=float, help="M: seconds of T at full rate")
    add("--clients", type=int, default=64, help="closed-loop clients / sockets")
    add("--timeout", type=float, default=5.0, help="per request (s)")
    add("--loadgen-workers", type=int, default=1, help="load generator processes")
    add("--proxy-workers", type=int, default=1, help="coap-bridge proxy --workers")
    add("--api-workers", type=int, default=1, help="coap-bridge api --workers")
    add("--r-workers", type=int, default=2, help="R: coap-bridge proxy --workers (SO_REUSEPORT)")
    add("--r-api-workers", type=int, default=2, help="R: coap-bridge api --workers")
    add("--dtls-clients", type=int, help="D: DTLS sessions (devices with a PSK); default --clients")
    add("--dtls-loadgen-workers", type=int, default=1, help="D: DTLS load generator processes")
    add("--h-duration", type=float, help="H: measured window (s)")
    add("--h-workers", type=int, default=1, help="H: handshake client processes")
    add("--h-concurrency", type=int, default=8, help="H: handshakes in flight per process")
    add("--subscriber", choices=("mosquitto_sub", "aiomqtt"), default="mosquitto_sub",
        help="MQTT witness of E/L: the C client costs the shared cores least")  # fmt: skip
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
            scenarios=args.scenarios,
            t_systems=args.t_systems,
            b_systems=args.b_systems,
            duration=pick(args.duration, 1.0, 10.0),
            e_duration=pick(args.duration, 1.5, 15.0),
            l_duration=pick(args.duration, 1.0, 10.0),
            warmup=pick(args.warmup, 0.3, 2.0),
            m_duration=pick(args.m_duration, 2.0, 60.0),
            h_duration=pick(args.h_duration, 1.0, 5.0),
            b_duration=pick(args.b_duration or args.duration, 1.0, 10.0),
            dtls_clients=args.dtls_clients or args.clients,
            workdir=work,
            quick=args.quick,
            **{name: getattr(args, name) for name in PASSED},
        )
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
        "rows": [row.as_dict() for row in bench.rows],
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
