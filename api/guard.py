"""Who may call, and how large a body may be, decided from the headers alone (issue 12).

Outermost ASGI middleware. Before anything reads a body, each request is checked against the
rule for its path (:data:`RULES`): management paths need the API key, proxy-facing paths the
proxy's token, and every path has a body cap. A refusal — 401/403/503 for the caller, 413 for a
body over the cap — is answered at once in the project's error shape, without reading the body
(uvicorn drops what the client still sends). A body with a declared length within the cap goes
through untouched: the server delivers no more than was declared (RFC 9112 §6.3). A chunked
body is read here up to the cap and handed on (413 as soon as it passes the cap).

Before this, FastAPI read and parsed a whole body of any size before the routes' auth
dependencies ran: an unauthenticated 50 MB JSON ``POST /devices`` held the event loop for
seconds. The dependencies stay (they document the schemes in /docs and hold when the app runs
without this middleware); the checks are the same functions (api/deps.py).

The proxy's batch call costs one dict lookup and one pass over the headers here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from fastapi.security.utils import get_authorization_scheme_param
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import api_key_refusal, proxy_refusal
from api.errors import ApiError, BodyTooLarge, render
from api.routes.ingest import batch_body_limit
from api.settings import ApiSettings
from policies.forwarding import TOKEN_HEADER

MANAGEMENT_BODY_LIMIT = 8 * 1024
"""Management bodies are a few fields (a device, a PSK, a position): 8 KiB is ample."""
NO_BODY_LIMIT = 8 * 1024
"""Paths that take no body still get one read to answer their own error (GET /location with
a payload is a 400); nothing larger."""


class Caller(Enum):
    ANYONE = "anyone"
    MANAGEMENT = "management"  # Authorization: Bearer <api key>
    PROXY = "proxy"  # X-Bridge-Token (docs/CONTRACT.md §11)


@dataclass(frozen=True, slots=True)
class Rule:
    caller: Caller
    body_limit: Callable[[ApiSettings], int]


def _management(settings: ApiSettings) -> int:
    return MANAGEMENT_BODY_LIMIT


def _no_body(settings: ApiSettings) -> int:
    return NO_BODY_LIMIT


def _one_payload(settings: ApiSettings) -> int:
    return settings.max_payload


def _firmware(settings: ApiSettings) -> int:
    return settings.max_firmware_size


TEMPLATE_BODY_LIMIT = 64 * 1024
"""A template of 256 fields (policies/templates.py's limit) with names and options is some
tens of KiB; a test payload is at most a few KiB of hex."""


def _template(settings: ApiSettings) -> int:
    return TEMPLATE_BODY_LIMIT


def _console(settings: ApiSettings) -> int:
    # A payload as hex (2 characters a byte), percent-encoding at most triples it, plus the
    # form's other fields.
    return settings.max_payload * 6 + 4096


def _command(settings: ApiSettings) -> int:
    # One payload as JSON text or base64 (4/3 of its bytes), and a few fields around it.
    return settings.max_payload * 2 + 1024


# Path (without a trailing slash) → rule; "/devices" covers everything under it. Tested row
# by row against the routes' own auth dependencies (tests/api/test_guard.py).
RULES: dict[str, Rule] = {
    "/ingest/batch": Rule(Caller.PROXY, batch_body_limit),
    "/ingest": Rule(Caller.PROXY, _one_payload),
    "/bootstrap": Rule(Caller.PROXY, _no_body),
    "/location": Rule(Caller.PROXY, _no_body),
    "/observe/events": Rule(Caller.PROXY, _no_body),
    "/commands": Rule(Caller.PROXY, _no_body),  # and everything under it
    "/devices": Rule(Caller.MANAGEMENT, _management),
    "/devices/*/commands": Rule(Caller.MANAGEMENT, _command),
    # Firmware (docs/API.md): the listing and the uploads/deletes are management; a GET of one
    # version is the device's download, forwarded by the proxy.
    "/firmware": Rule(Caller.MANAGEMENT, _no_body),
    "/firmware/*": Rule(Caller.MANAGEMENT, _firmware),
    "GET /firmware/*": Rule(Caller.PROXY, _no_body),
    # The signed-session profile (docs/PROFILES.md): its registry is management; an auth
    # message and the telemetry of a session come through the proxy.
    "/products": Rule(Caller.MANAGEMENT, _management),  # and everything under it
    "/auth/*": Rule(Caller.PROXY, _no_body),
    "/topic/sys/*": Rule(Caller.PROXY, _one_payload),
    # The managed-PSK profile: telemetry through the proxy; the credentials resource at the
    # platform's own path is management.
    "/telemetry": Rule(Caller.PROXY, _one_payload),
    "/api/v4/manage/devices": Rule(Caller.MANAGEMENT, _management),  # and everything under it
    # Prometheus (api/metrics.py): open like /healthz; scrapers usually carry no bearer, and
    # it names no device.
    "/metrics": Rule(Caller.ANYONE, _no_body),
    # Payload templates (issue 17): management only.
    "/templates": Rule(Caller.MANAGEMENT, _template),  # and everything under it
    # The web console (api/console/): its session cookie is checked by its routes (a browser
    # sends no bearer header); the cap fits its largest form, a test message as hex.
    "/console": Rule(Caller.ANYONE, _console),  # and everything under it
}
_PREFIX_RULES = (
    ("/api/v4/manage/devices/", "/api/v4/manage/devices"),
    ("/products/", "/products"),
    ("/auth/", "/auth/*"),
    ("/topic/sys/", "/topic/sys/*"),
    ("/templates/", "/templates"),
    ("/console/", "/console"),
)
MANAGEMENT_PREFIX = "/devices/"
COMMANDS_PREFIX = "/commands/"
FIRMWARE_PREFIX = "/firmware/"
_READS = frozenset({"GET", "HEAD"})
DEFAULT_RULE = Rule(Caller.ANYONE, _no_body)


def rule_for(path: str, method: str = "GET") -> Rule:
    """The rule for a request. The method matters under ``/firmware/`` only, where one path
    is both the device's download (GET, by the proxy) and an upload or delete (management)."""
    if path.startswith(FIRMWARE_PREFIX) and path[len(FIRMWARE_PREFIX) :].strip("/"):
        return RULES["GET /firmware/*" if method in _READS else "/firmware/*"]
    rule = RULES.get(path)
    if rule is not None:
        return rule
    if path.startswith(MANAGEMENT_PREFIX):
        if path.rstrip("/").endswith("/commands"):
            return RULES["/devices/*/commands"]
        return RULES["/devices"]
    if path.startswith(COMMANDS_PREFIX):
        return RULES["/commands"]
    for prefix, name in _PREFIX_RULES:
        if path.startswith(prefix):
            return RULES[name]
    return RULES.get(path.rstrip("/"), DEFAULT_RULE)


_TOKEN = TOKEN_HEADER.lower().encode("latin-1")


class Guard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        rule = rule_for(path, scope["method"])
        authorization: bytes | None = None
        token: bytes | None = None
        length: bytes | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == _TOKEN:
                token = value
            elif name == b"content-length":
                length = value
            elif name == b"authorization":
                authorization = value
            elif name == b"transfer-encoding":
                chunked = True  # it wins over any Content-Length (RFC 9112 §6.3)
        settings: ApiSettings = scope["app"].state.settings
        refusal: ApiError | None = None
        if rule.caller is Caller.PROXY:
            refusal = proxy_refusal(settings, token.decode("latin-1") if token else None)
        elif rule.caller is Caller.MANAGEMENT:
            scheme, key = get_authorization_scheme_param(
                authorization.decode("latin-1") if authorization else None
            )
            refusal = api_key_refusal(settings, scheme, key)
        if refusal is None:
            limit = rule.body_limit(settings)
            if chunked:
                body = await _read_up_to(receive, limit)
                if body is None:
                    return  # the client went away
                if len(body) > limit:
                    refusal = BodyTooLarge(f"body is more than {limit} bytes")
                else:
                    receive = _replay(body, receive)
            elif length is not None and _declared_over(length, limit):
                refusal = BodyTooLarge(f"body is {length.decode('latin-1')} bytes, at most {limit}")
        if refusal is not None:
            await render(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _declared_over(length: bytes, limit: int) -> bool:
    # The server has checked the syntax; the length test spares int() a 5000-digit value.
    return length.isdigit() and (len(length) > 18 or int(length) > limit)


async def _read_up_to(receive: Receive, limit: int) -> bytes | None:
    """The body, or its first bytes past ``limit`` (then the rest stays unread); None when
    the client disconnected."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit or not message.get("more_body", False):
            return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the body read here once, then what the server says next (the
    disconnect a streaming response waits for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
