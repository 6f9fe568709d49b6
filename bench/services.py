"""Processes the harness starts and always stops (servers under test, Redis, Mosquitto), their
readiness probes, and what they use of the machine (RSS, CPU seconds, from /proc).

Every process runs in its own session (process group), so stopping it also stops whatever it
forked (``--workers``); :func:`stop_all` is the last resort at exit and on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from proxy.coap import codec
from proxy.coap.codes import GET
from proxy.coap.options import URI_PATH

_RUNNING: list[Service] = []
ROOT = Path(__file__).resolve().parent.parent


def which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise RuntimeError(f"{name!r} not found on PATH (Debian: see TEST_DEBS in the Makefile)")
    return path


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 a moment ago (libcoap opens both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                    tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


class Service:
    """One subprocess in its own process group, logging to ``workdir/<name>.log``."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path) -> None:
        self.name, self.argv, self.workdir = name, list(argv), workdir
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, env: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )  # fmt: skip
        _RUNNING.append(self)

    def check_alive(self) -> None:
        code = None if self.process is None else self.process.poll()
        if self.process is None or code is not None:
            how = "not running" if code is None else f"exited (status {code})"
            if code is not None and code < 0:
                with contextlib.suppress(ValueError):
                    how = f"exited (signal {signal.Signals(-code).name})"
            raise RuntimeError(f"{self.name} {how}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        # The leader may be gone while forked workers linger: kill the whole group anyway.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(ValueError):
            _RUNNING.remove(self)

    def wait_until(
        self, ready: Callable[[], bool], timeout: float = 20.0, what: str = "ready"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not {what} after {timeout} s:\n{self.log_tail()}")


def stop_all() -> None:
    for service in list(reversed(_RUNNING)):
        service.stop(timeout=3.0)


def tcp_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


_PROBE = codec.encode_parts(
    codec.CON, GET, 1, b"", [(URI_PATH, b".well-known"), (URI_PATH, b"core")], b""
)


def coap_ready(port: int, host: str = "127.0.0.1") -> bool:
    """True once something answers a CoAP GET on ``port`` (any response)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        try:
            sock.sendto(_PROBE, (host, port))
            data, _ = sock.recvfrom(2048)
        except OSError:
            return False
        return len(data) >= 4 and data[0] >> 6 == 1


def start(
    workdir: Path, name: str, argv: list[str], ready: Callable[[], bool], what: str,
    settle: bool = False, env: dict[str, str] | None = None,
) -> Service:  # fmt: skip
    """``argv`` started in ``workdir/name`` and waited for until ``ready()``; ``settle``: one
    second more for the other workers of a ``--workers`` process. Our processes get their
    settings from flags only, never from the caller's COAP_BRIDGE_* variables."""
    service = Service(name, argv, workdir / name)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    service.start(env=clean | (env or {}))
    try:
        service.wait_until(ready, 30.0, what)
        if settle:
            time.sleep(1.0)
    except BaseException:
        service.stop()
        raise
    return service


def start_redis(workdir: Path) -> tuple[Service, str]:
    port = free_port()
    argv = [which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    redis = start(workdir, "redis-server", argv, lambda: tcp_ready(port), "accepting TCP")
    return redis, f"redis://127.0.0.1:{port}/0"


def start_mosquitto(workdir: Path) -> tuple[Service, str]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n"
        "max_inflight_messages 0\nmax_queued_messages 0\n"
    )
    mosquitto = start(workdir, "mosquitto", [which("mosquitto"), "-c", str(config)],
                      lambda: tcp_ready(port), "accepting MQTT")  # fmt: skip
    return mosquitto, f"mqtt://127.0.0.1:{port}"


def coap_bridge() -> str:
    local = Path(sys.executable).with_name("coap-bridge")
    return str(local) if local.exists() else which("coap-bridge")


def start_proxy(
    workdir: Path, upstream: str = "http://127.0.0.1:9", token: str = "bench",
    redis_url: str | None = None, env: dict[str, str] | None = None, *, workers: int = 1,
    coaps_port: int | None = None, extra: Sequence[str] = (),
) -> tuple[Service, int]:  # fmt: skip
    """The proxy under test: (service, CoAP port). ``coaps_port`` None: DTLS off (never the
    default 5684, which another bridge on this machine may hold)."""
    port = free_port()
    argv = [
        coap_bridge(), "proxy", "--coap-host", "127.0.0.1", "--coap-port", str(port),
        "--upstream", upstream, f"--proxy-token={token}", "--log-level", "warning",
        f"--workers={workers}", f"--coaps-port={coaps_port or 'off'}", *extra,
        *([f"--redis-url={redis_url}"] if redis_url else []),
    ]  # fmt: skip
    ready = lambda: coap_ready(port)  # noqa: E731
    return start(
        workdir, "coap-bridge-proxy", argv, ready, "answering CoAP", workers > 1, env
    ), port


def start_baseline(workdir: Path, system: str) -> tuple[Service, int]:
    """libcoap's example server or the aiocoap one (bench/aiocoap_server.py): (service, port)."""
    port = free_port()
    if system == "libcoap":
        argv = [which("coap-server-notls"), "-A", "127.0.0.1", "-p", str(port), "-v", "0"]
    elif system == "aiocoap":
        script = str(Path(__file__).with_name("aiocoap_server.py"))
        argv = [sys.executable, script, "--host", "127.0.0.1", "--port", str(port)]
    else:
        raise ValueError(f"unknown system {system!r}")
    return start(workdir, system, argv, lambda: coap_ready(port), "answering CoAP"), port


def start_api(
    workdir: Path, *, redis_url: str, mqtt_url: str, api_key: str, proxy_token: str, workers: int
) -> tuple[Service, int]:
    port = free_port()
    argv = [
        coap_bridge(), "api", "--api-host", "127.0.0.1", "--api-port", str(port),
        f"--redis-url={redis_url}", f"--mqtt-url={mqtt_url}", f"--api-key={api_key}",
        f"--proxy-token={proxy_token}", "--log-level", "warning",
        f"--workers={workers}",
        # /ingest for the telemetry scenarios, the firmware download for F (api/profiles.py).
        "--profile", "sim_identity,managed_psk",
    ]  # fmt: skip
    ready = lambda: tcp_ready(port)  # noqa: E731
    return start(workdir, "coap-bridge-api", argv, ready, "accepting HTTP", workers > 1), port


def start_origin(workdir: Path, path: str, size: int) -> tuple[Service, int]:
    """bench/origin.py serving ``size`` bytes at ``path`` (byte ranges): (service, port)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.origin", "--host", "127.0.0.1", "--port", str(port),
            "--path", path, "--size", str(size)]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT)}
    return start(workdir, "origin", argv, lambda: tcp_ready(port), "accepting HTTP", env=env), port


# --- what the processes use ------------------------------------------------------------------


def _tree_stats(pid: int) -> list[list[str]]:
    """The ``/proc/<pid>/stat`` fields (after the name) of ``pid`` and all its descendants
    (the workers of a ``--workers`` process)."""
    stats: dict[int, list[str]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
    tree = [pid] if pid in stats else []
    for member in tree:
        tree += [child for child, f in stats.items() if int(f[1]) == member]
    return [stats[m] for m in tree]


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (stat's rss, in pages)."""
    return sum(int(f[21]) for f in _tree_stats(pid)) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its live descendants."""
    return sum(int(f[11]) + int(f[12]) for f in _tree_stats(pid)) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (``/proc/stat``: every
    state but idle and iowait)."""
    try:
        ticks = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
