"""``python -m bench`` (``make bench``): run the scenarios, print the tables, update
BENCHMARKS.md. Exit status 1 when a scenario errored or E/L lost or duplicated a message."""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import signal
import sys
import time
from pathlib import Path

from bench.harness import B_SYSTEMS, SYSTEMS, Bench, Settings, workdir
from bench.report import render, update_file
from bench.services import stop_all

SCENARIOS = ("T", "B", "E", "L", "R", "D", "H", "M")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short durations (smoke test)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated: T,B (block-wise GET of a large resource),E,L,R (E through "
        "--workers N), D (E over DTLS), H (DTLS handshakes), M",
    )
    parser.add_argument(
        "--t-systems", default=",".join(SYSTEMS), help=f"systems for T ({','.join(SYSTEMS)})"
    )
    parser.add_argument(
        "--b-systems", default=",".join(B_SYSTEMS), help=f"systems for B ({','.join(B_SYSTEMS)})"
    )
    parser.add_argument(
        "--b-clients", type=int, default=32, help="B: clients, each fetching the whole resource"
    )
    parser.add_argument("--b-duration", type=float, help="B: measured window (s)")
    parser.add_argument(
        "--b-loadgen-workers", type=int, default=1, help="B: load generator processes"
    )
    parser.add_argument("--duration", type=float, help="measured window of T, E, L (s)")
    parser.add_argument("--warmup", type=float, help="warm-up before each window (s)")
    parser.add_argument("--m-duration", type=float, help="M: seconds of T at full rate")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients / sockets")
    parser.add_argument("--timeout", type=float, default=5.0, help="per request (s)")
    parser.add_argument("--loadgen-workers", type=int, default=1, help="load generator processes")
    parser.add_argument("--proxy-workers", type=int, default=1, help="coap-bridge proxy --workers")
    parser.add_argument("--api-workers", type=int, default=1, help="coap-bridge api --workers")
    parser.add_argument(
        "--r-workers", type=int, default=2, help="R: coap-bridge proxy --workers (SO_REUSEPORT)"
    )
    parser.add_argument("--r-api-workers", type=int, default=2, help="R: coap-bridge api --workers")
    parser.add_argument(
        "--dtls-clients",
        type=int,
        help="D: DTLS sessions (= devices with a PSK); default --clients",
    )
    parser.add_argument(
        "--dtls-loadgen-workers", type=int, default=1, help="D: DTLS load generator processes"
    )
    parser.add_argument("--h-duration", type=float, help="H: measured window (s)")
    parser.add_argument("--h-workers", type=int, default=1, help="H: handshake client processes")
    parser.add_argument(
        "--h-concurrency", type=int, default=8, help="H: handshakes in flight per process"
    )
    parser.add_argument(
        "--subscriber",
        choices=("mosquitto_sub", "aiomqtt"),
        default="mosquitto_sub",
        help="MQTT witness of E/L: the C client costs the shared cores least",
    )
    parser.add_argument("--output", default="BENCHMARKS.md", help="file to update ('' = none)")
    parser.add_argument("--json", help="also write the raw rows to this JSON file")
    parser.add_argument("--workdir", help="keep logs of the started processes here")
    args = parser.parse_args(argv)
    args.scenario_list = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_list) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    args.systems = [s.strip() for s in args.t_systems.split(",") if s.strip()]
    if set(args.systems) - set(SYSTEMS):
        parser.error(f"--t-systems: choose from {', '.join(SYSTEMS)}")
    args.b_system_list = [s.strip() for s in args.b_systems.split(",") if s.strip()]
    if set(args.b_system_list) - set(B_SYSTEMS):
        parser.error(f"--b-systems: choose from {', '.join(B_SYSTEMS)}")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    atexit.register(stop_all)
    quick = args.quick
    duration = args.duration or (1.0 if quick else 10.0)
    started = dt.datetime.now(dt.UTC).astimezone()
    t0 = time.monotonic()
    with workdir(Path(args.workdir) if args.workdir else None) as work:
        settings = Settings(
            scenarios=args.scenario_list,
            t_systems=args.systems,
            duration=duration,
            e_duration=args.duration or (1.5 if quick else 15.0),
            l_duration=args.duration or (1.0 if quick else 10.0),
            warmup=args.warmup if args.warmup is not None else (0.3 if quick else 2.0),
            m_duration=args.m_duration or (2.0 if quick else 60.0),
            clients=args.clients,
            loadgen_workers=args.loadgen_workers,
            proxy_workers=args.proxy_workers,
            api_workers=args.api_workers,
            timeout=args.timeout,
            workdir=work,
            quick=quick,
            subscriber=args.subscriber,
            r_workers=args.r_workers,
            r_api_workers=args.r_api_workers,
            dtls_clients=args.dtls_clients or args.clients,
            dtls_loadgen_workers=args.dtls_loadgen_workers,
            h_duration=args.h_duration or (1.0 if quick else 5.0),
            h_workers=args.h_workers,
            h_concurrency=args.h_concurrency,
            b_systems=args.b_system_list,
            b_clients=args.b_clients,
            b_duration=args.b_duration or args.duration or (1.0 if quick else 10.0),
            b_loadgen_workers=args.b_loadgen_workers,
        )
        bench = Bench(settings)
        try:
            bench.run()
        finally:
            stop_all()
    elapsed = time.monotonic() - t0
    text = render(
        bench.rows,
        settings,
        argv,
        bench.redis_dedup,
        bench.notes,
        started,
        elapsed,
        loadavg_start=bench.loadavg_start,
    )
    print()
    print(text)
    if args.output:
        update_file(Path(args.output), text)
        print(f"[bench] wrote {args.output}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": [row.as_dict() for row in bench.rows],
                    "redis_dedup": bench.redis_dedup,
                    "elapsed": elapsed,
                },
                indent=2,
                default=str,
            )
        )
    return 1 if bench.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
