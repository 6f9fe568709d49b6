"""``--profile`` on ``up``, ``proxy`` and ``api`` (docs/PROFILES.md): repeatable, comma lists,
flag values or code names, and ``COAP_BRIDGE_PROFILES``; a bad name is refused with the known
ones before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import ApiSettings
from launcher.cli import _given, api_environment, build_parser, main
from proxy.server import route_policy
from proxy.settings import ProxySettings

ALL = ["sim_identity", "managed_psk", "signed_session"]


def _settings(argv: list[str]) -> tuple[ProxySettings, ApiSettings]:
    given = _given(build_parser().parse_args(argv))
    return ProxySettings(**given), ApiSettings(**given)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["up"], ["sim_identity"], id="default"),
        pytest.param(["up", "--profile", "nhub"], ["managed_psk"], id="flag-value"),
        pytest.param(["up", "--profile", "1nce", "--profile", "nhub,enos"], ALL, id="repeated"),
        pytest.param(
            ["up", "--profile", "sim_identity,signed_session"], [ALL[0], ALL[2]], id="codes"
        ),
        pytest.param(
            ["up", "--profile", "enos", "--profile", "1nce"], [ALL[2], ALL[0]], id="order"
        ),
        pytest.param(["up", "--profile", "managed-psk,managed_psk"], [ALL[1]], id="repeat-once"),
    ],
)
def test_up_profiles(argv: list[str], expected: list[str]) -> None:
    proxy, api = _settings(argv)
    assert proxy.profiles == expected
    assert api.profiles == expected


@pytest.mark.parametrize("command", ["proxy", "api"])
def test_proxy_and_api_take_the_flag(command: str) -> None:
    given = _given(build_parser().parse_args([command, "--profile", "enos,sim"]))
    settings = ProxySettings(**given) if command == "proxy" else ApiSettings(**given)
    assert settings.profiles == ["signed_session", "sim_identity"]


def test_the_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COAP_BRIDGE_PROFILES", "enos")
    assert _settings(["up"])[0].profiles == ["signed_session"]
    assert _settings(["up", "--profile", "nhub"])[1].profiles == ["managed_psk"]


@pytest.mark.parametrize("command", ["up", "proxy", "api"])
def test_an_unknown_flag_value_is_a_usage_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command, "--profile", "1nce,lwm2m"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "unknown profile 'lwm2m'" in error
    assert "managed_psk (nhub, managed-psk)" in error


def test_an_unknown_profile_in_the_environment_fails_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COAP_BRIDGE_PROFILES", "nbiot")
    assert main(["proxy", "--coap-port", "0", "--coaps-port", "off"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("coap-bridge: invalid setting")
    assert "unknown profile 'nbiot'" in error


def test_policy_replaces_the_route_table_but_not_the_api_resources(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[route]]\npath = "/up"\nmethods = ["POST"]\ntarget = "/ingest"\n')
    proxy, api = _settings(["up", "--profile", "nhub", "--policy", str(policy)])
    assert set(route_policy(proxy).routes) == {"/up"}
    assert api.profiles == ["managed_psk"]
    proxy, _ = _settings(["up", "--profile", "nhub"])
    assert "/telemetry" in route_policy(proxy).routes


def test_api_workers_read_the_lists_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # `api --workers N`: each uvicorn worker rebuilds its settings from the environment.
    settings = ApiSettings(profiles=["enos", "nhub"], trusted_proxy_networks=["10.0.0.0/8"])
    for name, value in api_environment(settings).items():
        monkeypatch.setenv(name, value)
    again = ApiSettings()
    assert again.profiles == ["signed_session", "managed_psk"]
    assert again.trusted_proxy_networks == ["10.0.0.0/8"]
