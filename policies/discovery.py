"""Resource discovery: the policy's routes in CoRE Link Format (RFC 6690), with query filtering.

Each exact route is one link, its target attributes those its policy declares (``link = {...}``,
policies/routes.py). Template routes (``/commands/{device}``) are not listed: a link target is
a URI (RFC 6690 §2), and a template is not one; docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote

from policies.routes import Route

# RFC 3986 pchar minus the characters that end a link target in RFC 6690 (">", ";", ",").
_PATH_SAFE = "/!$&'()*+=:@-._~"


def _href(path: str) -> str:
    return quote(path, safe=_PATH_SAFE)


def _link(route: Route) -> str:
    parts = [f"<{_href(route.path)}>"]
    for name, value in route.link:
        if value is True:
            parts.append(name)  # a flag such as obs (RFC 7641 §6)
        elif isinstance(value, tuple):
            # RFC 7252 §7.2.1: one ct is a number; several, a quoted space-separated list.
            text = " ".join(str(v) for v in value)
            parts.append(f"{name}={text}" if len(value) == 1 else f'{name}="{text}"')
        elif isinstance(value, str):
            parts.append(f'{name}="{value}"')
        else:
            parts.append(f"{name}={value}")
    return ";".join(parts)


def _values(route: Route, name: str) -> list[str] | None:
    """What a filter on ``name`` is compared with: each value of a multi-valued attribute on
    its own (RFC 6690 §4.1); None when the link does not carry the attribute."""
    if name == "href":
        return [_href(route.path)]
    for key, value in route.link:
        if key != name:
            continue
        if value is True:
            return [""]
        if isinstance(value, tuple):
            return [str(v) for v in value]
        if isinstance(value, str):
            return value.split(" ")
        return [str(value)]
    return None


def _matches(route: Route, query: str) -> bool:
    """One ``name=pattern`` query (RFC 6690 §4.1): equal, or with a trailing ``*`` a prefix;
    a bare ``name`` asks for links that carry the attribute at all."""
    name, has_value, pattern = query.partition("=")
    values = _values(route, name)
    if values is None:
        return False
    if not has_value:
        return True
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return any(v.startswith(prefix) for v in values)
    return pattern in values


class Discovery:
    """The /.well-known/core answer of one policy: the unfiltered payload built once."""

    __slots__ = ("_routes", "payload")

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = [route for route in routes if not route.variables]
        self.payload = ",".join(_link(route) for route in self._routes).encode()

    def filtered(self, queries: list[str]) -> bytes:
        """The links matching every query (several are all applied; RFC 6690 defines one).
        No match is an empty payload, still 2.05."""
        if not queries:
            return self.payload
        return ",".join(
            _link(route) for route in self._routes if all(_matches(route, q) for q in queries)
        ).encode()
