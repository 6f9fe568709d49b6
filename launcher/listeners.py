"""Listening sockets the launcher binds itself, and the one line a failed bind is reported as.

A port in use used to end in a 50–90 line traceback (uvicorn's, amqtt's, asyncio's). The
launcher now names the listener, the address, the OS's reason and the flag and variable that
move it, in one line on stderr, and exits 2 (issue 12).
"""

from __future__ import annotations

import socket

from proxy.server import ListenerError


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound as uvicorn and amqtt bind theirs (SO_REUSEADDR, so a restart does
    not wait for TIME_WAIT; IPv6 for an address with a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def setting_names(setting: str) -> str:
    """``coap_port`` → ``--coap-port / COAP_BRIDGE_COAP_PORT`` (every flag is also a variable,
    launcher/cli.py)."""
    return f"--{setting.replace('_', '-')} / COAP_BRIDGE_{setting.upper()}"


def describe(exc: ListenerError) -> str:
    """``cannot listen: CoAP UDP on 127.0.0.1:5683: address already in use (set another with
    --coap-port / COAP_BRIDGE_COAP_PORT)``."""
    return f"cannot listen: {exc} (set another with {setting_names(exc.setting)})"
