"""A real load-balanced topology in network namespaces (``ip netns``, veth), for one test.

::

    client ns            lb ns (udp-dnat.sh)                      replica ns 1..N
    ┌──────────┐ veth ┌──────────────────────────┐   bridge   ┌────────────────────┐
    │ .C.2     ├──────┤ .C.1   nft DNAT VIP:5683/ ├─────┬──────┤ .R.11 coap-bridge  │
    │ dflt→.C.1│      │        5684 → replicas   │     ├──────┤ .R.12   proxy      │
    └──────────┘      │ .R.1  (conntrack, no SNAT)│     └──────┤ .R.13 dflt→.R.1    │
                      │ .B.2                      │           └────────────────────┘
                      └───────────┬───────────────┘
                                  │ veth
                      root ns  .B.1: redis-server, coap-bridge api (and the test itself)

All addresses come from 198.18.0.0/15 (RFC 2544, reserved for benchmarking networks), one
random block of four /24s per topology; names carry a random suffix. Nothing is sent anywhere
but these namespaces and the root namespace's own veth. :meth:`Topology.close` kills whatever
still runs in the namespaces, deletes them and the root veth, even after a failed build.

``probe()`` says why the machine cannot do this (not root, ``ip netns add`` refused, nft or
conntrack missing and not installable), for ``pytest.skip``; it tries each thing for real.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import Proc

REPO = Path(__file__).resolve().parents[2]
UDP_DNAT = REPO / "deploy" / "lb" / "udp-dnat.sh"
ROUTE_VIA = REPO / "deploy" / "lb" / "route-via.py"
CLONE_NEWNET = 0x40000000
_SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def probe() -> str | None:
    """None when namespaces, veths, nftables NAT and conntrack all work here; else why not."""
    packages = {"ip": "iproute2", "nft": "nftables", "conntrack": "conntrack"}
    if any(tool(cmd) is None for cmd in packages):
        installer = REPO / "scripts" / "ensure-debian-packages.sh"
        _run(str(installer), *packages.values(), check=False)  # as root: installs them
        still = [pkg for cmd, pkg in packages.items() if tool(cmd) is None]
        if still:
            return f"missing and not installable here: {', '.join(still)} (Debian packages)"
    name = f"cbprobe-{secrets.token_hex(3)}"
    made = _run(tool("ip") or "ip", "netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` refused (needs root / CAP_SYS_ADMIN): {made.stderr.strip()}"
    try:
        ip = tool("ip") or "ip"
        steps = [
            [ip, "netns", "exec", name, tool("nft") or "nft", "add table ip probe"],
            [ip, "netns", "exec", name, tool("nft") or "nft",
             "add chain ip probe p { type nat hook prerouting priority dstnat; }"],
            [ip, "netns", "exec", name, tool("conntrack") or "conntrack", "-L"],
            [ip, "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"],
        ]  # fmt: skip
        for step in steps:
            result = _run(*step, check=False)
            if result.returncode != 0:
                return f"`{' '.join(step[4:] if 'exec' in step else step)}` failed: {result.stderr}"
    finally:
        _run(tool("ip") or "ip", "netns", "del", name, check=False)
    return None


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the block with this thread in ``netns``: sockets made here stay in it for life."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's namespace")
    finally:
        os.close(own)
        os.close(target)


def udp_socket_in(netns: str) -> socket.socket:
    """A non-blocking UDP socket bound to an ephemeral port inside ``netns``."""
    with inside(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class Flow:
    """One conntrack entry through the balancer: who sent, and which replica got it."""

    client: str
    sport: int
    replica: str


@dataclass
class Topology:
    replicas: int = 3
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    block: int = field(default_factory=lambda: 4 * random.randrange(1, 128))
    namespaces: list[str] = field(default_factory=list)
    root_links: list[str] = field(default_factory=list)

    # -- addresses and names --------------------------------------------------------------

    def _net(self, offset: int) -> str:
        n = self.block + offset  # 4..511 over 198.18.0.0/15
        return f"198.{18 + n // 256}.{n % 256}"

    @property
    def client_ip(self) -> str:
        return f"{self._net(0)}.2"

    @property
    def lb_client_side(self) -> str:
        return f"{self._net(0)}.1"

    @property
    def lb_replica_side(self) -> str:
        return f"{self._net(1)}.1"

    @property
    def replica_ips(self) -> list[str]:
        return [f"{self._net(1)}.{11 + i}" for i in range(self.replicas)]

    @property
    def backend_ip(self) -> str:
        """The root namespace's end of its veth to the balancer: Redis and the API bind here."""
        return f"{self._net(2)}.1"

    @property
    def lb_backend_side(self) -> str:
        return f"{self._net(2)}.2"

    @property
    def vip(self) -> str:
        """The service address: on no interface at all, only matched by the DNAT rule."""
        return f"{self._net(3)}.10"

    @property
    def client_ns(self) -> str:
        return f"cb-client-{self.suffix}"

    @property
    def lb_ns(self) -> str:
        return f"cb-lb-{self.suffix}"

    def replica_ns(self, index: int) -> str:
        return f"cb-replica{index + 1}-{self.suffix}"

    # -- building -------------------------------------------------------------------------

    def ip(self, *args: str) -> str:
        return _run(tool("ip") or "ip", *args).stdout

    def exec(self, netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(tool("ip") or "ip", "netns", "exec", netns, *args, check=check)

    def _add_ns(self, name: str) -> None:
        self.ip("netns", "add", name)
        self.namespaces.append(name)
        self.ip("-n", name, "link", "set", "lo", "up")

    def _veth(self, a_ns: str | None, a: str, b_ns: str, b: str) -> None:
        """A veth pair made in the root namespace, each end moved where it belongs."""
        self.ip("link", "add", a, "type", "veth", "peer", "name", b)
        if a_ns is None:
            self.root_links.append(a)
        else:
            self.ip("link", "set", a, "netns", a_ns)
        self.ip("link", "set", b, "netns", b_ns)

    def _addr(self, netns: str | None, dev: str, cidr: str) -> None:
        where = ["-n", netns] if netns else []
        self.ip(*where, "addr", "add", cidr, "dev", dev)
        self.ip(*where, "link", "set", dev, "up")

    def build(self) -> None:
        taken = self.ip("-4", "route", "show")
        for offset in range(4):
            if f"{self._net(offset)}." in taken:
                raise RuntimeError(f"{self._net(offset)}.0/24 is already routed here")
        s = self.suffix
        for name in (self.client_ns, self.lb_ns):
            self._add_ns(name)
        # client <-> balancer
        self._veth(self.client_ns, f"cb{s}c0", self.lb_ns, f"cb{s}c1")
        self._addr(self.client_ns, f"cb{s}c0", f"{self.client_ip}/24")
        self._addr(self.lb_ns, f"cb{s}c1", f"{self.lb_client_side}/24")
        self.ip("-n", self.client_ns, "route", "add", "default", "via", self.lb_client_side)
        # balancer <-> root namespace (Redis, API)
        self._veth(None, f"cb{s}b0", self.lb_ns, f"cb{s}b1")
        self._addr(None, f"cb{s}b0", f"{self.backend_ip}/24")
        self._addr(self.lb_ns, f"cb{s}b1", f"{self.lb_backend_side}/24")
        self.ip("route", "add", f"{self._net(1)}.0/24", "via", self.lb_backend_side)
        # balancer <-> replicas: one bridge in the balancer's namespace, like a node's cni0
        bridge = f"cb{s}br"
        self.ip("-n", self.lb_ns, "link", "add", bridge, "type", "bridge")
        self._addr(self.lb_ns, bridge, f"{self.lb_replica_side}/24")
        for i, address in enumerate(self.replica_ips):
            ns = self.replica_ns(i)
            self._add_ns(ns)
            self._veth(ns, f"cb{s}r{i}", self.lb_ns, f"cb{s}p{i}")
            self._addr(ns, f"cb{s}r{i}", f"{address}/24")
            self.ip("-n", self.lb_ns, "link", "set", f"cb{s}p{i}", "master", bridge, "up")
            # Replies to devices go back through the balancer (it undoes the DNAT): the same
            # helper compose.yaml runs as the proxy's entrypoint.
            self.exec(ns, sys.executable, str(ROUTE_VIA), self.lb_replica_side)
        self.exec(self.lb_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    # -- the balancer ---------------------------------------------------------------------

    def balance(self, *replicas: str) -> str:
        """``udp-dnat.sh sync`` in the balancer's namespace: exactly these replicas from now."""
        return self.exec(
            self.lb_ns, str(UDP_DNAT), "sync", "--vip", self.vip, *replicas
        ).stderr.strip()

    def flows(self) -> list[Flow]:
        """The balancer's conntrack entries for the VIP."""
        listing = self.exec(
            self.lb_ns, tool("conntrack") or "conntrack", "-L", "-p", "udp",
            "--orig-dst", self.vip, check=False,
        ).stdout  # fmt: skip
        flows = []
        for line in listing.splitlines():
            src = re.findall(r"src=(\S+)", line)
            sport = re.findall(r"sport=(\d+)", line)
            if len(src) >= 2 and sport:
                flows.append(Flow(client=src[0], sport=int(sport[0]), replica=src[1]))
        return flows

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        ip = tool("ip") or "ip"
        for name in self.namespaces:
            pids = _run(ip, "netns", "pids", name, check=False).stdout.split()
            for pid in pids:  # only processes of this test live in these namespaces
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for name in reversed(self.namespaces):
            _run(ip, "netns", "del", name, check=False)
        for link in self.root_links:  # gone with its peer already; make sure
            _run(ip, "link", "del", link, check=False)
        self.namespaces.clear()
        self.root_links.clear()


def spawn(
    log_dir: Path, name: str, argv: list[str], *, netns: str | None = None,
    env: dict[str, str] | None = None,
) -> Proc:  # fmt: skip
    """A process (its own session, so SIGKILL takes all of it), in ``netns`` if given; its
    output goes to ``log_dir/name.log``."""
    prefix = [tool("ip") or "ip", "netns", "exec", netns] if netns else []
    log_path = log_dir / f"{name}.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*prefix, *argv], stdout=log, stderr=subprocess.STDOUT, env=clean | (env or {}),
            start_new_session=True,
        )  # fmt: skip
    return Proc(name, process, log_path, 0)
