"""compose.yaml stays valid (Debian's docker-compose parses it offline; no engine needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        raise AssertionError("docker-compose not found: install the Debian package docker-compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    return subprocess.run(
        [exe, "-f", str(REPO / "compose.yaml"), "config", *args],
        env=clean | env, capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip


def test_compose_file_is_valid_and_wires_the_services() -> None:
    result = _config({"COAP_BRIDGE_API_KEY": "k", "COAP_BRIDGE_PROXY_TOKEN": "t"})
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)  # the resolved file, interpolation done
    services = config["services"]
    assert set(services) >= {"redis", "mosquitto", "api", "proxy"}
    assert services["api"]["environment"]["COAP_BRIDGE_REDIS_URL"] == "redis://redis:6379/0"
    assert services["api"]["environment"]["COAP_BRIDGE_PROXY_TOKEN"] == "t"
    assert services["proxy"]["environment"]["COAP_BRIDGE_PROXY_TOKEN"] == "t"
    assert "http://api:8080" in services["proxy"]["command"]


@pytest.mark.parametrize("missing", ["COAP_BRIDGE_API_KEY", "COAP_BRIDGE_PROXY_TOKEN"])
def test_compose_refuses_to_run_without_secrets(missing: str) -> None:
    env = {"COAP_BRIDGE_API_KEY": "k", "COAP_BRIDGE_PROXY_TOKEN": "t"}
    del env[missing]
    result = _config(env, "-q")
    assert result.returncode != 0
    assert missing in result.stderr
