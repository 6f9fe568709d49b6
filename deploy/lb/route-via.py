#!/usr/bin/env python3
"""Point the default route at the UDP balancer, then (optionally) drop root and run a command.

    route-via.py GATEWAY [--user NAME] [-- COMMAND ARGS...]

A proxy replica behind ``udp-dnat.sh`` sees each device's own source address, so its replies go
to that address: they must pass back through the balancer, which undoes the DNAT. This is
``ip route replace default via GATEWAY`` done over rtnetlink with the standard library alone,
so it runs in the coap-bridge image (python:3.11-slim, which has no iproute2). It needs
CAP_NET_ADMIN; with ``--user`` it then becomes that user (losing every capability, as any
setuid away from root does) and executes COMMAND, so the proxy itself never runs as root.

Used by compose.yaml (the proxy's entrypoint) and by tests/integration/test_topology.py.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import socket
import struct
import sys

RTM_NEWROUTE = 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NLMSG_ERROR = 2
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
RTA_GATEWAY = 5


def replace_default_route(gateway: str) -> None:
    via = ipaddress.IPv4Address(gateway).packed
    rtmsg = struct.pack(
        "BBBBBBBBI",
        socket.AF_INET, 0, 0, 0,  # family, dst_len 0 (default), src_len, tos
        RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0,
    )  # fmt: skip
    attr = struct.pack("HH", 4 + len(via), RTA_GATEWAY) + via
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
    body = rtmsg + attr
    message = struct.pack("IHHII", 16 + len(body), RTM_NEWROUTE, flags, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(message)
        reply = sock.recv(65536)
    kind = struct.unpack_from("H", reply, 4)[0]
    if kind == NLMSG_ERROR:
        code = -struct.unpack_from("i", reply, 16)[0]
        if code:
            raise OSError(code, f"default route via {gateway}: {os.strerror(code)}")


def drop_to(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)  # from root to a user: permitted and effective capabilities cleared
    os.environ["HOME"] = entry.pw_dir


def main(argv: list[str]) -> int:
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    user = None
    if "--user" in argv:
        at = argv.index("--user")
        user = argv[at + 1]
        argv = argv[:at] + argv[at + 2 :]
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        replace_default_route(argv[0])
    except OSError as exc:
        hint = " (needs CAP_NET_ADMIN: cap_add: [NET_ADMIN])" if exc.errno == errno.EPERM else ""
        print(f"route-via: {exc}{hint}", file=sys.stderr)
        return 1
    print(f"route-via: default route via {argv[0]}", file=sys.stderr)
    if user is not None:
        drop_to(user)
    if command:
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
