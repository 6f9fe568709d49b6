"""The internal proxy → backend contract (SPEC §10).

The proxy tells the backend who sent a request with a ``Forwarded`` header (RFC 7239) and, for
DTLS, the authenticated PSK identity in :data:`IDENTITY_HEADER`. The backend believes either
only when :data:`TOKEN_HEADER` carries the shared proxy token, so an HTTP client calling the API
directly cannot claim a device identity.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

TOKEN_HEADER = "X-Bridge-Token"
IDENTITY_HEADER = "X-Bridge-Identity"
IDEMPOTENCY_HEADER = "Idempotency-Key"
FORWARDED_HEADER = "Forwarded"

_FOR_RE = re.compile(r'(?:^|[;,\s])for="?(\[[^\]]+\]|[^";,]+)"?', re.IGNORECASE)
_PROTO_RE = re.compile(r'(?:^|[;,\s])proto="?([A-Za-z][A-Za-z0-9+.-]*)"?', re.IGNORECASE)


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


def parse_forwarded(value: str) -> Origin | None:
    """Parse the first ``for=``/``proto=`` pair; ``None`` when there is no usable address."""
    first = value.split(",", 1)[0]
    match = _FOR_RE.search(first)
    if match is None:
        return None
    node = match.group(1)
    port = 0
    if node.startswith("["):
        host, _, rest = node[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif node.count(":") == 1:
        host, _, port_text = node.partition(":")
        if port_text.isdigit():
            port = int(port_text)
    else:
        host = node
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        return None
    proto_match = _PROTO_RE.search(first)
    proto = proto_match.group(1).lower() if proto_match else "coap"
    return Origin(ip=ip, port=port, proto=proto)


def idempotency_key(ip: str, port: int, mid: int, token: bytes) -> str:
    """A key that is equal for every retransmission of one CoAP exchange.

    The (peer, MID) pair is what RFC 7252 §4.5 deduplicates on; the token is added because a
    MID is reused once EXCHANGE_LIFETIME has passed, while a new request carries a new token.
    """
    return f"coap:{ip}:{port}:{mid}:{token.hex()}"
