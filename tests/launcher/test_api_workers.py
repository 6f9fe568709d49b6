"""``coap-bridge api --workers N`` refuses settings the workers cannot share."""

from __future__ import annotations

import os
import subprocess

from tests.support.bridge import bridge_command
from tests.support.http import free_port


def test_a_fixed_mqtt_client_id_is_refused_with_several_workers() -> None:
    """A broker keeps one connection per client id: two workers with one id would take it
    from each other in turn. The start fails at once, naming the setting (exit 2)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    try:
        run = subprocess.run(
            [*bridge_command(), "api", "--workers=2", f"--api-port={free_port()}",
             "--mqtt-client-id=gateway-1", "--mqtt-url=mqtt://127.0.0.1:9"],
            capture_output=True, text=True, timeout=20, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the API started its workers instead of refusing") from exc
    assert run.returncode == 2, run.stderr
    assert "mqtt_client_id" in run.stderr
    assert "2 API workers cannot share one MQTT client id" in run.stderr
