"""The proxy's request log (docs/OPERATIONS.md, "Logs").

At debug level one line per CoAP exchange the handler answers: peer, identity, method, path,
code, duration. At info level no line per message — at full load that would be tens of
thousands a second — but one summary every ``interval`` seconds: exchanges by response code
and by route (the policy's route path, so a template counts as one route whatever device it
names; the line's format is policies/request_summary.py, shared with the API). At warning
level and above no line, but the counting goes on: it is what ``requests_total`` on /metrics
exports (proxy/metrics.py), whatever the level.

The level is looked at once, when the proxy starts (:func:`log_requests`): the handler the
driver calls is then a wrapper that only counts (info and above), or one that counts and
writes a line (debug). Counting is one tuple and one dict update per exchange; which route a
path belongs to is worked out when the summary is made, once per distinct path, not per
message.

:class:`FailureLog` keeps a flood of identical failures (an upstream down fails every message)
to a line per cause per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from policies.request_summary import OTHER, summarize, summary_line
from policies.routes import Policy
from proxy.coap import codes
from proxy.coap.requests import Request, RequestHandler, Response

log = logging.getLogger("proxy.requests")

DEFAULT_INTERVAL = 10.0
# Distinct (path, code) pairs kept between two summaries; beyond, the rest count as OTHER
# (a scan of random paths must not grow the table).
MAX_KEYS = 10_000
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
    def at_level(cls, policy: Policy, *, interval: float = DEFAULT_INTERVAL) -> RequestLog:
        """A request log for ``policy``'s routes. Made at every level: above info it writes
        no line but still counts for /metrics (``requests_total``)."""
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
        """Fold what was counted since the last summary into the totals and, at info level,
        write it (nothing when nothing was counted)."""
        counts, self.counts = self.counts, {}
        now = time.monotonic()
        seconds, self._since = now - self._since, now
        if not counts:
            return
        summary = summarize(counts, self._route_of, codes.code_text)
        for key, n in summary.by_route_code.items():
            self.totals[key] = self.totals.get(key, 0) + n
        if self.log.isEnabledFor(logging.INFO):
            line, fields = summary_line("coap", "exchanges", summary, seconds)
            self.log.info("%s", line, extra=fields)

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
    """The handler, with each answer counted (at every log level: the counts feed /metrics)."""

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
    traced at debug, counted at any other level (the counts are /metrics' ``requests_total``
    even when no summary line is written); itself only without a request log."""
    if requests is None:
        return handler
    if requests.log.isEnabledFor(logging.DEBUG):
        return _Traced(handler, requests)
    return _Counted(handler, requests)


@dataclass(slots=True)
class _Held:
    """One cause's window: since and until when further lines are held back, how many were,
    the last of them."""

    since: float
    until: float
    held: int = 0
    device: str = "-"
    detail: str = ""
    timer: asyncio.TimerHandle | None = None


class FailureLog:
    """Warning lines for failures that come in floods, per cause (docs/OPERATIONS.md, "Logs").

    An unreachable upstream fails every message: at full load one line per message would be
    thousands a second, the same line. The first failure of a cause is written at once; the
    ones within the next ``interval`` seconds are only counted, and when the interval ends
    one line says how many there were and the last of them (its device and detail). So a
    cause writes at most one line per interval, and every failure is in some line.

    ``cause`` is the error's kind (its class name: unreachable, timeout...), not its text,
    which names a URL or an address and would make every failure a cause of its own."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``what``: the line's subject ("upstream call failed")."""
        self._what = what
        self._log = logger
        self.interval = interval
        self._clock = clock
        self._causes: dict[str, _Held] = {}

    def failed(self, cause: str, device: str, detail: str) -> None:
        now = self._clock()
        held = self._causes.get(cause)
        if held is None or (now >= held.until and held.held == 0):
            self._causes[cause] = _Held(since=now, until=now + self.interval)
            self._log.warning(
                "%s for device %s: %s",
                self._what,
                device,
                detail,
                extra={"device": device, "cause": cause},
            )
            return
        held.held += 1
        held.device, held.detail = device, detail
        if held.timer is None:
            # Written when the window ends, so a flood that stops is still reported.
            delay = max(held.until - now, 0.0)
            held.timer = asyncio.get_running_loop().call_later(delay, self._report, cause)

    def _report(self, cause: str) -> None:
        held = self._causes.get(cause)
        if held is None:
            return
        held.timer = None
        if held.held == 0:
            return
        now = self._clock()
        self._log.warning(
            "%s %d more times (%s) in the last %.0f s; the last for device %s: %s",
            self._what,
            held.held,
            cause,
            now - held.since,
            held.device,
            held.detail,
            extra={"device": held.device, "cause": cause, "suppressed": held.held},
        )
        # A new window from now: the next failure waits for the next line, so a steady
        # flood writes one line per interval.
        self._causes[cause] = _Held(since=now, until=now + self.interval)

    def flush(self) -> None:
        """Write what is held back now (at shutdown)."""
        for cause, held in list(self._causes.items()):
            if held.timer is not None:
                held.timer.cancel()
            self._report(cause)
