"""The API's request log (docs/OPERATIONS.md, "Logs"), an outermost ASGI middleware.

At debug level one line per HTTP request: method, path, status, duration, the caller's
address (``peer``) and, for a call the proxy makes for a device, that device (its PSK
identity, else the address in ``Forwarded``). At info level one summary line every
``interval`` seconds: requests by status and by route (the route's path template, so
``/devices/{iccid}`` is one route whatever iccid). A request that fails with an exception
gets an error line naming the device (never a key or token: only the identity and address
headers are read). The level is looked at once, when the app is built. The summary's text and
fields are the proxy's too (policies/request_summary.py).

uvicorn's own access log stays off (launcher/cli.py): at full load it would be a line per
batch call, and it knows neither the route nor the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policies.forwarding import FORWARDED_HEADER, IDENTITY_HEADER, parse_forwarded
from policies.request_summary import OTHER, summarize, summary_line

log = logging.getLogger("api.requests")

DEFAULT_INTERVAL = 10.0
# Distinct (path, status) pairs kept between two summaries; beyond, they count as OTHER.
MAX_KEYS = 10_000
_IDENTITY = IDENTITY_HEADER.lower().encode()
_FORWARDED = FORWARDED_HEADER.lower().encode()


def device_of(scope: Scope) -> str | None:
    """The device a proxied call speaks for: X-Bridge-Identity (DTLS), else the address in
    Forwarded (docs/CONTRACT.md §11); None for other callers."""
    forwarded = None
    for name, value in scope.get("headers", ()):
        if name == _IDENTITY and value:
            return str(value.decode("latin-1"))
        if name == _FORWARDED:
            forwarded = value.decode("latin-1")
    if forwarded is None:
        return None
    origin = parse_forwarded(forwarded)
    if origin is None:
        return None
    return f"[{origin.ip}]:{origin.port}" if ":" in origin.ip else f"{origin.ip}:{origin.port}"


def _flatten(routes: Any) -> Any:
    """Every route with a path pattern, looking inside included routers and mounts."""
    for route in routes:
        if hasattr(route, "path_regex") and hasattr(route, "path") and not hasattr(route, "routes"):
            yield route
            continue
        inner = getattr(route, "original_router", None) or route
        yield from _flatten(getattr(inner, "routes", ()) or ())


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class RequestLog:
    """``app.add_middleware(RequestLog, interval=...)``: added last, it wraps everything
    (the guard's refusals and the batch fast path included)."""

    def __init__(self, app: ASGIApp, interval: float = DEFAULT_INTERVAL) -> None:
        self.app = app
        self.interval = interval
        self.counts: dict[tuple[str, int], int] = {}
        self._since = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._routes: list[Any] = []  # the app's routes, to name a path in the summary
        self._named: set[str] = set()  # their paths (templates)
        self._counting = log.isEnabledFor(logging.INFO)
        self._tracing = log.isEnabledFor(logging.DEBUG)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, self._lifespan(scope, receive), send)
            return
        if kind != "http" or not self._counting:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status = 500
            log.error(
                "%s %s failed for device %s",
                scope["method"],
                scope["path"],
                device_of(scope) or "-",
                extra={"device": device_of(scope), "peer": _peer(scope), "code": 500},
            )
            raise
        finally:
            # The router names the route it picked; what it never reached (the batch fast
            # path, the guard's refusals) is named by its path in the summary.
            route = scope.get("route")
            self._count(getattr(route, "path", None) or scope["path"], status)
            if self._tracing:
                self._line(scope, status, time.perf_counter() - started)

    def _lifespan(self, scope: Scope, receive: Receive) -> Receive:
        """Start the summary loop with the app and stop it (writing what is left) with it."""

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup" and self._counting:
                self._routes = list(_flatten(getattr(scope.get("app"), "routes", ())))
                self._named = {str(route.path) for route in self._routes}
                self._task = asyncio.get_running_loop().create_task(
                    self._run(), name="api-request-log"
                )
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
            return message

        return wrapped

    def _count(self, path: str, status: int) -> None:
        counts = self.counts
        key = (path, status)
        if key in counts:
            counts[key] += 1
        elif len(counts) < MAX_KEYS:
            counts[key] = 1
        else:
            key = (OTHER, status)
            counts[key] = counts.get(key, 0) + 1

    def _line(self, scope: Scope, status: int, seconds: float) -> None:
        device = device_of(scope)
        log.debug(
            "http %s %s %d in %.1f ms%s",
            scope["method"],
            scope["path"],
            status,
            seconds * 1000,
            f" for device {device}" if device else "",
            extra={
                "peer": _peer(scope),
                "device": device,
                "method": scope["method"],
                "path": scope["path"],
                "code": status,
                "duration_ms": round(seconds * 1000, 3),
            },
        )

    def route_of(self, path: str) -> str:
        """The route template serving ``path`` (OTHER when none does)."""
        if path == OTHER or path in self._named:
            return path
        for route in self._routes:
            pattern = getattr(route, "path_regex", None)
            if pattern is not None and pattern.match(path):
                return str(route.path)
        return OTHER

    def summary(self) -> None:
        """Write what was counted since the last summary (nothing when nothing was)."""
        counts, self.counts = self.counts, {}
        now = time.monotonic()
        seconds, self._since = now - self._since, now
        if not counts:
            return
        summary = summarize(counts, self.route_of, str)
        line, fields = summary_line("http", "requests", summary, seconds)
        log.info("%s", line, extra=fields)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.summary()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._counting:
            self.summary()
