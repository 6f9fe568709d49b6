"""The route policy: which CoAP path goes to which HTTP call (docs/CONTRACT.md §3).

A policy is data (TOML); this module only loads and validates it and answers lookups.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import quote, urlsplit

from policies import profiles, status
from policies.forwarding import http_origin

_HTTP_METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH"}
# CoAP methods (by name, policies/status.py) with an HTTP method of the same meaning
# (RFC 8132: iPATCH is an idempotent PATCH). FETCH has none, so a route serving it must name
# its http_method.
_HTTP_TWIN = {
    "GET": "GET",
    "POST": "POST",
    "PUT": "PUT",
    "DELETE": "DELETE",
    "PATCH": "PATCH",
    "iPATCH": "PATCH",
}


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the route and the field."""


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    # CoAP method names as policies/status.py spells them ("GET", "iPATCH").
    methods: frozenset[str]
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
    # The route's own status rows (``status = { "404" = "4.04", "2xx.POST" = "2.01" }``), in
    # the notation of policies.status.HTTP_TO_COAP, over whose rows they win; the proxy
    # compiles them into code numbers at start-up.
    status: tuple[tuple[tuple[int | str, str], str], ...] = ()
    # RFC 6690 target attributes listed for the route in /.well-known/core, in a fixed order:
    # ("rt", "..."), ("if", "..."), ("ct", (50,)), ("sz", 1024), ("obs", True).
    link: tuple[tuple[str, str | int | bool | tuple[int, ...]], ...] = ()
    # A template route (``/commands/{device}``): the variable names, in path order; each
    # matches one whole, non-empty Uri-Path segment. () for an exact path.
    variables: tuple[str, ...] = ()
    # RFC 7641: GET with Observe=0 registers; the origin announces changes on the change feed
    # (docs/ARCHITECTURE.md, "Observe"). ``observe_con``: every notification is a CON (else
    # NON, with a CON at least every 24 h, RFC 7641 §4.5). ``observe_ack``: the
    # representations are a queue the device consumes (commands): every notification is a
    # CON, and the device's ACK is acknowledged to the origin with DELETE + If-Match.
    observe: bool = False
    observe_con: bool = False
    observe_ack: bool = False
    # Served over plain CoAP in production mode (require_dtls), where every other route answers
    # 4.01 there (docs/CONTRACT.md §6): /bootstrap (a device without its PSK cannot speak DTLS
    # yet), and the routes of a profile whose devices never speak DTLS (docs/PROFILES.md).
    plain: bool = False

    def http_method_for(self, coap_method: str) -> str:
        """The HTTP method to call: the configured one, else the CoAP method's HTTP twin."""
        return self.http_method or _HTTP_TWIN[coap_method]

    def target_for(self, params: dict[str, str] | None) -> str:
        """``target`` with each ``{name}`` replaced by its segment, percent-encoded as one
        path segment (RFC 3986 §3.3: a ``/`` in a value stays data, not a separator)."""
        return _expand(self.target, params)


def _expand(target: str, params: dict[str, str] | None) -> str:
    if not params:
        return target
    for name, value in params.items():
        target = target.replace("{" + name + "}", quote(value, safe=""))
    return target


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Outcome of a lookup: a route, or the CoAP error code to answer with ("4.04", "4.05")."""

    route: Route | None
    error: str = ""
    # A template route's variables, each the segment it matched (not yet percent-encoded).
    params: dict[str, str] | None = None


_NOT_FOUND = RouteMatch(None, "4.04")  # RFC 7252 §5.9.2.5
_NOT_ALLOWED = RouteMatch(None, "4.05")  # RFC 7252 §5.9.2.6
# One template: per segment its literal, or None for a variable; and the route.
_Template = tuple[tuple[str | None, ...], Route]


@dataclass(frozen=True, slots=True)
class Policy:
    routes: dict[str, Route]
    # Origins (``scheme://host:port``, policies.forwarding.http_origin) besides the proxy's
    # --upstream that may receive the internal headers: the proxy token, the device's PSK
    # identity, the Idempotency-Key. Any other origin a route targets gets only what a public
    # reverse proxy sends (Forwarded and the content headers), docs/ARCHITECTURE.md.
    trusted_origins: frozenset[str] = frozenset()
    # The path of the change feed on the --upstream origin (text/event-stream; observable
    # routes, docs/ARCHITECTURE.md "Observe").
    observe_events: str = "/observe/events"
    # Derived from ``routes``: exact paths (one dict lookup) and templates by segment count.
    _exact: dict[str, RouteMatch] = field(init=False, compare=False, repr=False)
    _templates: dict[int, list[_Template]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        exact: dict[str, RouteMatch] = {}
        templates: dict[int, list[_Template]] = {}
        for path, route in self.routes.items():
            if route.variables:
                pattern = _pattern(path)
                templates.setdefault(len(pattern), []).append((pattern, route))
            else:
                exact[path] = RouteMatch(route)  # frozen: one answer shared by every lookup
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_templates", templates)

    def match(self, path: str, method: str, segments: list[str] | None = None) -> RouteMatch:
        """The route for ``path``: an exact path first, then the template of the same number
        of segments whose literals all equal the request's (at most one can: ambiguous
        templates are refused at load). ``segments``: the request's Uri-Path values, when
        known — a value may hold a ``/`` that ``path`` cannot tell from a separator."""
        found = self._exact.get(path)
        if found is not None:
            route = found.route
            return found if route is not None and method in route.methods else _NOT_ALLOWED
        if not self._templates:
            return _NOT_FOUND
        template = self._match_template(path.split("/")[1:] if segments is None else segments)
        if template is None:
            return _NOT_FOUND
        route, params = template
        if method not in route.methods:
            return _NOT_ALLOWED
        return RouteMatch(route, "", params)

    def route_at(self, path: str, segments: list[str] | None = None) -> Route | None:
        """The route serving ``path`` whatever the method (what :meth:`match` would find before
        it checks the method), or None."""
        found = self._exact.get(path)
        if found is not None:
            return found.route
        if not self._templates:
            return None
        template = self._match_template(path.split("/")[1:] if segments is None else segments)
        return template[0] if template is not None else None

    def _match_template(self, segments: list[str]) -> tuple[Route, dict[str, str]] | None:
        for pattern, route in self._templates.get(len(segments), ()):
            values = []
            for literal, segment in zip(pattern, segments, strict=True):
                if literal is None:
                    if not segment:
                        break
                    values.append(segment)
                elif literal != segment:
                    break
            else:
                return route, dict(zip(route.variables, values, strict=True))
        return None


_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_STATUS_KEY = re.compile(r"([1-5](?:[0-9][0-9]|xx))(?:\.(\*|[A-Za-z]+))?")
_LINK_STRINGS = ("rt", "if")
_LINK_KEYS = ("rt", "if", "ct", "sz", "obs")


def _pattern(path: str) -> tuple[str | None, ...]:
    """Per segment of a normalised path: its literal, or None for a ``{variable}``."""
    if path == "/":
        return ("",)
    return tuple(None if _VARIABLE.fullmatch(s) else s for s in path[1:].split("/"))


def _variables(where: str, path: str) -> tuple[str, ...]:
    names: list[str] = []
    for segment in path.split("/"):
        found = _VARIABLE.fullmatch(segment)
        if found is not None:
            if found.group(1) in names:
                raise PolicyError(f"{where}: variable {{{found.group(1)}}} appears twice")
            names.append(found.group(1))
        elif "{" in segment or "}" in segment:
            raise PolicyError(
                f"{where}: a template variable is a whole segment such as /commands/{{device}}"
            )
    return tuple(names)


def _check_placeholders(where: str, key: str, target: str, names: tuple[str, ...]) -> None:
    """Each ``{name}`` of a target is a variable of the path, and only in its path or query:
    a device must never choose the host a request goes to."""
    for found in _VARIABLE.finditer(target):
        if found.group(1) not in names:
            raise PolicyError(f"{where}: {key!r} names {{{found.group(1)}}}, not in the path")
    if "{" in _VARIABLE.sub("", target) or "}" in _VARIABLE.sub("", target):
        raise PolicyError(f"{where}: {key!r} holds a brace that is not a {{variable}}")
    if target.startswith(("http://", "https://")):
        authority = urlsplit(_VARIABLE.sub("x", target)).netloc
        if authority != urlsplit(target).netloc or "{" in target.split("/", 3)[2]:
            raise PolicyError(f"{where}: {key!r} may use variables in its path only")


def _status_rows(where: str, raw: object) -> tuple[tuple[tuple[int | str, str], str], ...]:
    """``{ "404" = "4.04", "2xx.POST" = "2.01", "304.GET" = "2.03" }``: keys are an HTTP
    status or class, optionally ``.METHOD`` (a CoAP method name or ``*``); values CoAP codes."""
    if not isinstance(raw, dict):
        raise PolicyError(f'{where}: \'status\' must be a table such as {{ "404" = "4.04" }}')
    rows: dict[tuple[int | str, str], str] = {}
    for key, value in raw.items():
        found = _STATUS_KEY.fullmatch(key)
        method = found.group(2) if found is not None else None
        if method is not None and method != status.ANY:
            method = _METHOD_NAME_BY_UPPER.get(method.upper())
        if found is None or (found.group(2) is not None and method is None):
            raise PolicyError(
                f'{where}: status key {key!r} is not an HTTP status or class ("404", '
                '"2xx"), optionally with .METHOD ("2xx.POST", "304.*")'
            )
        if not isinstance(value, str) or not status.is_response_code(value):
            raise PolicyError(f"{where}: status {key!r}: {value!r} is not a CoAP code like 2.05")
        http = found.group(1)
        rows[(int(http) if http.isdigit() else http, method or status.ANY)] = value
    return tuple(sorted(rows.items(), key=repr))


_METHOD_NAME_BY_UPPER = {name.upper(): name for name in status.METHODS}


def _link(where: str, raw: object) -> tuple[tuple[str, str | int | bool | tuple[int, ...]], ...]:
    """``link = { rt = "temperature", if = "sensor", ct = 50, sz = 1024, obs = true }``
    (RFC 6690 §3.1-3.4, RFC 7252 §7.2.1, RFC 7641 §6)."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: 'link' must be a table such as {{ rt = \"sensor\" }}")
    unknown = set(raw) - set(_LINK_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown link attributes {sorted(unknown)}")
    attributes: list[tuple[str, str | int | bool | tuple[int, ...]]] = []
    for name in _LINK_KEYS:
        if name not in raw:
            continue
        value = raw[name]
        if name in _LINK_STRINGS:
            # A quoted-string of space-separated values (RFC 6690 §2): no quote, no backslash.
            if not isinstance(value, str) or not value.strip() or set(value) & set('"\\'):
                raise PolicyError(f"{where}: link {name} must be a non-empty string without quotes")
            attributes.append((name, " ".join(value.split())))
        elif name == "ct":
            formats = value if isinstance(value, list) else [value]
            if not formats or not all(_uint(v, 0xFFFF) for v in formats):
                raise PolicyError(f"{where}: link ct must be a Content-Format number or a list")
            attributes.append((name, tuple(formats)))
        elif name == "sz":
            if not _uint(value, 0xFFFFFFFF):
                raise PolicyError(f"{where}: link sz must be a size in bytes")
            attributes.append((name, value))
        elif not isinstance(value, bool):
            raise PolicyError(f"{where}: link obs must be true or false")
        elif value:
            attributes.append((name, True))
    return tuple(attributes)


def _uint(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


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
    names = set()
    for name in methods:
        # Any case of the upper-case names, "iPATCH" as RFC 8132 spells it.
        method = next((m for m in (str(name).upper(), str(name)) if m in status.METHODS), None)
        if method is None:
            raise PolicyError(f"{where}: unknown CoAP method {name!r}")
        names.add(method)
    target = raw.get("target")
    if not _is_target(target):
        raise PolicyError(f"{where}: 'target' must be '/path' or an absolute http(s):// URL")
    batch_target = raw.get("batch_target")
    if batch_target is not None and not _is_target(batch_target):
        raise PolicyError(f"{where}: 'batch_target' must be '/path' or an absolute http(s):// URL")
    http_method = raw.get("http_method")
    if http_method is not None and str(http_method).upper() not in _HTTP_METHODS:
        raise PolicyError(f"{where}: 'http_method' must be one of {sorted(_HTTP_METHODS)}")
    if http_method is None and not names <= set(_HTTP_TWIN):
        raise PolicyError(f"{where}: a route serving FETCH must set 'http_method'")
    topic_query = raw.get("topic_query", False)
    if not isinstance(topic_query, bool):
        raise PolicyError(f"{where}: 'topic_query' must be true or false")
    idempotent = raw.get("idempotent", False)
    if not isinstance(idempotent, bool):
        raise PolicyError(f"{where}: 'idempotent' must be true or false")
    flags = {}
    for name in ("observe", "observe_con", "observe_ack", "plain"):
        flags[name] = raw.get(name, False)
        if not isinstance(flags[name], bool):
            raise PolicyError(f"{where}: {name!r} must be true or false")
    if (flags["observe_con"] or flags["observe_ack"]) and not flags["observe"]:
        raise PolicyError(f"{where}: 'observe_con' and 'observe_ack' need 'observe = true'")
    if flags["observe"] and "GET" not in names:
        raise PolicyError(f"{where}: an observable route must serve GET (RFC 7641 §2)")
    known = {
        "path",
        "methods",
        "target",
        "http_method",
        "topic_query",
        "batch_target",
        "idempotent",
        "status",
        "link",
        "observe",
        "observe_con",
        "observe_ack",
        "plain",
    }
    unknown = set(raw) - known
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
    path = _normalise_path(path)
    variables = _variables(where, path)
    _check_placeholders(where, "target", target, variables)
    if batch_target is not None and variables:
        # A batch is one call for many devices' requests: a path variable would either be
        # lost or make one batch target (and one group commit) per value.
        raise PolicyError(f"{where}: a template route cannot have a 'batch_target'")
    if batch_target is not None:
        _check_placeholders(where, "batch_target", batch_target, ())
    rows = _status_rows(where, raw["status"]) if "status" in raw else ()
    link = _link(where, raw["link"]) if "link" in raw else ()
    if flags["observe"] and ("obs", True) not in link:
        link += (("obs", True),)  # RFC 7641 §6: discovery says the route is observable
    return Route(
        path=path,
        methods=frozenset(names),
        target=target,
        http_method=str(http_method).upper() if http_method else None,
        topic_query=topic_query,
        batch_target=batch_target,
        idempotent=idempotent,
        status=rows,
        link=link,
        variables=variables,
        observe=flags["observe"],
        observe_con=flags["observe_con"],
        observe_ack=flags["observe_ack"],
        plain=flags["plain"],
    )


def _is_target(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(("/", "http://", "https://"))


def parse_policy(text: str, name: str = "policy") -> Policy:
    """``name``: what error messages call the file (a profile's name)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{name} is not valid TOML: {exc}") from exc
    raw_routes = data.get("route", [])
    if not isinstance(raw_routes, list) or not raw_routes:
        raise PolicyError(f"{name} has no [[route]] tables")
    unknown = set(data) - {"route", "trusted_origins", "observe_events"}
    if unknown:
        raise PolicyError(f"{name}: unknown top-level keys {sorted(unknown)}")
    trusted = _trusted_origins(data.get("trusted_origins", []))
    events = data.get("observe_events", "/observe/events")
    if not isinstance(events, str) or not events.startswith("/") or "?" in events:
        raise PolicyError("'observe_events' must be a path on the upstream such as /observe/events")
    routes: dict[str, Route] = {}
    for index, raw in enumerate(raw_routes):
        if not isinstance(raw, dict):
            raise PolicyError(f"route #{index + 1} is not a table")
        route = _route_from(index, raw)
        if route.path in routes:
            raise PolicyError(f"route {route.path!r} is defined twice")
        if route.variables:
            _refuse_ambiguous(route, [r for r in routes.values() if r.variables])
        if route.observe and route.target.startswith("http"):
            origin = http_origin(route.target)
            if origin not in trusted:
                # Only the --upstream and trusted origins serve the change feed (and see the
                # device's identity on the re-GETs).
                raise PolicyError(
                    f"route {route.path!r}: an observable route must target the upstream or a "
                    "trusted origin; add its origin to 'trusted_origins'"
                )
        routes[route.path] = route
    return Policy(routes=routes, trusted_origins=trusted, observe_events=events)


def _refuse_ambiguous(route: Route, templates: list[Route]) -> None:
    """Two templates that some path matches both (same segment count, and at each segment
    equal literals or a variable on either side) would make the order of the file matter:
    refused, so a path matches at most one template (an exact path still wins over both)."""
    other = _ambiguous_with(route, templates)
    if other is not None:
        raise PolicyError(
            f"route {route.path!r}: ambiguous with {other.path!r} (a path could match both)"
        )


def _ambiguous_with(route: Route, templates: Iterable[Route]) -> Route | None:
    pattern = _pattern(route.path)
    for other in templates:
        theirs = _pattern(other.path)
        if len(theirs) == len(pattern) and all(
            a is None or b is None or a == b for a, b in zip(pattern, theirs, strict=True)
        ):
            return other
    return None


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


def profile_text(profile: str) -> str:
    """The packaged route table of ``profile`` (a code name, policies/profiles/)."""
    return resources.files(profiles).joinpath(f"{profile}.toml").read_text(encoding="utf-8")


def default_policy_text() -> str:
    """The route table of the default profile (today's product)."""
    return profile_text(profiles.SIM_IDENTITY)


def load_policy(path: str | Path | None = None) -> Policy:
    """Load the policy at ``path``, or the default profile's when ``path`` is ``None``."""
    if path is None:
        return parse_policy(default_policy_text(), profiles.SIM_IDENTITY)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
    return parse_policy(text)


def load_profiles(names: Sequence[str]) -> Policy:
    """The route tables of the profiles ``names`` (code names or flag values,
    policies/profiles/) merged into one policy (:func:`merge_profiles`); an unknown name is a
    PolicyError listing the known ones."""
    try:
        wanted = profiles.profile_names(list(names))
    except profiles.UnknownProfile as exc:
        raise PolicyError(str(exc)) from exc
    return merge_profiles(
        [(name, parse_policy(profile_text(name), f"profile {name}")) for name in wanted]
    )


def merge_profiles(tables: Sequence[tuple[str, Policy]]) -> Policy:
    """One policy from the named route tables of several profiles.

    A path two profiles define identically is kept once (``/commands/{device}``); a path they
    define differently, or two templates some path could match both, is a PolicyError naming
    both profiles: which one a device reaches must not depend on the order of the flags. The
    trusted origins are the union; the change feed path must be the same in every profile.
    """
    if not tables:
        raise PolicyError("no profile named")
    routes: dict[str, Route] = {}
    owner: dict[str, str] = {}
    trusted: set[str] = set()
    events: tuple[str, str] | None = None
    for profile, policy in tables:
        if events is not None and policy.observe_events != events[1]:
            raise PolicyError(
                f"profiles {events[0]} and {profile}: different 'observe_events' "
                f"({events[1]!r}, {policy.observe_events!r})"
            )
        events = (profile, policy.observe_events)
        trusted |= policy.trusted_origins
        for path, route in policy.routes.items():
            existing = routes.get(path)
            if existing is not None:
                if existing != route:
                    raise PolicyError(
                        f"route {path!r} is defined differently by profiles {owner[path]} and "
                        f"{profile}; they cannot be enabled together"
                    )
                continue
            other = None
            if route.variables:
                other = _ambiguous_with(route, (r for r in routes.values() if r.variables))
            if other is not None:
                raise PolicyError(
                    f"route {path!r} of profile {profile} is ambiguous with {other.path!r} of "
                    f"profile {owner[other.path]} (a path could match both); they cannot be "
                    "enabled together"
                )
            routes[path] = route
            owner[path] = profile
    assert events is not None  # tables is not empty
    return Policy(routes=routes, trusted_origins=frozenset(trusted), observe_events=events[1])
