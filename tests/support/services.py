"""Throwaway ``redis-server`` and ``mosquitto`` processes on free ports, for tests.

Used by the fixtures in ``tests/conftest.py``:

``redis_server`` -> :class:`RedisServer`
    ``.port``, ``.url`` (``redis://127.0.0.1:P/0``), ``.stop()``, ``.start()`` (same port),
    ``.running``, ``.flushall()``. One process per test session; the fixture flushes it and
    makes sure it runs before each test, and restarts it after a test that stopped it.

``mosquitto`` -> :class:`MosquittoServer`
    ``.port``, ``.url`` (``mqtt://127.0.0.1:P``), ``.stop()``, ``.start()`` (same port, for
    broker-restart tests), ``.pause()``/``.resume()`` (SIGSTOP/SIGCONT: a hung broker that
    never acknowledges), ``.running``. One process per session, anonymous access, no
    persistence; restarted after a test that left it stopped. Use one topic per test.

Both listen on 127.0.0.1 unless constructed with ``host=`` (the topology test binds them to the
address of a veth that other network namespaces reach).

A missing binary fails the test with a message naming the Debian package; it never skips, so a
machine without the services cannot pass silently.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, ClassVar, Self

import pytest

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pytest.fail(f"{name!r} not found on PATH: install the Debian package {package!r}")
    return path


class _Service:
    """One server process that can be stopped and started again on the same port."""

    binary: ClassVar[str]
    package: ClassVar[str]

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.host = host  # the address it listens on (another one than loopback: topology tests)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.executable = require_binary(self.binary, self.package)
        self.log_path = workdir / f"{self.binary}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the service answers on its port."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.command(), cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._reap()
                log = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.binary} exited at start on port {self.port}:\n{log}")
            if self.ready():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.binary} did not accept connections on port {self.port}")

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_TIMEOUT)
        self._reap()

    def kill(self) -> None:
        """SIGKILL: gone at once, without a word to its clients (even when paused)."""
        if self._process is not None:
            self._process.kill()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung server)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisServer(_Service):
    binary = "redis-server"
    package = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        # Protected mode refuses clients from any address but loopback when there is no
        # password: off for a test instance bound to a veth address.
        protected = "yes" if self.host.startswith("127.") else "no"
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--protected-mode", protected,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip

    def execute(self, *args: str) -> bytes:
        """One command over RESP, without a client library (so no pool outlives the call)."""
        request = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            request += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection((self.host, self.port), timeout=2) as sock:
            sock.sendall(request)
            return sock.recv(1024)

    def ready(self) -> bool:
        # Redis accepts TCP while still loading; PONG means it serves commands.
        try:
            return self.execute("PING").startswith(b"+PONG")
        except OSError:
            return False

    def flushall(self) -> None:
        reply = self.execute("FLUSHALL")
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL failed: {reply!r}")


class MosquittoServer(_Service):
    binary = "mosquitto"
    package = "mosquitto"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def command(self) -> list[str]:
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        return [self.executable, "-c", str(config)]


@contextlib.contextmanager
def stopped(service: _Service) -> Iterator[None]:
    """Stop ``service`` for the duration of the block, start it again afterwards."""
    service.stop()
    try:
        yield
    finally:
        service.start()
