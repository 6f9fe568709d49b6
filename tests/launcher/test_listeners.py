"""A port in use is one line, not a traceback (issue 12, item 12).

Each row occupies one listener's port with a real socket (UDP for CoAP and DTLS, a listening
TCP socket for the API and the embedded broker), runs the real ``coap-bridge`` command, and
expects exit 2 and exactly one line on stderr naming the listener, the address, the OS's
reason and the flag and variable that move it.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.bridge import bridge_command
from tests.support.http import free_port
from tests.support.services import RedisServer

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Row:
    command: list[str]  # TAKEN: the occupied port; FREE_TCP / FREE_UDP: fresh free ports
    kind: int  # the occupied port's socket type
    listener: str
    setting: str
    needs_redis: bool = False


ROWS = {
    "proxy-coap": Row(["proxy", "--coap-port=TAKEN"], socket.SOCK_DGRAM, "CoAP UDP", "coap-port"),
    "proxy-coaps": Row(
        ["proxy", "--coap-port=FREE_UDP", "--coaps-port=TAKEN"],
        socket.SOCK_DGRAM,
        "CoAP DTLS",
        "coaps-port",
        needs_redis=True,
    ),
    "proxy-workers-coap": Row(
        ["proxy", "--workers=2", "--coap-port=TAKEN", "--coaps-port=off"],
        socket.SOCK_DGRAM,
        "CoAP UDP",
        "coap-port",
    ),
    "api": Row(["api", "--api-port=TAKEN"], socket.SOCK_STREAM, "HTTP API", "api-port"),
    "api-workers": Row(
        ["api", "--workers=2", "--api-port=TAKEN"], socket.SOCK_STREAM, "HTTP API", "api-port"
    ),
    "up-coap": Row(
        ["up", "--coap-port=TAKEN", "--api-port=FREE_TCP", "--mqtt-port=FREE_TCP"],
        socket.SOCK_DGRAM,
        "CoAP UDP",
        "coap-port",
    ),
    "up-coaps": Row(
        [
            "up",
            "--coap-port=FREE_UDP",
            "--coaps-port=TAKEN",
            "--api-port=FREE_TCP",
            "--mqtt-port=FREE_TCP",
        ],
        socket.SOCK_DGRAM,
        "CoAP DTLS",
        "coaps-port",
    ),
    "up-api": Row(
        ["up", "--coap-port=FREE_UDP", "--api-port=TAKEN", "--mqtt-port=FREE_TCP"],
        socket.SOCK_STREAM,
        "HTTP API",
        "api-port",
    ),
    "up-mqtt": Row(
        ["up", "--coap-port=FREE_UDP", "--api-port=FREE_TCP", "--mqtt-port=TAKEN"],
        socket.SOCK_STREAM,
        "embedded MQTT broker",
        "mqtt-port",
    ),
}


@pytest.fixture
def occupied(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    kind: int = request.param
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield kind, sock.getsockname()[1]


def _args(row: Row, taken: int) -> list[str]:
    command = row.command[0]
    args = []
    for arg in row.command:
        arg = arg.replace("TAKEN", str(taken))
        arg = arg.replace("FREE_TCP", str(free_port())).replace("FREE_UDP", str(free_port(2)))
        args.append(arg)
    if command in ("up", "proxy"):
        args.append("--coap-host=127.0.0.1")
    if command in ("up", "api"):
        args.append("--api-host=127.0.0.1")
    if command == "proxy":
        args.append("--upstream=http://127.0.0.1:9")
    return [*args, "--log-level=warning", "--proxy-token=t"]


@pytest.mark.parametrize(
    ("row", "occupied"),
    [pytest.param(row, row.kind, id=name) for name, row in ROWS.items()],
    indirect=["occupied"],
)
def test_a_port_in_use_is_one_line_and_exit_2(
    row: Row, occupied: tuple[int, int], request: pytest.FixtureRequest
) -> None:
    _, taken = occupied
    args = _args(row, taken)
    if row.needs_redis:
        redis: RedisServer = request.getfixturevalue("redis_server")
        args.append(f"--redis-url={redis.url}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    run = subprocess.run(
        [*bridge_command(), *args], capture_output=True, text=True, timeout=60, env=env
    )
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert len(lines) == 1, run.stderr
    [line] = lines
    assert line.startswith("coap-bridge: cannot listen: "), line
    assert f"{row.listener} on 127.0.0.1:{taken}: address already in use" in line, line
    env_name = "COAP_BRIDGE_" + row.setting.replace("-", "_").upper()
    assert f"--{row.setting} / {env_name}" in line, line
