"""The console's session and its same-origin rule (docs/OPERATIONS.md, "Console").

A browser cannot send ``Authorization: Bearer`` on a navigation, so ``POST /console/login``
takes the management key once and sets a cookie holding a token derived from it:
``<issued>.<HMAC-SHA256(key, "console-session:<issued>")>`` (hex). Any API process, of any
worker or replica, verifies it with the key it already has: no shared session state. A changed
key invalidates every token at once; a token is refused :data:`SESSION_LIFETIME` seconds after
it was issued. The key itself never reaches the cookie.

Cross-site request forgery: the cookie is ``SameSite=Strict`` (RFC 6265bis §5.4.7: never sent
on a request another site starts), and every state-changing console request must also carry an
``Origin`` header naming this host (RFC 6454 §7; browsers send it on every POST), else 403.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit

from starlette.requests import Request

COOKIE = "coap_bridge_console"
SESSION_LIFETIME = 12 * 3600
"""Seconds a console login lasts; then the key is asked for again."""
CLOCK_SKEW = 60
"""A token issued up to this far in our future is accepted: another replica's clock."""
_PURPOSE = b"console-session:"


def session_token(api_key: str, issued: int | None = None) -> str:
    """A token for a login at ``issued`` (unix seconds; now by default)."""
    at = int(time.time()) if issued is None else issued
    mac = hmac.new(api_key.encode(), _PURPOSE + str(at).encode(), hashlib.sha256).hexdigest()
    return f"{at}.{mac}"


def valid_session(api_key: str | None, token: str | None, now: float | None = None) -> bool:
    """Whether ``token`` came from :func:`session_token` with this key and is still fresh."""
    if api_key is None or not token:
        return False
    issued_text, dot, mac = token.partition(".")
    if not dot or not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued = int(issued_text)
    current = time.time() if now is None else now
    if issued > current + CLOCK_SKEW or current - issued > SESSION_LIFETIME:
        return False
    expected = session_token(api_key, issued)
    return hmac.compare_digest(expected.encode(), f"{issued_text}.{mac}".encode())


def same_origin_refusal(request: Request) -> str | None:
    """Why a state-changing request is refused as possibly cross-site, or None.

    The ``Origin`` header's host and port must be the ``Host`` the request was sent to. The
    scheme is not compared: behind a TLS-terminating reverse proxy the API sees http while the
    browser says https; a page of another site never has this host."""
    origin = request.headers.get("origin")
    if origin is None:
        return "the request carries no Origin header (a browser sends one on every form post)"
    host = request.headers.get("host", "")
    parts = urlsplit(origin)
    if origin == "null" or not parts.netloc or parts.netloc.lower() != host.lower():
        return "the request comes from another origin than this console"
    return None
