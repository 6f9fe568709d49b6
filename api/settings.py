"""Settings of the HTTP backend, read from ``COAP_BRIDGE_*`` environment variables.

Never instantiated at import time: the app factory takes an :class:`ApiSettings` and routes get
it through :func:`api.deps.get_settings`, which tests override.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from policies.profiles import DEFAULT_PROFILES, profile_names
from policies.topics import DEFAULT_TOPIC_TEMPLATE, render_topic, validate_topic

_MQTT_SCHEMES = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}
_MQTT_TLS_SCHEMES = frozenset({"mqtts", "ssl"})
DEFAULT_COMMAND_TOPIC = "devices/{iccid}/commands"
DEFAULT_STATUS_TOPIC = "devices/{device}/status"
MAX_COMMAND_TTL = 2_592_000
"""Longest time a command may wait for its device: 30 days."""
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
DEFAULT_COAPS_PORT = 5684
# Values of ``coaps_port`` that mean "no DTLS listener": the proxy's own list
# (proxy/settings.py; api/ does not import proxy/).
_COAPS_OFF = frozenset({"", "off", "none", "false", "no", "disabled"})


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where the publisher connects, split out of ``mqtt_url``."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    """``mqtts://`` (or ``ssl://``): TLS, the broker's certificate and host name verified."""


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """``mqtt[s]://[user[:pass]@]host[:port]`` → :class:`MqttEndpoint`; ``ValueError``
    otherwise. ``mqtts`` defaults to port 8883, the port IANA registered for MQTT over TLS."""
    parts = urlsplit(url)
    if parts.scheme not in _MQTT_SCHEMES:
        raise ValueError(f"mqtt_url scheme must be one of {sorted(_MQTT_SCHEMES)}, not {url!r}")
    if not parts.hostname:
        raise ValueError(f"mqtt_url has no host: {url!r}")
    try:
        port = parts.port or _MQTT_SCHEMES[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"mqtt_url has a malformed port: {exc}") from None
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return MqttEndpoint(
        host=parts.hostname,
        port=port,
        username=username,
        password=password,
        tls=parts.scheme in _MQTT_TLS_SCHEMES,
    )


def _readable(setting: str, path: str) -> str:
    """``path`` if it names a file this process can read; ValueError naming ``setting``."""
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path!r}: {exc.strerror or exc}") from None
    return path


def mqtt_tls_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """The TLS context of an ``mqtts://`` link: the broker's chain and host name verified
    against ``ca`` (a PEM bundle) or, without one, the system's trust store
    (:func:`ssl.create_default_context`; ``SSL_CERT_FILE`` names another bundle); ``cert``
    (and ``key``, unless the same PEM file holds it) presented as the client certificate.
    ValueError naming the setting when a file is not what it should be."""
    context = ssl.create_default_context()
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"mqtt_ca: {ca!r} is not a PEM CA bundle: {exc}") from None
    if cert is not None:
        try:
            # A password callback that gives none: an encrypted key fails here, instead of
            # OpenSSL asking for its passphrase on the terminal.
            context.load_cert_chain(cert, key, password=lambda: b"")
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"mqtt_cert/mqtt_key: cannot load the client certificate {cert!r} with the "
                f"key {key or cert!r} (PEM, unencrypted, matching): {exc}"
            ) from None
    return context


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
    """With ``"5"`` metadata travels as user properties (docs/CONTRACT.md §9); 3.1.1 has none."""
    mqtt_metadata: Literal["properties", "envelope"] = "properties"
    """How a device message's metadata reaches subscribers: ``"properties"``, MQTT 5 user
    properties only (an MQTT 3.1.1 broker drops them); ``"envelope"``, the payload is wrapped
    in a JSON object that carries them (policies/envelope.py), and the properties are still
    sent. Status and command messages are never wrapped."""
    mqtt_publish_timeout: float = Field(default=5.0, gt=0)
    mqtt_ca: str | None = None
    """PEM bundle of the CAs an ``mqtts://`` broker's certificate must chain to; unset: the
    system's trust store (what a public broker's certificate chains to)."""
    mqtt_cert: str | None = None
    """PEM client certificate presented to an ``mqtts://`` broker (AWS IoT Core requires one;
    Mosquitto's ``require_certificate``), with its key in ``mqtt_key`` or in the same file."""
    mqtt_key: str | None = Field(default=None, validate_default=True)
    """PEM private key (unencrypted) of ``mqtt_cert``."""
    mqtt_password: str | None = None
    """Password sent in CONNECT; overrides the one in ``mqtt_url`` (keeps it out of the URL
    and the process list: set it as ``COAP_BRIDGE_MQTT_PASSWORD``)."""
    mqtt_username: str | None = Field(default=None, validate_default=True)
    """User name sent in CONNECT; overrides the one in ``mqtt_url``."""
    mqtt_client_id: str | None = None
    """The MQTT client identifier; unset: ``coap-bridge-<random>``, a new one per process. A
    broker allows one connection per id (a second one takes it over, MQTT 5 §3.1.4), so give
    every API process (uvicorn worker, replica) its own. A fixed id keeps its MQTT 5 session
    when the process stops (commands sent meanwhile wait for it)."""
    api_key: str | None = None
    """Bearer key of the management API; ``None`` switches the management API off (503)."""
    proxy_token: str | None = None
    """Shared secret the proxy sends; ``None`` switches ``/ingest`` off (503)."""
    topic_template: str = DEFAULT_TOPIC_TEMPLATE
    max_payload: int = Field(default=65536, ge=0)
    max_batch: int = Field(default=256, gt=0, le=1024)
    """The proxy's setting of the same name (same env var): most device messages in one
    ``/ingest/batch`` call. With ``max_payload`` it bounds a batch body (api/guard.py)."""
    coaps_url: str | None = None
    """The coaps:// endpoint handed out by ``/bootstrap`` and the credentials API. Unset:
    ``coaps://<coaps_host or coap_host>:<coaps_port or 5684>``, with this machine's FQDN for a
    wildcard host, or nothing (an empty field) when ``coaps_port`` is off. Set it whenever
    devices reach the proxy under a public name, or DTLS is served somewhere else."""
    coap_host: str | None = None
    coaps_host: str | None = None
    coaps_port: int | str | None = None
    """These three are the proxy's settings of the same names (same flags under ``up``, same
    env vars; under ``up`` the port is the one the proxy actually bound, or off when it serves
    no DTLS); the API only uses them to derive ``coaps_url``."""
    trusted_proxy_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """CIDRs of reverse proxies whose ``X-Forwarded-For`` HTTPS onboarding believes; comma
    separated or a JSON list in the environment. Empty: the TCP peer is the device."""
    bootstrap_rate_limit: int = Field(default=20, ge=1)
    """Bootstrap + onboarding calls one device may make per window before 429 (4.29). 20 lets a
    device fetch its ~60-byte onboarding answer in 8-byte Range pieces within one window."""
    bootstrap_rate_window: float = Field(default=60.0, gt=0)
    """Length of the rate-limit window in seconds."""
    command_topic: str = DEFAULT_COMMAND_TOPIC
    """Where MQTT applications publish commands for a device (``{iccid}``: the device; the
    API subscribes with ``+`` in its place). Delivery status goes to
    ``<this topic>/<command id>/status``, which that filter does not match (docs/API.md)."""
    command_share_group: str | None = "coap-bridge"
    """The shared-subscription group (``$share/<group>/…``, MQTT 5 §4.8.2; Mosquitto also
    honours it over 3.1.1) through which exactly one API replica takes each command, so that
    replicas on one broker do not each queue it. Empty: a plain subscription (a broker
    without shared subscriptions, such as the embedded one of ``coap-bridge up``; then only
    one replica may run)."""
    max_commands_per_device: int = Field(default=100, ge=1, le=10_000)
    """Commands a device may have queued or sent at once; beyond: 409."""
    command_ttl: int = Field(default=86_400, ge=1, le=MAX_COMMAND_TTL)
    """Seconds a command waits for its device when the submitter gives no ``ttl``."""
    feed_keepalive: float = Field(default=15.0, gt=0)
    """Seconds between the comment lines that keep an idle change feed open (docs/API.md)."""
    log_interval: float = Field(default=10.0, gt=0)
    """Seconds between the request log's summary lines at info level (api/request_log.py,
    docs/OPERATIONS.md "Logs")."""
    max_firmware_size: int = Field(default=16 * 1024 * 1024, ge=1)
    """Largest firmware image ``PUT /firmware/{version}`` accepts, in bytes; a larger body is
    refused with 413 before it is read (api/guard.py)."""
    online_window: float = Field(default=3600.0, gt=0, le=30 * 86_400)
    """Seconds a managed-PSK device counts as online after a message (docs/PROFILES.md): its
    platform has no session to end, so silence this long is what "offline" means. One hour
    covers devices that report every few minutes to hourly without flapping."""
    status_topic: str = DEFAULT_STATUS_TOPIC
    """Where a device's online/offline transitions are published, retained (api/presence.py,
    docs/API.md "Presence"); ``{device}`` (the device id) is one whole level."""
    profiles: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_PROFILES))
    """The profiles whose resources are served (api/profiles.py, docs/PROFILES.md), by code
    name or ``--profile`` flag value; a comma list in the environment. The proxy's setting of
    the same name (same env var)."""

    @field_validator("profiles", mode="before")
    @classmethod
    def _check_profiles(cls, value: object) -> list[str]:
        return profile_names(value)

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        parse_mqtt_url(value)
        return value

    # The TLS files are read at start-up, so a missing or wrong one is an error naming its
    # setting before anything runs, not a broker that stays unreachable. Each check sits on
    # the field whose value it would show: pydantic repeats a failing field's input in its
    # message, which must never be a password.
    @field_validator("mqtt_ca", "mqtt_cert")
    @classmethod
    def _check_tls_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        setting = str(info.field_name)
        url = info.data.get("mqtt_url")
        if url is not None and not parse_mqtt_url(url).tls:
            raise ValueError(f"{setting} is set but mqtt_url {url!r} is not mqtts://")
        _readable(setting, value)
        if setting == "mqtt_ca":
            mqtt_tls_context(ca=value)
        return value

    @field_validator("mqtt_key")
    @classmethod
    def _check_client_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        cert = info.data.get("mqtt_cert")
        if value is not None:
            if cert is None and "mqtt_cert" not in info.data:
                return value  # mqtt_cert itself failed: that error says it
            if cert is None:
                raise ValueError("mqtt_key is set without mqtt_cert (the certificate it signs)")
            _readable("mqtt_key", value)
        if cert is not None:
            mqtt_tls_context(cert=cert, key=value)
        return value

    @field_validator("mqtt_username")
    @classmethod
    def _check_credentials(cls, value: str | None, info: ValidationInfo) -> str | None:
        url = info.data.get("mqtt_url")
        endpoint = parse_mqtt_url(url) if url is not None else None
        username = value if value is not None else endpoint and endpoint.username
        password = info.data.get("mqtt_password")
        if password is None and endpoint is not None:
            password = endpoint.password
        if password is not None and username is None and info.data.get("mqtt_protocol") != "5":
            # MQTT 3.1.1 §3.1.2.9: no password without a user name (MQTT 5 allows one).
            raise ValueError("mqtt_password is set without mqtt_username, which MQTT 3.1.1 needs")
        return value

    @field_validator("mqtt_client_id")
    @classmethod
    def _check_client_id(cls, value: str | None) -> str | None:
        # MQTT 5 §3.1.3.1: a UTF-8 string; an empty one asks the broker to assign an id, which
        # would end the session we keep across reconnects.
        if value is not None and (not value or "\0" in value or len(value.encode()) > 65535):
            raise ValueError("mqtt_client_id must be 1 to 65535 bytes of UTF-8 without NUL")
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

    @field_validator("status_topic")
    @classmethod
    def _check_status_topic(cls, value: str) -> str:
        # One whole level: a device id is one level, and a subscriber's '+' takes its place.
        if value.split("/").count("{device}") != 1 or value.count("{device}") != 1:
            raise ValueError(f"status_topic {value!r} must have {{device}} as one whole level")
        try:
            validate_topic(value.replace("{device}", "device_1"))
        except ValueError as exc:
            raise ValueError(f"status_topic {value!r} is not a valid topic: {exc}") from exc
        return value

    @field_validator("command_share_group")
    @classmethod
    def _check_share_group(cls, value: str | None) -> str | None:
        if not value:
            return None  # empty: a plain subscription
        if any(c in value for c in "/+#"):
            raise ValueError(f"command_share_group {value!r} must not contain / + #")
        return value

    @field_validator("command_topic")
    @classmethod
    def _check_command_topic(cls, value: str) -> str:
        # {iccid} must be one whole level: the subscription puts the single-level wildcard
        # there, and a device's commands are told apart by that level (MQTT 5 §4.7.1.3).
        levels = value.split("/")
        if levels.count("{iccid}") != 1 or "{iccid}" in value.replace("{iccid}", "", 1):
            raise ValueError(f"command_topic {value!r} must have {{iccid}} as one whole level")
        try:
            validate_topic(render_topic(value, iccid="8988280666000000000"))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"command_topic {value!r} does not render a valid topic: {exc}"
            ) from exc
        return value

    @field_validator("coaps_url")
    @classmethod
    def _check_coaps_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme != "coaps" or not parts.hostname or "," in value:
                raise ValueError(f"coaps_url must look like coaps://host:5684, not {value!r}")
        return value

    @field_validator("trusted_proxy_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("trusted_proxy_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        # Fail at start-up on a typo rather than silently trusting nobody (or everybody).
        return [str(ipaddress.ip_network(item.strip(), strict=False)) for item in value]

    @property
    def command_filter(self) -> str:
        """The subscription of the command topic: ``{iccid}`` → ``+``."""
        return self.command_topic.replace("{iccid}", "+")

    def command_status_topic(self, iccid: str, command_id: str) -> str:
        return f"{render_topic(self.command_topic, iccid=iccid)}/{command_id}/status"

    @property
    def mqtt_endpoint(self) -> MqttEndpoint:
        """``mqtt_url``, with ``mqtt_username``/``mqtt_password`` in place of its own."""
        endpoint = parse_mqtt_url(self.mqtt_url)
        return MqttEndpoint(
            host=endpoint.host,
            port=endpoint.port,
            username=self.mqtt_username if self.mqtt_username is not None else endpoint.username,
            password=self.mqtt_password if self.mqtt_password is not None else endpoint.password,
            tls=endpoint.tls,
        )

    def mqtt_tls(self) -> ssl.SSLContext | None:
        """The TLS context of the broker link (``mqtts://``), or None for plain ``mqtt://``."""
        if not parse_mqtt_url(self.mqtt_url).tls:
            return None
        return mqtt_tls_context(self.mqtt_ca, self.mqtt_cert, self.mqtt_key)

    @cached_property
    def coaps_endpoint(self) -> str:
        """The coaps:// URL devices are told to use after bootstrapping (docs/CONTRACT.md §4,
        §7); empty when no DTLS is served and none is configured: the key is still the
        device's (HTTPS onboarding hands it out without any URL), but no endpoint is
        advertised that nobody serves (docs/API.md)."""
        if self.coaps_url is not None:
            return self.coaps_url
        port = "" if self.coaps_port is None else str(self.coaps_port).strip()
        if port.lower() in _COAPS_OFF and self.coaps_port is not None:
            return ""
        host = (self.coaps_host or self.coap_host or "").strip()
        if host in _WILDCARD_HOSTS:
            host = socket.getfqdn()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        if not port.isdigit() or int(port) == 0:
            port = str(DEFAULT_COAPS_PORT)  # unset or "any free port": the default
        return f"coaps://{host}:{port}"

    @property
    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(item) for item in self.trusted_proxy_networks]
