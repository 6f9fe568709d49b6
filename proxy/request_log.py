"""The proxy's request log (docs/OPERATIONS.md, "Logs").

At debug level one line per CoAP exchange the handler answers: peer, identity, method, path,
code, duration. At info level no line per message — at full load that would be tens of
thousands a second — but one summary every ``interval`` seconds: exchanges by response code
and by route (the policy's route path, so a template counts as one route whatever device it
names). At warning level and above nothing is wrapped at all.

The level is looked at once, when the proxy starts (:func:`wrap`): the handler the driver
calls is then either the forwarder itself, or a wrapper that only counts (info), or one that
counts and writes a line (debug). Counting is one tuple and one dict update per exchange;
which route a path belongs to is worked out when the summary is written, once per distinct
path, not per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from policies.routes import Policy
from proxy.coap import codes
from proxy.coap.requests import Request, RequestHandler, Response

log = logging.getLogger("proxy.requests")

DEFAULT_INTERVAL = 10.0
# Distinct (path, code) pairs kept between two summaries; beyond, the rest count as OTHER
# (a scan of random paths must not grow the table).
MAX_KEYS = 10_000
OTHER = "other"
WELL_KNOWN_CORE = "/.well-known/core"  # served by the proxy itself (RFC 6690)


def device_of(request: Request) -> str:
    """Which device sent ``request``, for a log line: its PSK identity over DTLS, else its
    address (docs/CONTRACT.md §2). Never a key."""
    if request.identity is not None:
        return request.identity
    ip, port = request.peer
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def route_label(policy: Policy) -> Callable[[str], str | None]:
    """The route path that serves a request path (a template's, for a templated one), the
    discovery path for itself, None for no route."""

    def label(path: str) -> str | None:
        if path == WELL_KNOWN_CORE:
            return path
        route = policy.route_at(path)
        return route.path if route is not None else None

    return label


class RequestLog:
    """Counts exchanges by (path, code) and writes the summary line (:meth:`run`)."""

    def __init__(
        self,
        route_of: Callable[[str], str | None],
        *,
        interval: float = DEFAULT_INTERVAL,
        logger: logging.Logger = log,
    ) -> None:
        """``route_of``: the route path serving a request path, None when none does."""
        self._route_of = route_of
        self.interval = interval
        self.log = logger
        self.counts: dict[tuple[str, int], int] = {}
        # Since the start, by (route, code): what /metrics exports (proxy/metrics.py), folded
        # in at each summary, never on a request's path.
        self.totals: dict[tuple[str, int], int] = {}
        self._since = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def at_level(cls, policy: Policy, *, interval: float = DEFAULT_INTERVAL) -> RequestLog | None:
        """A request log for ``policy``'s routes, or None when its logger is above info
        (then nothing wraps the handler: no cost at all)."""
        if not log.isEnabledFor(logging.INFO):
            return None
        return cls(route_label(policy), interval=interval)

    def count(self, path: str, code: int) -> None:
        counts = self.counts
        key = (path, code)
        if key in counts:
            counts[key] += 1
        elif len(counts) < MAX_KEYS:
            counts[key] = 1
        else:
            key = (OTHER, code)
            counts[key] = counts.get(key, 0) + 1

    def summary(self) -> None:
        """Write what was counted since the last summary (nothing when nothing was)."""
        counts, self.counts = self.counts, {}
        now = time.monotonic()
        seconds, self._since = now - self._since, now
        if not counts:
            return
        by_code: dict[str, int] = {}
        by_route: dict[str, dict[str, int]] = {}
        for (path, code), n in counts.items():
            text = codes.code_text(code)
            by_code[text] = by_code.get(text, 0) + n
            route = self._route_of(path) if path != OTHER else None
            label = route if route is not None else OTHER
            self.totals[(label, code)] = self.totals.get((label, code), 0) + n
            per_route = by_route.setdefault(label, {})
            per_route[text] = per_route.get(text, 0) + n
        total = sum(by_code.values())
        self.log.info(
            "coap: %d exchanges in %.0f s (%s); by route: %s",
            total,
            seconds,
            ", ".join(f"{code} {n}" for code, n in sorted(by_code.items())),
            "; ".join(
                f"{route} " + ", ".join(f"{code} {n}" for code, n in sorted(per.items()))
                for route, per in sorted(by_route.items())
            ),
            extra={
                "interval": round(seconds, 3),
                "requests": total,
                "codes": by_code,
                "routes": by_route,
            },
        )

    def cumulative(self) -> dict[tuple[str, int], int]:
        """Exchanges since the start by (route, code): the summaries' totals plus the window
        being counted (for /metrics, proxy/metrics.py; a scrape pays the route lookups)."""
        result = dict(self.totals)
        for (path, code), n in list(self.counts.items()):
            route = self._route_of(path) if path != OTHER else None
            key = (route if route is not None else OTHER, code)
            result[key] = result.get(key, 0) + n
        return result

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="request-log")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.summary()

    async def aclose(self) -> None:
        """Stop, writing what was counted since the last summary."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.summary()


class _Counted:
    """The handler, with each answer counted (info level)."""

    def __init__(self, inner: RequestHandler, requests: RequestLog) -> None:
        self._inner = inner
        self._requests = requests
        self._count = requests.count
        # Not wrapped: the gate asks it before the handler runs, nothing to count.
        self.needs_claim = inner.needs_claim

    def answer_now(self, request: Request) -> Response | None:
        answer = self._inner.answer_now(request)
        if answer is not None:
            self._count(request.path, answer.code)
        return answer

    async def handle(self, request: Request) -> Response:
        try:
            response = await self._inner.handle(request)
        except Exception:
            self._count(request.path, codes.INTERNAL_SERVER_ERROR)  # the driver's answer
            raise
        self._count(request.path, response.code)
        return response


class _Traced(_Counted):
    """The handler, with each answer counted and logged (debug level)."""

    def answer_now(self, request: Request) -> Response | None:
        answer = self._inner.answer_now(request)
        if answer is not None:
            self._count(request.path, answer.code)
            self._line(request, answer.code, 0.0)
        return answer

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        code = codes.INTERNAL_SERVER_ERROR
        try:
            response = await self._inner.handle(request)
            code = response.code
        finally:
            self._count(request.path, code)
            self._line(request, code, time.perf_counter() - started)
        return response

    def _line(self, request: Request, code: int, seconds: float) -> None:
        ip, port = request.peer
        method = codes.METHOD_NAME_OF[request.method] or codes.code_text(request.method)
        self._requests.log.debug(
            "coap %s %s %s from %s in %.1f ms",
            method,
            request.path,
            codes.code_text(code),
            device_of(request),
            seconds * 1000,
            extra={
                "peer": f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}",
                "device": device_of(request),
                "identity": request.identity,
                "method": method,
                "path": request.path,
                "code": codes.code_text(code),
                "duration_ms": round(seconds * 1000, 3),
            },
        )


def log_requests(handler: RequestHandler, requests: RequestLog | None) -> RequestHandler:
    """``handler`` as the driver should call it at the request log's level, looked at once:
    traced at debug, counted at info, itself above (or without a request log)."""
    if requests is None or not requests.log.isEnabledFor(logging.INFO):
        return handler
    if requests.log.isEnabledFor(logging.DEBUG):
        return _Traced(handler, requests)
    return _Counted(handler, requests)
