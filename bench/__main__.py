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
from pathlib import Path

from bench.harness import (
    B_SYSTEMS,
    DEFAULT_SCENARIOS,
    SCENARIOS,
    SYSTEMS,
    Bench,
    Settings,
    workdir,
)
from bench.report import machine, render, update_file
from bench.services import stop_all

# (flag, default, help), passed to Settings under the flag's name. A (quick, full) pair: the
# default with and without --quick; None: see main().
OPTIONS = [
    ("--clients", 64, "closed-loop clients / sockets"),
    ("--timeout", 5.0, "per request (s)"),
    ("--loadgen-workers", 1, "load generator processes"),
    ("--proxy-workers", 1, "coap-bridge proxy --workers"),
    ("--api-workers", 1, "coap-bridge api --workers"),
    ("--b-clients", 32, "B: clients, each fetching the whole resource"),
    ("--b-loadgen-workers", 1, "B: load generator processes"),
    ("--r-workers", 2, "R: coap-bridge proxy --workers (SO_REUSEPORT)"),
    ("--r-api-workers", 2, "R: coap-bridge api --workers"),
    ("--dtls-loadgen-workers", 1, "D: DTLS load generator processes"),
    ("--h-workers", 1, "H: handshake client processes"),
    ("--h-concurrency", 8, "H: handshakes in flight per process"),
    ("--rb-sessions", (100, 4000), "RB: idle DTLS sessions whose source ports all change"),
    ("--rb-concurrency", 32, "RB: handshakes at once while the sessions are set up"),
    ("--rb-timeout", 30.0, "RB: longest wait for the answers after the rebinding (s)"),
    ("--duration", (1.0, 10.0), "measured window of T, E, L (s; E's default is 1.5 times)"),
    ("--warmup", (0.3, 2.0), "warm-up before each window (s)"),
    ("--m-duration", (2.0, 60.0), "M: seconds of T at full rate"),
    ("--h-duration", (1.0, 5.0), "H: measured window (s)"),
    ("--b-duration", None, "B: measured window (s; default --duration)"),
    ("--o-devices", (500, 10_000), "O: observing devices (a loopback address and socket each)"),
    ("--o-memory-devices", 0, "O: devices with a waiting command, for Redis memory (0: as O)"),
    ("--o-loadgen-workers", 1, "O: device processes"),
    ("--o-concurrency", 64, "O: HTTP requests in flight (devices, commands)"),
    ("--o-timeout", 120.0, "O: longest wait for the fan-out after the last POST (s)"),
    ("--dtls-clients", None, "D: DTLS sessions (devices with a PSK each; default --clients)"),
    ("--f-clients", (8, 32), "F: clients, each downloading the whole firmware image"),
    ("--f-size", 1024 * 1024, "F: the firmware image's bytes"),
    ("--f-duration", None, "F: measured window (s; default --duration)"),
]
CHOICES = {"--scenarios": SCENARIOS, "--t-systems": SYSTEMS, "--b-systems": B_SYSTEMS}
DEFAULTS = {"--scenarios": DEFAULT_SCENARIOS}


def parse(argv: list[str]) -> dict[str, object]:
    """The Settings (but the workdir) ``argv`` asks for."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add = parser.add_argument
    add("--quick", action="store_true", help="short durations (smoke test)")
    described = {name: f"{name} ({s.description})" for name, s in SCENARIOS.items()}
    for flag, allowed in CHOICES.items():
        preset = ",".join(DEFAULTS.get(flag, allowed))
        add(flag, default=preset, help=f"comma-separated (default {preset}), of: "
            + "; ".join(described.get(x, x) for x in allowed).replace("%", "%%"))  # fmt: skip
    for flag, default, text in OPTIONS:
        kind = type(default[0] if isinstance(default, tuple) else default or 0)
        add(flag, type=float if kind is float else int, help=text)
    add("--results", default="build/bench-results.json", help="the results JSON to write")
    add("--output", default="BENCHMARKS.md", help="file to render the results into ('' = none)")
    add("--workdir", help="keep logs of the started processes here")
    args = vars(parser.parse_args(argv))
    for flag, allowed in CHOICES.items():
        name = flag[2:].replace("-", "_")
        text = args[name].upper() if flag == "--scenarios" else args[name]
        args[name] = [x.strip() for x in text.split(",") if x.strip()]
        if set(args[name]) - set(allowed):
            parser.error(f"{flag}: choose from {', '.join(allowed)}")
    args["e_duration"] = args["duration"] or (1.5 if args["quick"] else 15.0)
    for flag, default, _ in OPTIONS:
        name = flag[2:].replace("-", "_")
        if args[name] is None and default is not None:
            args[name] = (
                default[0 if args["quick"] else 1] if isinstance(default, tuple) else default
            )
    args["l_duration"] = args["duration"]
    args["b_duration"] = args["b_duration"] or args["duration"]
    args["f_duration"] = args["f_duration"] or args["duration"]
    args["dtls_clients"] = args["dtls_clients"] or args["clients"]
    if not 1 <= args["rb_sessions"] <= 10_000:  # bench/harness.py numbers devices per 10,000
        parser.error(f"--rb-sessions: 1 to 10,000, not {args['rb_sessions']}")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    results, output, keep = (args.pop(k) for k in ("results", "output", "workdir"))
    signal.signal(signal.SIGTERM, _terminate)
    atexit.register(stop_all)
    started = dt.datetime.now(dt.UTC).astimezone()
    t0 = time.monotonic()
    with workdir(Path(str(keep)) if keep else None) as work:
        settings = Settings(**args, workdir=work)  # type: ignore[arg-type]
        bench = Bench(settings)
        try:
            bench.run()
        finally:
            stop_all()
    data = {
        "date": started.strftime("%Y-%m-%d %H:%M %Z"), "elapsed": time.monotonic() - t0,
        "argv": argv, "machine": machine(bench.loadavg_start), "settings": settings.as_dict(),
        "rows": bench.rows, "redis_dedup": bench.redis_dedup, "notes": bench.notes,
    }  # fmt: skip
    path = Path(str(results))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"[bench] wrote {path}")
    # Rendered from the file just written: the report sees only what the JSON holds.
    text = render(json.loads(path.read_text()))
    print(f"\n{text}")
    if output:
        update_file(Path(str(output)), text)
        print(f"[bench] wrote {output}")
    return 1 if bench.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
