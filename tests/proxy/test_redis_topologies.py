"""The dedup store behind Redis Sentinel and Redis Cluster URLs (issue #4), on real servers.

Sentinel: one throwaway sentinel monitors the test's redis-server; the store finds the master
through it (``redis+sentinel://host:port/name``). Cluster: three throwaway redis-server nodes
made into a cluster by ``redis-cli --cluster create``; dedup keys of one batch land on
different slots, so the store runs the batch as a pipeline instead of one script.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policies.keys import dedup_key
from proxy.state.base import Claim
from proxy.state.redis_store import RedisDedupStore
from tests.support.http import free_port
from tests.support.services import RedisServer


def _wait(check, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _cli(port: int, *args: str) -> str:
    cli = shutil.which("redis-cli")
    assert cli, "redis-cli not found: install the Debian package redis-tools"
    done = subprocess.run(
        [cli, "-p", str(port), *args], capture_output=True, text=True, check=False
    )
    return done.stdout


@pytest.fixture
def sentinel(redis_server: RedisServer, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor cbtest 127.0.0.1 {redis_server.port} 1\n"
    )
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", str(config), "--sentinel"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(lambda: "cbtest" in _cli(port, "SENTINEL", "MASTERS"), "the sentinel")
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    # A node also listens on port + 10000 (the cluster bus): pick ports that leave room.
    ports = []
    while len(ports) < 3:
        port = free_port()
        if port + 10000 <= 65535 and port not in ports:
            ports.append(port)
    processes = []
    try:
        for port in ports:
            node = tmp_path / str(port)
            node.mkdir()
            processes.append(
                subprocess.Popen(
                    [
                        shutil.which("redis-server") or "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(node),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            _wait(lambda port=port: "PONG" in _cli(port, "PING"), f"node {port}")
        created = subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        _wait(lambda: "cluster_state:ok" in _cli(ports[0], "CLUSTER", "INFO"), "cluster_state:ok")
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


async def _exercise(store: RedisDedupStore) -> None:
    keys = [dedup_key("10.1.2.3", 40000 + n, n) for n in range(40)]  # spread over many slots
    try:
        assert {await store.claim(key, lease=5) for key in keys} == {Claim.OWNED}
        assert await store.claim(keys[0], lease=5) is Claim.BUSY
        for key in keys:
            store.complete(key, key.encode(), lifetime=5)
        await store.flush()
        assert [await store.claim(key, lease=5) for key in keys] == [k.encode() for k in keys]
    finally:
        await store.close()


async def test_sentinel_url_finds_the_master(sentinel: int) -> None:
    await _exercise(RedisDedupStore.from_url(f"redis+sentinel://127.0.0.1:{sentinel}/cbtest"))


async def test_cluster_url_spreads_keys_over_slots(cluster: list[int]) -> None:
    await _exercise(RedisDedupStore.from_url(f"redis://127.0.0.1:{cluster[0]}/0?cluster=1"))
