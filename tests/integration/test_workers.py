"""``coap-bridge proxy --workers 2``: two processes share the UDP port (SO_REUSEPORT).

The kernel spreads datagrams over the sockets by a hash of the source address, so requests
from many source ports must reach both workers. Which worker answered is not visible on the
wire (they are identical by design), so each worker's own CPU time shows that it served.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from proxy.coap import codes as status
from proxy.coap import options as opt
from proxy.coap.codec import CON, encode_parts
from tests.support.bridge import bridge_command
from tests.support.coap import RawClient
from tests.support.http import free_port

pytestmark = pytest.mark.integration


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


async def test_two_workers_share_the_port_and_both_serve(tmp_path: Path) -> None:
    port = free_port(2)
    log = (tmp_path / "proxy.log").open("wb")
    process = subprocess.Popen(
        [*bridge_command(), "proxy", "--coap-host=127.0.0.1", f"--coap-port={port}",
         "--workers=2", "--upstream=http://127.0.0.1:9"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while len(workers := children(process.pid)) < 2:
            assert process.poll() is None, (tmp_path / "proxy.log").read_text()
            assert time.monotonic() < deadline, "workers did not start"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # let both finish importing and bind
        before = {pid: cpu_ticks(pid) for pid in workers}
        discovery = [(opt.URI_PATH, b".well-known"), (opt.URI_PATH, b"core")]
        clients = [await RawClient.connect("127.0.0.1", port) for _ in range(64)]
        codes = []
        for mid in range(200):
            for client in clients:
                client.send(encode_parts(CON, status.GET, mid, b"", discovery, b""))
            codes += [(await c.recv_message(5)).code for c in clients]
        for client in clients:
            client.close()
        used = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
        log.close()
    assert set(codes) == {status.CONTENT}
    assert len(codes) == 64 * 200
    # 12,800 requests cost some 30 ticks of CPU (10 ms each); an idle worker stays at ~0. Each
    # worker must have done a real share of the work.
    total = sum(used.values())
    assert total >= 10, used
    assert all(ticks >= total * 0.2 for ticks in used.values()), used
    assert process.returncode == 0, (tmp_path / "proxy.log").read_text()


async def test_a_worker_killed_by_a_signal_is_started_again(tmp_path: Path) -> None:
    port = free_port(2)
    log = (tmp_path / "proxy.log").open("wb")
    process = subprocess.Popen(
        [*bridge_command(), "proxy", "--coap-host=127.0.0.1", f"--coap-port={port}",
         "--coaps-port=off", "--workers=2", "--upstream=http://127.0.0.1:9"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while len(first := children(process.pid)) < 2:
            assert time.monotonic() < deadline, "workers did not start"
            await asyncio.sleep(0.1)
        os.kill(first[0], signal.SIGKILL)  # what a crash in native code looks like from outside
        deadline = time.monotonic() + 15
        while True:
            now = children(process.pid)
            if len(now) == 2 and first[0] not in now:
                break
            assert process.poll() is None, (tmp_path / "proxy.log").read_text()
            assert time.monotonic() < deadline, f"no replacement worker: {now}"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the new worker binds
        discovery = [(opt.URI_PATH, b".well-known"), (opt.URI_PATH, b"core")]
        clients = [await RawClient.connect("127.0.0.1", port) for _ in range(32)]
        for client in clients:
            client.send(encode_parts(CON, status.GET, 1, b"", discovery, b""))
        codes = [(await c.recv_message(5)).code for c in clients]
        for client in clients:
            await client.aclose()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
        log.close()
    assert codes == [status.CONTENT] * 32
    assert "killed by signal 9; starting it again" in (tmp_path / "proxy.log").read_text()
