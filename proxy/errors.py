"""The proxy's own errors; each knows the CoAP code it is answered with."""

from __future__ import annotations

from proxy.coap import codes


class ProxyError(Exception):
    coap_code: int = codes.INTERNAL_SERVER_ERROR


class UpstreamUnreachable(ProxyError):
    """No connection to the backend could be made (docs/CONTRACT.md §10: 5.02)."""

    coap_code = codes.BAD_GATEWAY


class UpstreamTimeout(ProxyError):
    """The backend did not answer within the configured time (RFC 7252 §10.1: 5.04)."""

    coap_code = codes.GATEWAY_TIMEOUT
