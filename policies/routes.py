"""The route policy: which CoAP path goes to which HTTP call (SPEC §3).

A policy is data (TOML); this module only loads and validates it and answers lookups.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from policies import status
from policies.forwarding import http_origin

_METHODS_BY_NAME = {name: number for number, name in status.METHOD_NAMES.items()}
_HTTP_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH"}
# CoAP methods with an HTTP method of the same meaning (RFC 8132: iPATCH is an idempotent
# PATCH). FETCH has none, so a route serving it must name its http_method.
_HTTP_TWIN = {
    status.GET: "GET",
    status.POST: "POST",
    status.PUT: "PUT",
    status.DELETE: "DELETE",
    status.PATCH: "PATCH",
    status.IPATCH: "PATCH",
}


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the route and the field."""


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: frozenset[int]
    target: str
    http_method: str | None = None
    topic_query: bool = False
    # The batch form of `target` (policies/batch.py): requests arriving while a call is in
    # flight travel together in the next call. None: one HTTP request per CoAP request.
    batch_target: str | None = None
    # Safe requests (GET, FETCH) on this route may run twice without harm, so they need no
    # cross-replica claim: local deduplication is enough (RFC 7252 §4.5 leaves it to the
    # application for idempotent requests). Off by default: a GET may still change state
    # (/bootstrap rotates a key).
    idempotent: bool = False

    def http_method_for(self, coap_method: int) -> str:
        """The HTTP method to call: the configured one, else the CoAP method's HTTP twin."""
        return self.http_method or _HTTP_TWIN[coap_method]


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Outcome of a lookup: a route, or the CoAP error code to answer with."""

    route: Route | None
    error: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    routes: dict[str, Route]
    # Origins (``scheme://host:port``, policies.forwarding.http_origin) besides the proxy's
    # --upstream that may receive the internal headers: the proxy token, the device's PSK
    # identity, the Idempotency-Key. Any other origin a route targets gets only what a public
    # reverse proxy sends (Forwarded and the content headers), docs/ARCHITECTURE.md.
    trusted_origins: frozenset[str] = frozenset()

    def match(self, path: str, method: int) -> RouteMatch:
        route = self.routes.get(path)
        if route is None:
            return RouteMatch(None, status.NOT_FOUND)
        if method not in route.methods:
            return RouteMatch(None, status.METHOD_NOT_ALLOWED)
        return RouteMatch(route)


def _normalise_path(path: str) -> str:
    """``/data/`` and ``data`` are ``/data``; ``/`` stays ``/``."""
    segments = [segment for segment in path.split("/") if segment]
    return "/" + "/".join(segments)


def _route_from(index: int, raw: dict[str, Any]) -> Route:
    where = f"route #{index + 1}"
    path = raw.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise PolicyError(f"{where}: 'path' must be a string starting with '/'")
    where = f"route {path!r}"
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise PolicyError(f"{where}: 'methods' must be a non-empty list such as [\"POST\"]")
    numbers = set()
    for name in methods:
        number = _METHODS_BY_NAME.get(str(name).upper()) or _METHODS_BY_NAME.get(str(name))
        if number is None:
            raise PolicyError(f"{where}: unknown CoAP method {name!r}")
        numbers.add(number)
    target = raw.get("target")
    if not _is_target(target):
        raise PolicyError(f"{where}: 'target' must be '/path' or an absolute http(s):// URL")
    batch_target = raw.get("batch_target")
    if batch_target is not None and not _is_target(batch_target):
        raise PolicyError(f"{where}: 'batch_target' must be '/path' or an absolute http(s):// URL")
    http_method = raw.get("http_method")
    if http_method is not None and str(http_method).upper() not in _HTTP_METHODS:
        raise PolicyError(f"{where}: 'http_method' must be one of {sorted(_HTTP_METHODS)}")
    if http_method is None and not numbers <= set(_HTTP_TWIN):
        raise PolicyError(f"{where}: a route serving FETCH must set 'http_method'")
    topic_query = raw.get("topic_query", False)
    if not isinstance(topic_query, bool):
        raise PolicyError(f"{where}: 'topic_query' must be true or false")
    idempotent = raw.get("idempotent", False)
    if not isinstance(idempotent, bool):
        raise PolicyError(f"{where}: 'idempotent' must be true or false")
    known = {
        "path",
        "methods",
        "target",
        "http_method",
        "topic_query",
        "batch_target",
        "idempotent",
    }
    unknown = set(raw) - known
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
    return Route(
        path=_normalise_path(path),
        methods=frozenset(numbers),
        target=target,
        http_method=str(http_method).upper() if http_method else None,
        topic_query=topic_query,
        batch_target=batch_target,
        idempotent=idempotent,
    )


def _is_target(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(("/", "http://", "https://"))


def parse_policy(text: str) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy is not valid TOML: {exc}") from exc
    raw_routes = data.get("route", [])
    if not isinstance(raw_routes, list) or not raw_routes:
        raise PolicyError("policy has no [[route]] tables")
    unknown = set(data) - {"route", "trusted_origins"}
    if unknown:
        raise PolicyError(f"policy: unknown top-level keys {sorted(unknown)}")
    trusted = _trusted_origins(data.get("trusted_origins", []))
    routes: dict[str, Route] = {}
    for index, raw in enumerate(raw_routes):
        if not isinstance(raw, dict):
            raise PolicyError(f"route #{index + 1} is not a table")
        route = _route_from(index, raw)
        if route.path in routes:
            raise PolicyError(f"route {route.path!r} is defined twice")
        routes[route.path] = route
    return Policy(routes=routes, trusted_origins=trusted)


def _bare_origin(url: str) -> bool:
    parts = urlsplit(url.strip())
    return parts.path in ("", "/") and not parts.query and not parts.fragment and not parts.username


def _trusted_origins(raw: object) -> frozenset[str]:
    if not isinstance(raw, list):
        raise PolicyError("'trusted_origins' must be a list such as [\"https://billing:8443\"]")
    origins = set()
    for value in raw:
        origin = http_origin(value) if isinstance(value, str) else None
        if origin is None or not _bare_origin(value):
            raise PolicyError(
                f"'trusted_origins': {value!r} is not an origin such as https://billing:8443 "
                "(scheme, host and optional port; no path)"
            )
        origins.add(origin)
    return frozenset(origins)


def default_policy_text() -> str:
    return resources.files("policies").joinpath("default.toml").read_text(encoding="utf-8")


def load_policy(path: str | Path | None = None) -> Policy:
    """Load the policy at ``path``, or the packaged default when ``path`` is ``None``."""
    if path is None:
        return parse_policy(default_policy_text())
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
    return parse_policy(text)
