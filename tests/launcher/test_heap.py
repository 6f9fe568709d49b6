"""Startup objects leave the garbage collector's reach (launcher/heap.py)."""

from __future__ import annotations

import gc
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.heap import freeze_startup_heap
from tests.support.bridge import bridge_command
from tests.support.http import free_port


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the suite runs with a collector that sees everything


def test_freezing_takes_every_live_object_out_of_the_collected_generations(
    unfrozen: None,
) -> None:
    kept = [[n] for n in range(1000)]  # containers: tracked by the collector
    assert len(gc.get_objects()) > len(kept)
    frozen = freeze_startup_heap()
    assert frozen == gc.get_freeze_count()
    assert frozen > len(kept)
    assert not any(obj is kept[0] for obj in gc.get_objects())
    # Objects made afterwards are collected as usual.
    later = [[1]]
    assert any(obj is later[0] for obj in gc.get_objects())


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("proxy", ["--coap-host=127.0.0.1", "--coaps-port=off", "--upstream=http://127.0.0.1:9"]),
        ("api", ["--api-host=127.0.0.1", "--api-key=k", "--proxy-token=t"]),
    ],
)
def test_a_started_process_freezes_its_startup_heap(
    tmp_path: Path, command: str, flags: list[str]
) -> None:
    port = free_port()
    port_flag = "--coap-port" if command == "proxy" else "--api-port"
    log_path = tmp_path / f"{command}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*bridge_command(), command, f"{port_flag}={port}", "--log-level=debug", *flags],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        found = None
        while found is None:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
            found = re.search(r"heap: (\d+) startup objects exempted", log_path.read_text())
        # Tens of thousands: the imported libraries, not a handful of objects.
        assert int(found.group(1)) > 20_000
    finally:
        process.terminate()
        process.wait(timeout=10)
