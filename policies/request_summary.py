"""The request logs' summary line, one rule for both sides (docs/OPERATIONS.md, "Logs").

The proxy (proxy/request_log.py) counts CoAP exchanges and the API (api/request_log.py) HTTP
requests, each by (path, response code) between two summaries. At info level each writes one
line every interval: the total, the count by code, and the count by route (the route's path
template, so a template counts once whatever device it names). Both write the same text and
the same structured fields, so that one log query reads either: this module is that format.

Pure: the caller passes the counts, how to name a path's route and how to spell a code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

OTHER = "other"
"""The route of a path no route serves, and of the paths counted past a log's table cap."""


@dataclass(frozen=True, slots=True)
class Summary:
    """What one summary line says. ``by_route_code`` keeps the numeric codes (for a metric's
    running totals); the rest is spelled for the log line."""

    total: int
    by_code: dict[str, int]
    by_route: dict[str, dict[str, int]]
    by_route_code: dict[tuple[str, int], int]


def summarize(
    counts: Mapping[tuple[str, int], int],
    route_of: Callable[[str], str | None],
    code_text: Callable[[int], str],
) -> Summary:
    """Counts by (path, code) gathered by route. ``route_of`` is asked once per distinct path
    (None: no route, counted as :data:`OTHER`); :data:`OTHER` itself is never asked about."""
    by_code: dict[str, int] = {}
    by_route: dict[str, dict[str, int]] = {}
    by_route_code: dict[tuple[str, int], int] = {}
    named: dict[str, str] = {}
    for (path, code), n in counts.items():
        text = code_text(code)
        by_code[text] = by_code.get(text, 0) + n
        route = named.get(path)
        if route is None:
            route = named[path] = (route_of(path) if path != OTHER else None) or OTHER
        per_route = by_route.setdefault(route, {})
        per_route[text] = per_route.get(text, 0) + n
        by_route_code[(route, code)] = by_route_code.get((route, code), 0) + n
    return Summary(sum(by_code.values()), by_code, by_route, by_route_code)


def summary_line(
    protocol: str, noun: str, summary: Summary, seconds: float
) -> tuple[str, dict[str, Any]]:
    """The line and its structured fields (``extra`` of the log record), e.g.
    ``coap: 12 exchanges in 10 s (2.04 11, 4.04 1); by route: /t 2.04 11; other 4.04 1``."""
    codes = ", ".join(f"{code} {n}" for code, n in sorted(summary.by_code.items()))
    routes = "; ".join(
        f"{route} " + ", ".join(f"{code} {n}" for code, n in sorted(per.items()))
        for route, per in sorted(summary.by_route.items())
    )
    line = f"{protocol}: {summary.total} {noun} in {seconds:.0f} s ({codes}); by route: {routes}"
    fields: dict[str, Any] = {
        "interval": round(seconds, 3),
        "requests": summary.total,
        "codes": summary.by_code,
        "routes": summary.by_route,
    }
    return line, fields
