"""Proxy settings: flags, ``COAP_BRIDGE_*`` environment variables, defaults (in that order)."""

from __future__ import annotations

import ssl
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from policies.profiles import DEFAULT_PROFILES, profile_names

# Values of ``coaps_port`` (flag or environment) that switch the DTLS listener off.
_OFF = frozenset({"", "off", "none", "false", "no", "disabled"})


class ProxySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COAP_BRIDGE_", extra="ignore")

    coap_host: str = Field("0.0.0.0", description="Address the CoAP (UDP) listener binds to")
    coap_port: int = Field(5683, ge=0, le=65535, description="CoAP UDP port")
    upstream: str = Field("http://127.0.0.1:8080", description="Base URL of the HTTP backend")
    upstream_ca: str | None = Field(
        None,
        description="PEM bundle of the CAs an https upstream's certificate must chain to "
        "(unset: the system's trust store, or the bundle SSL_CERT_FILE names)",
    )
    profiles: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_PROFILES),
        description="Profiles whose routes are served (docs/PROFILES.md), by code name or flag "
        "value; a comma list in the environment",
    )
    policy: str | None = Field(
        None, description="Route policy file (TOML), replacing the profiles' route tables"
    )
    proxy_token: str | None = Field(None, description="Secret presented to the backend")
    redis_url: str | None = Field(
        None, description="Shared dedup across replicas (unset: this process's memory only)"
    )
    redis_prefix: str = Field("cb", description="Prefix of every Redis key")
    dedup_lease: float = Field(
        10.0, gt=0, description="Seconds a claim blocks other replicas if its owner dies"
    )
    upstream_timeout: float = Field(5.0, gt=0, description="Seconds before 5.04")
    ack_window: float = Field(
        1.0, gt=0, description="Seconds before an empty ACK and a separate response"
    )
    ack_timeout: float = Field(
        2.0,
        gt=0,
        description="RFC 7252 §4.8 ACK_TIMEOUT: first retransmission of a separate response or "
        "CON notification after 1-1.5 times this, doubling, 4 times",
    )
    max_payload: int = Field(65536, gt=0, description="Largest request payload, else 4.13")
    dedup_max_entries: int = Field(1_000_000, gt=0, description="Cap on remembered exchanges")
    upstream_connections: int = Field(100, gt=0, description="HTTP connection pool size")
    max_batch: int = Field(256, gt=0, le=1024, description="Most requests in one batch call")
    batch_concurrency: int = Field(
        1, gt=0, description="Batch calls in flight per target before requests wait and group"
    )
    coaps_host: str | None = Field(
        None, description="Address the CoAP-over-DTLS listener binds to (unset: coap_host)"
    )
    coaps_port: int | None = Field(
        5684,
        ge=0,
        le=65535,
        description="CoAP over DTLS (coaps://) UDP port; 'off' disables DTLS. It runs when a "
        "PSK source exists: redis_url, or the in-process store of 'coap-bridge up'",
    )
    dtls_max_sessions: int = Field(
        10_000, gt=0, description="Cap on DTLS peers (handshakes + sessions) per process"
    )
    dtls_max_handshakes: int = Field(
        1_000, gt=0, description="Cap on DTLS handshakes in progress (within dtls_max_sessions)"
    )
    dtls_idle_timeout: float = Field(
        300.0, gt=0, description="Seconds of silence before a DTLS session is evicted"
    )
    dtls_handshake_timeout: float = Field(
        30.0, gt=0, description="Seconds a started DTLS handshake may take before it is dropped"
    )
    dtls_require_extended_master_secret: bool = Field(
        False,
        description="Refuse DTLS clients without the extended_master_secret and "
        "renegotiation_info extensions (tinydtls' default; many device stacks send neither)",
    )
    udp_receive_buffer: int = Field(
        4 * 1024 * 1024,
        ge=0,
        le=1 << 30,
        description="Bytes of receive buffer asked for each UDP socket (CoAP and DTLS; "
        "SO_RCVBUF), so a burst of datagrams is not dropped by the kernel before the proxy "
        "reads it; capped by the kernel at net.core.rmem_max; 0 keeps the kernel's default",
    )
    dtls_connection_id: bool = Field(
        True,
        description="Answer clients that offer a DTLS Connection ID (RFC 9146): their session "
        "survives a new address and, with redis_url, another replica; on or off",
    )
    require_dtls: bool = Field(
        False,
        description="Production mode: plain CoAP serves only the routes marked plain (the "
        "default profile: /bootstrap), anything else is 4.01",
    )
    block_size: int = Field(
        1024,
        description="Largest payload in one CoAP response: larger ones go out block-wise "
        "(RFC 7959 Block2); a power of two from 16 to 1024",
    )

    max_observers_per_device: int = Field(
        4, gt=0, description="Most Observe relations (RFC 7641) one device may hold here"
    )
    max_observers: int = Field(
        100_000, gt=0, description="Most Observe relations in this process; beyond: no Observe"
    )
    observe_heartbeat: float = Field(
        5.0,
        gt=0,
        description="Seconds between refreshes of this replica's Observe relation records in "
        "Redis; records of a replica silent for three of them are dropped",
    )
    log_interval: float = Field(
        10.0,
        gt=0,
        description="Seconds between the request log's summary lines at info level "
        "(docs/OPERATIONS.md, Logs)",
    )

    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="HTTP port of /metrics (Prometheus), /healthz and /readyz "
        "(docs/OPERATIONS.md); unset or 'off': no listener. With --workers N, worker i "
        "listens on this port + i",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics and probe listener binds to (0.0.0.0 for a "
        "Prometheus server or kubelet on another host)",
    )

    @field_validator("upstream_ca")
    @classmethod
    def _upstream_ca(cls, value: str | None) -> str | None:
        # Read at start-up: a wrong path is an error naming the setting, not 5.02 on every
        # request. The context itself is made by proxy/http1.py (upstream_tls).
        if value is not None:
            try:
                ssl.create_default_context(cafile=value)
            except ssl.SSLError as exc:
                raise ValueError(f"upstream_ca: {value!r} is not a PEM CA bundle: {exc}") from None
            except OSError as exc:
                raise ValueError(f"upstream_ca: cannot read {value!r}: {exc.strerror}") from None
        return value

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value < 16 or value > 1024 or value & (value - 1):
            raise ValueError("block_size must be a power of two from 16 to 1024")
        return value

    @field_validator("profiles", mode="before")
    @classmethod
    def _profiles(cls, value: object) -> list[str]:
        return profile_names(value)

    @field_validator("coaps_port", "metrics_port", mode="before")
    @classmethod
    def _coaps_off(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
            return None
        return value
