"""Settings of the HTTP backend, read from ``COAP_BRIDGE_*`` environment variables.

Never instantiated at import time: the app factory takes an :class:`ApiSettings` and routes get
it through :func:`api.deps.get_settings`, which tests override.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from policies.topics import DEFAULT_TOPIC_TEMPLATE, render_topic, validate_topic

_MQTT_SCHEMES = {"mqtt": 1883, "tcp": 1883}


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where the publisher connects, split out of ``mqtt_url``."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """``mqtt://[user[:pass]@]host[:port]`` → :class:`MqttEndpoint`; ``ValueError`` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in _MQTT_SCHEMES:
        raise ValueError(f"mqtt_url scheme must be one of {sorted(_MQTT_SCHEMES)}, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"mqtt_url has no host: {url!r}")
    port = parts.port or _MQTT_SCHEMES[parts.scheme]
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return MqttEndpoint(host=parts.hostname, port=port, username=username, password=password)


class ApiSettings(BaseSettings):
    """Everything the API needs; the env var is ``COAP_BRIDGE_`` + the upper-cased field name."""

    model_config = SettingsConfigDict(env_prefix="COAP_BRIDGE_", extra="ignore")

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    redis_url: str | None = None
    """``None`` keeps devices in memory (one process only)."""
    redis_prefix: str = "cb"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    """With ``"5"`` metadata travels as user properties (SPEC §8); 3.1.1 has none."""
    mqtt_publish_timeout: float = Field(default=5.0, gt=0)
    api_key: str | None = None
    """Bearer key of the management API; ``None`` switches the management API off (503)."""
    proxy_token: str | None = None
    """Shared secret the proxy sends; ``None`` switches ``/ingest`` off (503)."""
    topic_template: str = DEFAULT_TOPIC_TEMPLATE
    max_payload: int = Field(default=65536, ge=0)

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        parse_mqtt_url(value)
        return value

    @field_validator("topic_template")
    @classmethod
    def _check_topic_template(cls, value: str) -> str:
        # Fail at start-up, not on the first message, when the template is unusable.
        try:
            validate_topic(render_topic(value, iccid="8988280666000000000"))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"topic_template {value!r} does not render a valid topic: {exc}"
            ) from exc
        return value

    @property
    def mqtt_endpoint(self) -> MqttEndpoint:
        return parse_mqtt_url(self.mqtt_url)
