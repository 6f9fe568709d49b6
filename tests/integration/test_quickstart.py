"""Issue #2 acceptance: the README's ``make run`` works on a fresh clone.

Clones the committed HEAD into a temporary folder, runs ``make run`` there (it creates its own
venv and installs the package), and then does exactly what the README tells a newcomer: a
``coap-client-notls`` POST to the demo device, watched by an MQTT subscriber on the embedded
broker. Ports come from ``COAP_BRIDGE_*`` variables so the test never collides with services
already running on the standard ports. (``make test`` on a fresh clone is what CI runs.)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.clients import coap_client
from tests.support.http import free_port
from tests.support.mqtt import subscribed

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 420.0


async def test_make_run_on_a_fresh_clone_serves_the_demo_device(tmp_path: Path) -> None:
    if shutil.which("git") is None or shutil.which("make") is None:
        raise AssertionError("git and make are needed for the quick-start test")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    coap_port, api_port, mqtt_port = free_port(2), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COAP_BRIDGE_", "VIRTUAL_ENV"))}
    env.update(
        COAP_BRIDGE_COAP_HOST="127.0.0.1",
        COAP_BRIDGE_COAP_PORT=str(coap_port),
        COAP_BRIDGE_API_PORT=str(api_port),
        COAP_BRIDGE_MQTT_PORT=str(mqtt_port),
    )
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + INSTALL_TIMEOUT
        while "coap-bridge is up" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, f"make run exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"make run not up in time:\n{log_path.read_text()}"
            await asyncio.sleep(0.5)
        text = log_path.read_text()
        assert "demo device 8988280666000000001 registered for source address 127.0.0.1" in text
        assert "management API key (generated):" in text
        async with subscribed(f"mqtt://127.0.0.1:{mqtt_port}", "demo", protocol="3.1.1") as sub:
            run = await coap_client(
                "-m", "post", "-e", "hello", f"coap://127.0.0.1:{coap_port}/?t=demo"
            )
            assert run.codes == ["2.04"], run.stdout + run.stderr + log_path.read_text()
            [message] = await sub.wait_for(1)
        assert message.payload == b"hello"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "coap-bridge stopped" in log_path.read_text(), log_path.read_text()
