"""compose.yaml stays valid (Debian's docker-compose parses it offline; no engine needed)."""

from __future__ import annotations

import ast
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


def test_compose_scales_out_behind_a_source_preserving_udp_balancer() -> None:
    result = _config({"COAP_BRIDGE_API_KEY": "k", "COAP_BRIDGE_PROXY_TOKEN": "t"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["proxy"]["deploy"]["replicas"] == 3
    assert services["api"]["deploy"]["replicas"] == 2
    # Every replica shares the dedup state in one Redis.
    assert services["proxy"]["environment"]["COAP_BRIDGE_REDIS_URL"] == "redis://redis:6379/0"
    # The proxies publish nothing themselves: devices reach them through the balancer, which
    # publishes both CoAP and CoAPS.
    assert "ports" not in services["proxy"]
    lb = services["udp-lb"]
    published = {(p["target"], p["protocol"]) for p in lb["ports"]}
    assert published == {(5683, "udp"), (5684, "udp")}
    assert "NET_ADMIN" in lb["cap_add"]
    assert str(lb["sysctls"]["net.ipv4.ip_forward"]) == "1"
    # The balancer is the script the topology test runs, fed with the proxies' addresses.
    assert lb["build"]["context"].endswith("deploy/lb")
    dockerfile = (REPO / "deploy" / "lb" / "Dockerfile").read_text()
    assert "udp-dnat.sh" in dockerfile
    assert {"nftables", "conntrack"} <= set(dockerfile.split())
    assert lb["command"][:3] == ["watch", "--backends-dns", "proxy"]
    # Replies go back through the balancer: each proxy's default route points at its fixed
    # address on the proxies' network, set before the proxy starts (then root is dropped).
    lb_backend = lb["networks"]["backend"]["ipv4_address"]
    entrypoint = services["proxy"]["entrypoint"]
    assert entrypoint[:3] == ["python3", "/opt/coap-lb/route-via.py", lb_backend]
    assert entrypoint[entrypoint.index("--user") + 1] == "bridge"
    assert "NET_ADMIN" in services["proxy"]["cap_add"]
    assert services["proxy"]["networks"].keys() == {"backend"}
    assert any(v.endswith(":/opt/coap-lb:ro") for v in services["proxy"]["volumes"])


@pytest.mark.parametrize("missing", ["COAP_BRIDGE_API_KEY", "COAP_BRIDGE_PROXY_TOKEN"])
def test_compose_refuses_to_run_without_secrets(missing: str) -> None:
    env = {"COAP_BRIDGE_API_KEY": "k", "COAP_BRIDGE_PROXY_TOKEN": "t"}
    del env[missing]
    result = _config(env, "-q")
    assert result.returncode != 0
    assert missing in result.stderr


def _python_probe(service: dict[str, object]) -> str:
    test = service["healthcheck"]["test"]  # type: ignore[index]
    assert test[:3] == ["CMD", "python3", "-c"], "the image has python, not curl"
    code: str = test[3]
    ast.parse(code)
    return code


def test_every_service_is_health_checked_and_started_after_what_it_needs() -> None:
    result = _config({"COAP_BRIDGE_API_KEY": "k", "COAP_BRIDGE_PROXY_TOKEN": "t"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("redis", "mosquitto", "api", "proxy"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    # Mosquitto: a retained $SYS message. `config` prints a file compose would read again, so
    # the literal $ stays escaped as $$ (one $ alone would be an unset variable, i.e. empty).
    assert "$$SYS/broker/version" in services["mosquitto"]["healthcheck"]["test"]
    # The API is healthy when ready (broker and store reachable), on the port it listens on.
    api_port = services["api"]["command"][services["api"]["command"].index("--api-port") + 1]
    assert f"http://127.0.0.1:{api_port}/readyz" in _python_probe(services["api"])
    # The proxy's probe is its metrics listener's liveness, on the port its environment sets.
    metrics_port = services["proxy"]["environment"]["COAP_BRIDGE_METRICS_PORT"]
    assert f"http://127.0.0.1:{metrics_port}/healthz" in _python_probe(services["proxy"])
    wanted = {
        "api": {"redis", "mosquitto"},
        "proxy": {"redis", "api"},
        "udp-lb": {"proxy"},
    }
    for name, needs in wanted.items():
        depends = services[name]["depends_on"]
        assert set(depends) == needs, name
        for need in needs:
            assert depends[need] == {"condition": "service_healthy"}, (name, need)
