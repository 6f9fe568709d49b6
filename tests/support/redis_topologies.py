"""Throwaway Redis Sentinel and Redis Cluster deployments, for the topology tests (issue #4).

Registered as a pytest plugin by ``tests/conftest.py``, so every test module can ask for:

``redis_sentinel`` (function scope; one sentinel process per session) -> :class:`SentinelDeployment`
    ``.url`` (``redis+sentinel://127.0.0.1:P/cbtest``), ``.port``, ``.service``,
    ``.node_urls`` (the master's plain URL). The sentinel monitors the session's
    ``redis_server`` (which this fixture also requests, so that server is flushed and running
    when the test starts).
``redis_cluster`` (function scope; one 3-node cluster per session) -> :class:`ClusterDeployment`
    ``.url`` (``redis://127.0.0.1:P/0?cluster=1``), ``.ports``, ``.node_urls``, ``.seed``,
    ``.flushall()``, ``.owner(key)``, ``.move_slot(key, port)``. Three
    ``redis-server --cluster-enabled yes`` masters joined by ``redis-cli --cluster create``
    (~2 s, paid once, by the first test that asks); flushed before each test.
``redis_topology`` (parametrized: ``sentinel``, ``cluster``) -> either of the two above.

Both processes are only started when a test asks for them. A missing binary fails the test
with the name of the Debian package, as ``tests.support.services`` does.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.http import free_port
from tests.support.services import RedisServer, require_binary

SERVICE = "cbtest"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cli(port: int, *args: str) -> str:
    """``redis-cli -p PORT ARGS...``; its stdout (errors are in the text, not raised)."""
    done = subprocess.run(
        [require_binary("redis-cli", "redis-tools"), "-p", str(port), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass(frozen=True)
class SentinelDeployment:
    port: int
    master_port: int
    service: str = SERVICE
    kind: str = "sentinel"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}"

    @property
    def node_urls(self) -> tuple[str, ...]:
        """Plain URLs of every master (here: the one the sentinel monitors)."""
        return (f"redis://127.0.0.1:{self.master_port}/0",)


@dataclass(frozen=True)
class ClusterDeployment:
    ports: tuple[int, ...]
    kind: str = "cluster"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0?cluster=1"

    @property
    def seed(self) -> str:
        """A plain URL of one node, for redis-py's ``RedisCluster.from_url``."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    @property
    def node_urls(self) -> tuple[str, ...]:
        return tuple(f"redis://127.0.0.1:{port}/0" for port in self.ports)

    def flushall(self) -> None:
        for port in self.ports:
            reply = cli(port, "FLUSHALL")
            assert reply.strip() == "OK", f"FLUSHALL on node {port}: {reply!r}"

    def owner(self, key: str) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = int(cli(self.ports[0], "CLUSTER", "KEYSLOT", key))
        for line in cli(self.ports[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2]:
                continue
            for part in fields[8:]:
                first, _, last = part.partition("-")
                if first.isdigit() and int(first) <= slot <= int(last or first):
                    return int(fields[1].split("@")[0].rpartition(":")[2])
        raise AssertionError(f"no master serves slot {slot}")

    def move_slot(self, key: str, port: int) -> None:
        """Hand the (empty) slot of ``key`` to the master on ``port``, as a resharding does."""
        slot = str(int(cli(self.ports[0], "CLUSTER", "KEYSLOT", key)))
        source = self.owner(key)
        ids = {p: cli(p, "CLUSTER", "MYID").strip() for p in self.ports}
        assert cli(port, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source]).strip() == "OK"
        assert cli(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[port]).strip() == "OK"
        for node in (port, source, *(p for p in self.ports if p not in (port, source))):
            reply = cli(node, "CLUSTER", "SETSLOT", slot, "NODE", ids[port]).strip()
            assert reply == "OK", f"SETSLOT NODE on {node}: {reply!r}"
        for node in self.ports:
            wait_for(lambda node=node: self._owner_seen_by(node, key) == port, "the new owner")

    def _owner_seen_by(self, node: int, key: str) -> int:
        words = cli(node, "GET", key).split()  # MOVED <slot> host:port, or the value if ours
        if "MOVED" in words:
            return int(words[words.index("MOVED") + 2].rpartition(":")[2])
        return node


def run_sentinel(master_port: int, workdir: Path) -> Iterator[SentinelDeployment]:
    """One sentinel monitoring the redis-server on ``master_port`` as :data:`SERVICE`."""
    port = free_port()
    config = workdir / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
    )
    process = subprocess.Popen(
        [require_binary("redis-server", "redis-server"), str(config), "--sentinel"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: SERVICE in cli(port, "SENTINEL", "MASTERS"), "the sentinel")
        yield SentinelDeployment(port, master_port)
    finally:
        _stop([process])


def run_cluster(workdir: Path, nodes: int = 3) -> Iterator[ClusterDeployment]:
    """``nodes`` masters (no replicas) made into one cluster by ``redis-cli --cluster create``."""
    server = require_binary("redis-server", "redis-server")
    # A node also listens on port + 10000 (the cluster bus): pick ports that leave room.
    ports: list[int] = []
    while len(ports) < nodes:
        port = free_port()
        if port + 10000 <= 65535 and port not in ports:
            ports.append(port)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node = workdir / str(port)
            node.mkdir()
            command = [
                server,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(node),
            ]  # fmt: skip
            processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in ports:
            wait_for(lambda port=port: "PONG" in cli(port, "PING"), f"node {port}")
        created = subprocess.run(
            [require_binary("redis-cli", "redis-tools"), "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        for port in ports:
            wait_for(
                lambda port=port: "cluster_state:ok" in cli(port, "CLUSTER", "INFO"),
                f"cluster_state:ok on node {port}",
            )
        yield ClusterDeployment(tuple(ports))
    finally:
        _stop(processes)


@pytest.fixture(scope="session")
def _redis_sentinel_process(
    _redis_process: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SentinelDeployment]:
    yield from run_sentinel(_redis_process.port, tmp_path_factory.mktemp("sentinel"))


@pytest.fixture
def redis_sentinel(
    redis_server: RedisServer, _redis_sentinel_process: SentinelDeployment
) -> SentinelDeployment:
    return _redis_sentinel_process


@pytest.fixture(params=["sentinel", "cluster"])
def redis_topology(request: pytest.FixtureRequest) -> SentinelDeployment | ClusterDeployment:
    """Each test once behind a Sentinel URL and once behind a Cluster URL."""
    deployment: SentinelDeployment | ClusterDeployment = request.getfixturevalue(
        f"redis_{request.param}"
    )
    return deployment


@pytest.fixture(params=["sentinel", "cluster"])
def unreachable_url(request: pytest.FixtureRequest) -> str:
    """A Sentinel URL and a Cluster URL on which nothing listens."""
    port = free_port()
    if request.param == "sentinel":
        return f"redis+sentinel://127.0.0.1:{port}/{SERVICE}"
    return f"redis://127.0.0.1:{port}/0?cluster=1"


@pytest.fixture(scope="session")
def _redis_cluster_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ClusterDeployment]:
    yield from run_cluster(tmp_path_factory.mktemp("cluster"))


@pytest.fixture
def redis_cluster(_redis_cluster_process: ClusterDeployment) -> ClusterDeployment:
    _redis_cluster_process.flushall()
    return _redis_cluster_process
