"""ApiSettings: environment names, URL parsing and start-up validation."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from api.settings import ApiSettings, MqttEndpoint


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("COAP_BRIDGE_"):
            monkeypatch.delenv(name)
    settings = ApiSettings()
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8080)
    assert settings.redis_url is None
    assert settings.mqtt_endpoint == MqttEndpoint(host="127.0.0.1", port=1883)
    assert settings.mqtt_protocol == "5"
    assert settings.api_key is None
    assert settings.proxy_token is None
    assert settings.topic_template == "devices/{iccid}/messages"
    assert settings.max_payload == 65536


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COAP_BRIDGE_API_PORT", "9000")
    monkeypatch.setenv("COAP_BRIDGE_MQTT_URL", "mqtt://user%40x:p%3Ass@broker.example:1884")
    monkeypatch.setenv("COAP_BRIDGE_MQTT_PROTOCOL", "3.1.1")
    monkeypatch.setenv("COAP_BRIDGE_PROXY_TOKEN", "t")
    settings = ApiSettings()
    assert settings.api_port == 9000
    assert settings.mqtt_endpoint == MqttEndpoint("broker.example", 1884, "user@x", "p:ss")
    assert settings.mqtt_protocol == "3.1.1"
    assert settings.proxy_token == "t"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mqtt_url", "http://broker:1883", "scheme must be one of"),
        ("mqtt_url", "mqtt://", "has no host"),
        ("mqtt_protocol", "4", "'5' or '3.1.1'"),
        ("topic_template", "devices/{imei}/x", "does not render a valid topic"),
        ("topic_template", "devices//{iccid}", "two slashes"),
        ("mqtt_publish_timeout", 0, "greater than 0"),
    ],
)
def test_invalid_values_fail_at_start(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ApiSettings(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "url"),
    [
        pytest.param({"coaps_url": "coaps://coap.example.com:5684"}, None, id="explicit"),
        pytest.param({"coap_host": "192.0.2.7"}, "coaps://192.0.2.7:5684", id="from-coap-host"),
        pytest.param(
            {"coap_host": "192.0.2.7", "coaps_host": "198.51.100.1", "coaps_port": "15684"},
            "coaps://198.51.100.1:15684",
            id="from-the-dtls-listener",
        ),
        pytest.param({"coap_host": "2001:db8::1"}, "coaps://[2001:db8::1]:5684", id="ipv6"),
        pytest.param({"coap_host": "h", "coaps_port": "off"}, "", id="dtls-off"),
        pytest.param({"coap_host": "h", "coaps_port": 0}, "coaps://h:5684", id="port-0"),
    ],
)
def test_coaps_endpoint(values: dict[str, object], url: str | None) -> None:
    settings = ApiSettings(**values)  # type: ignore[arg-type]
    assert settings.coaps_endpoint == (url if url is not None else values["coaps_url"])


def test_coaps_endpoint_of_a_wildcard_host_is_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "bridge.example.net")
    assert ApiSettings(coap_host="0.0.0.0").coaps_endpoint == "coaps://bridge.example.net:5684"


@pytest.mark.parametrize("value", ["http://x:5684", "coaps://", "coaps://a,b:5684"])
def test_unusable_coaps_url_fails_at_start(value: str) -> None:
    with pytest.raises(ValidationError, match="coaps_url"):
        ApiSettings(coaps_url=value)


@pytest.mark.parametrize(
    ("raw", "networks"),
    [
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        ("10.0.0.0/8, 2001:db8::/32", ["10.0.0.0/8", "2001:db8::/32"]),
        ('["192.0.2.1"]', ["192.0.2.1/32"]),
        ("10.1.2.3/8", ["10.0.0.0/8"]),
        ("", []),
    ],
)
def test_trusted_proxy_networks_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, networks: list[str]
) -> None:
    monkeypatch.setenv("COAP_BRIDGE_TRUSTED_PROXY_NETWORKS", raw)
    assert ApiSettings().trusted_proxy_networks == networks


def test_a_typo_in_trusted_networks_fails_at_start() -> None:
    with pytest.raises(ValidationError):
        ApiSettings(trusted_proxy_networks=["10.0.0.0/33"])
