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
