"""Processes the harness starts and always stops: servers under test, Redis, Mosquitto.

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
from collections.abc import Sequence
from pathlib import Path
from typing import IO

_RUNNING: list[Service] = []


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
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
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
            self.argv,
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        _RUNNING.append(self)

    def check_alive(self) -> None:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        code = self.process.poll()
        if code is not None:
            how = f"status {code}"
            if code < 0:
                with contextlib.suppress(ValueError):
                    how = f"signal {signal.Signals(-code).name}"
            raise RuntimeError(f"{self.name} exited ({how}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
        # The leader may be gone while forked workers linger: kill the whole group anyway.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(ValueError):
            _RUNNING.remove(self)

    def wait_until(self, ready: object, timeout: float = 20.0, what: str = "ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not {what} after {timeout} s:\n{self.log_tail()}")

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def stop_all() -> None:
    for service in list(reversed(_RUNNING)):
        service.stop(timeout=3.0)


# --- readiness probes ------------------------------------------------------------------------


def tcp_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# CON GET /.well-known/core, MID 0x0001, no token.
_PROBE = bytes([0x40, 0x01, 0x00, 0x01, 0xBB]) + b".well-known" + bytes([0x04]) + b"core"


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


def redis_command(port: int, *args: str) -> bytes:
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(request)
        return sock.recv(65536)


def start_redis(workdir: Path) -> tuple[Service, str]:
    port = free_port()
    service = Service(
        "redis-server",
        [which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        workdir,
    )  # fmt: skip
    service.start()

    def ready() -> bool:
        try:
            return redis_command(port, "PING").startswith(b"+PONG")
        except OSError:
            return False

    service.wait_until(ready, 10.0)
    return service, f"redis://127.0.0.1:{port}/0"


def start_mosquitto(workdir: Path) -> tuple[Service, str]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n"
        "max_inflight_messages 0\nmax_queued_messages 0\n"
    )
    service = Service("mosquitto", [which("mosquitto"), "-c", str(config)], workdir)
    service.start()
    service.wait_until(lambda: tcp_ready(port), 10.0)
    return service, f"mqtt://127.0.0.1:{port}"


# --- the systems under test ------------------------------------------------------------------


def coap_bridge() -> str:
    local = Path(sys.executable).with_name("coap-bridge")
    return str(local) if local.exists() else which("coap-bridge")


def clean_env() -> dict[str, str]:
    """Our processes get their settings from flags only, never from the caller's COAP_BRIDGE_*."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}


_HELP_CACHE: dict[str, str] = {}


def supports(command: str, flag: str) -> bool:
    """Whether ``coap-bridge <command>`` takes ``flag`` (the bench also runs older builds)."""
    if command not in _HELP_CACHE:
        out = subprocess.run(
            [coap_bridge(), command, "--help"], capture_output=True, text=True, timeout=60
        )
        _HELP_CACHE[command] = out.stdout + out.stderr
    return flag in _HELP_CACHE[command]


def _workers_flag(command: str, workers: int) -> list[str]:
    if workers <= 1:
        return []
    if not supports(command, "--workers"):
        raise RuntimeError(f"coap-bridge {command} has no --workers flag yet")
    return ["--workers", str(workers)]


def start(
    workdir: Path,
    name: str,
    argv: list[str],
    ready: object,
    what: str,
    settle: bool = False,
    env: dict[str, str] | None = None,
) -> Service:
    """``argv`` started in ``workdir/name`` and waited for until ``ready()``; ``settle``: one
    second more for the other workers of a ``--workers`` process."""
    service = Service(name, argv, workdir / name)
    service.start(env=clean_env() | (env or {}))
    try:
        service.wait_until(ready, 30.0, what)
        if settle:
            time.sleep(1.0)
    except BaseException:
        service.stop()
        raise
    return service


def start_proxy(
    workdir: Path,
    upstream: str = "http://127.0.0.1:9",
    token: str = "bench",
    redis_url: str | None = None,
    env: dict[str, str] | None = None,
    *,
    workers: int = 1,
    coaps_port: int | None = None,
    extra: Sequence[str] = (),
) -> tuple[Service, int]:
    """The proxy under test: (service, CoAP port). ``coaps_port`` None: DTLS off (never the
    default 5684, which another bridge on this machine may hold)."""
    port = free_port()
    argv = [
        coap_bridge(), "proxy", "--coap-host", "127.0.0.1", "--coap-port", str(port),
        "--upstream", upstream, f"--proxy-token={token}", "--log-level", "warning",
    ]  # fmt: skip
    argv += _workers_flag("proxy", workers)
    if redis_url is not None and supports("proxy", "--redis-url"):
        argv.append(f"--redis-url={redis_url}")
    if supports("proxy", "--coaps-port"):
        argv.append(f"--coaps-port={'off' if coaps_port is None else coaps_port}")
    elif coaps_port is not None:
        raise RuntimeError("coap-bridge proxy has no --coaps-port flag yet")
    argv += extra
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
        f"--proxy-token={proxy_token}", "--log-level", "warning", *_workers_flag("api", workers),
    ]  # fmt: skip
    ready = lambda: tcp_ready(port)  # noqa: E731
    return start(workdir, "coap-bridge-api", argv, ready, "accepting HTTP", workers > 1), port


def start_origin(workdir: Path, path: str, size: int) -> tuple[Service, int]:
    """bench/origin.py serving ``size`` bytes at ``path`` (byte ranges): (service, port)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.origin", "--host", "127.0.0.1", "--port", str(port),
            "--path", path, "--size", str(size)]  # fmt: skip
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return start(workdir, "origin", argv, lambda: tcp_ready(port), "accepting HTTP", env=env), port


# --- memory ----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def process_tree(pid: int) -> list[int]:
    tree = [pid]
    index = 0
    while index < len(tree):
        tree += _children(tree[index])
        index += 1
    return tree


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants (the workers of a ``--workers`` process)."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def machine_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (``/proc/stat``: every
    state but idle and iowait)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return 0.0
    ticks = [int(f) for f in fields[:8]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")
