"""The internal proxy → backend contract (docs/CONTRACT.md §11).

The proxy tells the backend who sent a request with a ``Forwarded`` header (RFC 7239) and, for
DTLS, the authenticated PSK identity in :data:`IDENTITY_HEADER`. The backend believes either
only when :data:`TOKEN_HEADER` carries the shared proxy token, so an HTTP client calling the API
directly cannot claim a device identity.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

TOKEN_HEADER = "X-Bridge-Token"
IDENTITY_HEADER = "X-Bridge-Identity"
IDEMPOTENCY_HEADER = "Idempotency-Key"
FORWARDED_HEADER = "Forwarded"
# The proxy's upstream timeout in seconds, sent with every internal call: the backend bounds its
# own waits (the broker's PUBACK) by :func:`backend_budget` of it, so its 503 reaches the proxy
# before the proxy gives up with 5.04 (docs/ARCHITECTURE.md, "Timeouts are ordered").
TIMEOUT_HEADER = "X-Bridge-Timeout"
# Room left for the hop itself (the answer's way back, the proxy's loop) after the backend's wait.
_BUDGET_MARGIN = 1.0


def backend_budget(proxy_timeout: float) -> float:
    """Seconds the backend may spend waiting on its dependencies for a call the proxy gives up
    on after ``proxy_timeout``: one second less, but never less than half of it."""
    return max(proxy_timeout - _BUDGET_MARGIN, proxy_timeout / 2)


def parse_timeout(value: str | bytes | None) -> float | None:
    """A :data:`TIMEOUT_HEADER` value: positive seconds, or None (absent or not a number)."""
    if value is None or len(value) > 16:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds < 86400 else None


_PARAM_RE = re.compile(r'(?:^|;)\s*([A-Za-z]+)=("[^"]*"|[^;,]*)')
_ASCII_DIGITS = frozenset("0123456789")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def http_origin(url: str) -> str | None:
    """The origin of an absolute http(s) URL as ``scheme://host:port`` (RFC 6454 §4: scheme and
    host lower-cased, the default port written out), or None when ``url`` is not one.

    The proxy compares origins to decide who may see its internal headers: the token and the
    device identity go to the configured upstream and to origins the policy trusts, nowhere else.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port if port is not None else _DEFAULT_PORTS[scheme]}"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a CoAP request came from, as the proxy saw it."""

    ip: str
    port: int
    proto: str = "coap"


def format_forwarded(ip: str, port: int, proto: str = "coap") -> str:
    """``for="ip:port";proto=coap`` with IPv6 addresses in brackets (RFC 7239 §6)."""
    host = f"[{ip}]" if ":" in ip else ip
    return f'for="{host}:{port}";proto={proto}'


def _port(text: str) -> int | None:
    if not text or not set(text) <= _ASCII_DIGITS or len(text) > 5:
        return None
    port = int(text)
    return port if port <= 65535 else None


def _node(value: str) -> tuple[str, int] | None:
    """``ip``, ``ip:port``, ``[v6]`` or ``[v6]:port`` (RFC 7239 §6) → (ip, port or 0)."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
        if not rest:
            return host, 0
        port = _port(rest[1:]) if rest.startswith(":") else None
        return None if port is None else (host, port)
    if value.count(":") == 1:
        host, _, port_text = value.partition(":")
        port = _port(port_text)
        return None if port is None else (host, port)
    return value, 0


def canonical_ip(text: str) -> str | None:
    """The canonical text of an IPv4 or IPv6 address, or None: ``str(ipaddress.ip_address())``.

    IPv4 — what nearly every device message carries — takes a fast path through the C
    conversion (the single-message ``/ingest`` form parses one address per call, and the device
    store's lookups canonicalise theirs).
    IPv6 goes through ``ipaddress``, whose text form (e.g. of IPv4-mapped addresses) is the
    one the device store uses.
    """
    if ":" not in text:
        if text.count(".") != 3:
            return None
        try:
            canonical = socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text))
        except OSError:
            return None
        # inet_pton accepts leading zeros ("010.0.0.1"); ipaddress refuses them as ambiguous.
        return canonical if canonical == text else None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_forwarded(value: str) -> Origin | None:
    """Parse the first element's ``for=``/``proto=``; ``None`` when there is no usable address."""
    first = value.split(",", 1)[0]
    params = {name.lower(): raw.strip('"') for name, raw in _PARAM_RE.findall(first.strip())}
    node = _node(params.get("for", ""))
    if node is None:
        return None
    host, port = node
    ip = canonical_ip(host)
    if ip is None:
        return None
    proto = params.get("proto", "coap").lower() or "coap"
    return Origin(ip=ip, port=port, proto=proto)


def idempotency_key(ip: str, port: int, mid: int, token: bytes, identity: str | None = None) -> str:
    """A key that is equal for every retransmission of one CoAP exchange.

    The (peer, MID) pair is what RFC 7252 §4.5 deduplicates on — over DTLS the peer is its PSK
    identity; the token is added because a MID is reused once EXCHANGE_LIFETIME has passed,
    while a new request carries a new token.
    """
    if identity is not None:
        return f"coaps:{identity}:{mid}:{token.hex()}"
    return f"coap:{ip}:{port}:{mid}:{token.hex()}"
