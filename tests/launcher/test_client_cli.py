"""``coap-bridge devices | psk | commands | check | --version`` against a real ``coap-bridge up``.

The bridge is always a real process (tests/support/bridge.py). The client runs as a process
where its exit code and streams are the point; elsewhere in process (``main``), which runs the
same parser and code without paying the interpreter's start-up per call.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from launcher.cli import DEMO_ICCID, SettingError, demo_address, main
from proxy.coap import codes
from proxy.coap.codec import ACK
from tests.support.bridge import Bridge, bridge_command, running_bridge
from tests.support.coap import RawClient, _Collector, request_datagram
from tests.support.mqtt import subscribed

ICCID = "8988280666000000077"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_BRIDGE_")}
    env.pop("XDG_CONFIG_HOME", None)
    env.update(extra)
    return env


def cli(
    *args: str, env: dict[str, str], stdin: str = "", timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bridge_command(), *args], env=env, input=stdin, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


class InProcess:
    """``main(argv)`` with the environment, stdin and streams of a shell call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
        self.monkeypatch = monkeypatch
        self.capsys = capsys

    def __call__(self, *args: str, env: dict[str, str], stdin: str = "") -> tuple[int, str, str]:
        for key in [k for k in os.environ if k.startswith("COAP_BRIDGE_")]:
            self.monkeypatch.delenv(key)
        self.monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
        for key, value in env.items():
            self.monkeypatch.setenv(key, value)
        self.monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: usage errors, --help
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(monkeypatch, capsys)


def _api(bridge: Bridge) -> dict[str, str]:
    return {"COAP_BRIDGE_API_KEY": bridge.api_key, "COAP_BRIDGE_API_URL": bridge.api_url}


def test_version_is_the_installed_distribution() -> None:
    result = cli("--version", env=_env())
    assert result.returncode == 0
    assert result.stdout.strip() == f"coap-bridge {importlib.metadata.version('coap-bridge')}"


async def test_devices_psk_and_commands_through_a_running_bridge(
    tmp_path: Path, run: InProcess
) -> None:
    async with running_bridge(tmp_path) as bridge:
        env = _api(bridge)
        code, out, err = run("devices", "add", "--iccid", ICCID, "--ip", "10.9.8.7", "-o",
                             "json", env=env)  # fmt: skip
        assert code == 0, err
        added = json.loads(out)
        assert (added["id"], added["ip"], added["status"]) == (ICCID, "10.9.8.7", "active")

        # The table lists the demo device of `up` and the new one, one row each.
        code, out, err = run("devices", "list", env=env)
        assert code == 0, err
        header, *rows = out.splitlines()
        assert header.split()[:5] == ["ID", "ICCID", "IMEI", "IP", "STATUS"]
        assert sorted(row.split()[0] for row in rows) == sorted([DEMO_ICCID, ICCID])
        assert next(row for row in rows if row.startswith(ICCID)).split()[3] == "10.9.8.7"

        code, out, _ = run("devices", "patch", ICCID, "--status", "inactive",
                           "--location-barred", "yes", "-o", "json", env=env)  # fmt: skip
        assert code == 0
        patched = json.loads(out)
        assert (patched["status"], patched["location_barred"]) == ("inactive", True)

        code, out, _ = run("devices", "show", ICCID, env=env)
        assert code == 0
        fields = dict(line.split(None, 1) for line in out.splitlines())
        assert fields["status"] == "inactive"
        assert fields["location_barred"] == "yes"

        # psk set reads the key from stdin: the API then reports a user-set key.
        code, out, err = run("psk", "set", ICCID, env=env, stdin="s3cretKey\n")
        assert code == 0, err
        assert out.strip() == f"PSK of {ICCID} set"
        assert json.loads(run("devices", "show", ICCID, "-o", "json", env=env)[1])["psk_user_set"]
        code, out, _ = run("psk", "set", ICCID, "--generate", "--key-format", "hex64", "-o",
                           "json", env=env)  # fmt: skip
        assert code == 0
        credentials = json.loads(out)
        assert credentials["psk_identity"] == ICCID
        assert len(credentials["psk_key"]) == 64
        int(credentials["psk_key"], 16)
        code, out, _ = run("psk", "revoke", ICCID, env=env)
        assert (code, out.strip()) == (0, f"PSK of {ICCID} revoked")
        assert not json.loads(run("devices", "show", ICCID, "-o", "json", env=env)[1])[
            "psk_user_set"
        ]

        code, out, err = run("commands", "send", ICCID, "--json", '{"led": "on"}', "--ttl",
                             "60", "-o", "json", env=env)  # fmt: skip
        assert code == 0, err
        command = json.loads(out)
        assert (command["state"], command["content_format"]) == ("queued", 50)
        assert command["size"] == len(b'{"led":"on"}')
        payload = tmp_path / "payload.bin"
        payload.write_bytes(b"\x00\x01\x02")
        code, out, _ = run("commands", "send", ICCID, "--file", str(payload), "-o", "json",
                           env=env)  # fmt: skip
        assert code == 0
        assert (json.loads(out)["size"], json.loads(out)["content_format"]) == (3, 42)
        code, out, _ = run("commands", "list", ICCID, env=env)
        assert code == 0
        assert command["id"] in out
        assert sum(" queued " in f" {line} " for line in out.splitlines()) == 2

        code, out, _ = run("devices", "delete", ICCID, env=env)
        assert (code, out.strip()) == (0, f"device {ICCID} deleted")
        code, out, err = run("devices", "show", ICCID, env=env)
        assert code == 1
        assert out == ""
        assert err.strip() == f"coap-bridge: GET /devices/{ICCID}: 404 device {ICCID} not found"


async def test_exit_codes_and_messages(tmp_path: Path, run: InProcess) -> None:
    async with running_bridge(tmp_path) as bridge:
        # Processes here: the exit status and the streams are what a script sees.
        wrong_key = cli("devices", "list", "--api-url", bridge.api_url,
                        env=_env(COAP_BRIDGE_API_KEY="not-the-key"))  # fmt: skip
        assert wrong_key.returncode == 1
        assert wrong_key.stdout == ""
        assert wrong_key.stderr.startswith("coap-bridge: GET /devices: 401 ")

        no_key = cli("devices", "list", "--api-url", bridge.api_url, env=_env())
        assert no_key.returncode == 2
        assert "no API key: set COAP_BRIDGE_API_KEY" in no_key.stderr

        usage = cli("devices", "frobnicate", env=_env(**_api(bridge)))
        assert usage.returncode == 2
        assert "invalid choice: 'frobnicate'" in usage.stderr

        env = _api(bridge)
        # The API's 422, field by field.
        code, _, err = run("devices", "add", "--iccid", ICCID, "--ip", "not-an-ip", env=env)
        assert code == 1
        assert err.startswith("coap-bridge: POST /devices: 422 ip: ")
        # A conflict: the demo device holds 127.0.0.1.
        code, _, err = run("devices", "add", "--iccid", ICCID, "--ip", "127.0.0.1", env=env)
        assert code == 1
        assert ": 409 " in err
        # Client-side usage errors never reach the API.
        assert run("devices", "patch", DEMO_ICCID, env=env)[0] == 2
        assert run("devices", "add", "--ip", "10.0.0.1", env=env)[0] == 2
        assert run("psk", "set", DEMO_ICCID, env=env, stdin="")[0] == 2
        code, _, err = run("commands", "send", DEMO_ICCID, "--json", "{nope", env=env)
        assert code == 2
        assert "--json is not JSON" in err
        assert run("commands", "send", DEMO_ICCID, env=env)[0] == 2  # no payload given
        code, _, err = run("devices", "patch", DEMO_ICCID, "--terms-accepted", "maybe", env=env)
        assert code == 2
        assert "'maybe' is not yes or no" in err

    # The bridge has stopped: nothing listens at its address any more.
    code, _, err = run("devices", "list", env=env)
    assert code == 1
    assert f"cannot reach the API at {bridge.api_url}" in err
    assert "Connection refused" in err


async def test_the_config_file_gives_url_and_key_and_the_environment_wins(
    tmp_path: Path, run: InProcess
) -> None:
    config_dir = tmp_path / "xdg" / "coap-bridge"
    config_dir.mkdir(parents=True)
    config = config_dir / "config.toml"
    async with running_bridge(tmp_path) as bridge:
        config.write_text(f'api_url = "{bridge.api_url}"\napi_key = "{bridge.api_key}"\n')
        config.chmod(0o600)
        xdg = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
        code, out, err = run("devices", "show", DEMO_ICCID, "-o", "json", env=xdg)
        assert (code, err) == (0, "")
        assert json.loads(out)["id"] == DEMO_ICCID
        # The variable wins over the file: a wrong key in the environment is refused.
        code, _, err = run("devices", "list", env=xdg | {"COAP_BRIDGE_API_KEY": "wrong"})
        assert code == 1
        assert ": 401 " in err
        # --config names another file; the flag wins over the file's URL.
        other = tmp_path / "other.toml"
        other.write_text(f'api_key = "{bridge.api_key}"\napi_url = "http://127.0.0.1:9"\n')
        other.chmod(0o600)
        code, _, err = run("devices", "list", "--config", str(other), "--api-url",
                           bridge.api_url, env={})  # fmt: skip
        assert (code, err) == (0, "")
        # A key others may read is used, with a warning.
        config.chmod(0o644)
        code, _, err = run("devices", "list", env=xdg)
        assert code == 0
        assert f"{config} holds the API key and is readable by other users" in err

    config.write_text('api_url = "http://127.0.0.1:1"\napi_kee = "typo"\n')
    code, _, err = run("devices", "list", env=xdg)
    assert code == 2
    assert "unknown keys ['api_kee']" in err
    config.write_text("api_url = \n")
    assert run("devices", "list", env=xdg)[0] == 2
    assert run("devices", "list", "--config", str(tmp_path / "missing.toml"), env={})[0] == 2
    code, _, err = run(
        "devices", "list", "--api-url", "ftp://host", env={"COAP_BRIDGE_API_KEY": "k"}
    )
    assert code == 2
    assert "'ftp://host' is not an http:// or https:// URL" in err


GOOD_POLICY = """
trusted_origins = ["https://billing.internal:8443"]

[[route]]
path = "/up"
methods = ["POST"]
target = "/ingest"
batch_target = "/ingest/batch"
topic_query = true

[[route]]
path = "/meter/{id}"
methods = ["GET", "PUT"]
target = "https://billing.internal:8443/meters/{id}"
idempotent = true
"""


def test_check_prints_the_routes_of_a_good_policy(tmp_path: Path, run: InProcess) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(GOOD_POLICY)
    code, out, err = run("check", "--policy", str(policy), env={})
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"policy {policy}: valid, 2 routes"
    assert lines[1].split() == ["METHODS", "PATH", "TARGET", "FLAGS"]
    assert lines[2].split() == ["POST", "/up", "/ingest", "batch=/ingest/batch", "topic_query"]
    assert lines[3].split() == [
        "GET,PUT", "/meter/{id}", "https://billing.internal:8443/meters/{id}", "idempotent"
    ]  # fmt: skip
    assert lines[4] == "trusted origins: https://billing.internal:8443"

    code, out, _ = run("check", "--profile", "nhub", "--profile", "enos", "-o", "json", env={})
    assert code == 0
    report = json.loads(out)
    assert report["source"] == "profiles managed_psk,signed_session"
    paths = {route["path"] for route in report["routes"]}
    assert {"/telemetry", "/auth/{pk}/{dk}", "/commands/{device}"} <= paths
    # The environment names the policy as it does for `up`.
    code, out, _ = run("check", env={"COAP_BRIDGE_POLICY": str(policy)})
    assert code == 0
    assert out.startswith(f"policy {policy}: valid")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[route]]\npath = "/a"\n', "route '/a': 'methods' must be a non-empty list"),
        ("not toml [", "is not valid TOML"),
        ("colour = 1\n[[route]]\npath='/a'\nmethods=['GET']\ntarget='/a'\n", "unknown top-level"),
        (
            "[[route]]\npath='/a/{x}'\nmethods=['GET']\ntarget='/a'\n"
            "[[route]]\npath='/{y}/b'\nmethods=['GET']\ntarget='/b'\n",
            "ambiguous",
        ),
        # Refused only when the proxy builds its handler: the check builds it too.
        (
            "[[route]]\npath='/a'\nmethods=['POST']\ntarget='/a'\n"
            "batch_target='https://elsewhere.example/batch'\n",
            "is not the upstream nor a trusted origin",
        ),
    ],
)
def test_check_refuses_a_bad_policy_with_its_reason(
    tmp_path: Path, run: InProcess, text: str, message: str
) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text(text)
    code, out, err = run("check", "--policy", str(policy), env={})
    assert code == 1
    assert out == ""
    assert err.startswith(f"coap-bridge: policy {policy}: ")
    assert message in err


def test_check_usage_errors(tmp_path: Path, run: InProcess) -> None:
    code, _, err = run("check", "--policy", str(tmp_path / "missing.toml"), env={})
    assert code == 1
    assert "cannot read policy file" in err
    code, _, err = run("check", "--profile", "nonsense", env={})
    assert code == 2
    assert "unknown profile 'nonsense'" in err


# --- the container's flags: --mqtt-host, --demo-ip --------------------------------------------


async def test_the_embedded_broker_and_the_demo_device_on_another_address(
    tmp_path: Path,
) -> None:
    # 127.0.0.2 stands for a container's outside address: the broker listens there only (not
    # on 127.0.0.1, as before), and the demo device is the source address 127.0.0.2.
    extra = ["--mqtt-host", "127.0.0.2", "--demo-ip", "127.0.0.2"]
    async with running_bridge(tmp_path, extra=extra) as bridge:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", bridge.mqtt_port), timeout=2).close()
        url = f"mqtt://127.0.0.2:{bridge.mqtt_port}"
        async with subscribed(url, "demo", protocol="3.1.1") as subscription:
            loop = asyncio.get_running_loop()
            transport, collector = await loop.create_datagram_endpoint(
                _Collector, local_addr=("127.0.0.2", 0), remote_addr=("127.0.0.1", bridge.coap_port)
            )
            device = RawClient(transport, collector)
            try:
                answer = await device.request(
                    request_datagram(codes.POST, 0x4242, "/", queries=["t=demo"], payload=b"hi")
                )
            finally:
                await device.aclose()
            assert (answer.mtype, answer.code) == (ACK, codes.CHANGED)
            (message,) = await subscription.wait_for(1, 5)
            assert bytes(message.payload) == b"hi"  # type: ignore[arg-type]


def test_demo_ip_gateway_reads_the_default_route(tmp_path: Path) -> None:
    routes = tmp_path / "route"
    routes.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\n"
        "eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\n"
    )
    assert demo_address("gateway", str(routes)) == "172.17.0.1"
    assert demo_address(" 10.0.0.7 ") == "10.0.0.7"
    with pytest.raises(SettingError, match="demo_ip: 'nowhere' is neither"):
        demo_address("nowhere")
    routes.write_text("Iface\tDestination\tGateway\n")
    with pytest.raises(SettingError, match="no IPv4 default route"):
        demo_address("gateway", str(routes))


def test_a_bad_demo_ip_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    result = cli("up", "--demo-ip", "nowhere", "--mqtt-port", "0", "--api-port", "0",
                 "--coap-port", "0", "--coaps-port", "off", env=_env())  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "coap-bridge: demo_ip: 'nowhere' is neither an IP address nor 'gateway'"
    )
