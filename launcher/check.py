"""``coap-bridge check``: load a route policy or the profiles' tables as ``proxy`` would, and
print the routes it would serve.

The same code as at start-up decides (proxy/server.py ``route_policy``, and the checks
proxy/forward.py's handler makes when it is built: batch and observable targets must be the
upstream or a trusted origin, status rows must name CoAP codes), so a file this accepts is a
file ``up``/``proxy`` starts with, under the same ``--upstream``. Nothing is bound or called.
Exit codes: 0 valid, 1 the policy is refused (the reason printed), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from pydantic import ValidationError

from launcher.client import EXIT_OK, EXIT_USAGE, table
from policies.routes import Policy, PolicyError, Route
from proxy.forward import ProxyHandler
from proxy.server import route_policy
from proxy.settings import ProxySettings
from proxy.upstream import UpstreamResponse

ROUTE_COLUMNS = ("methods", "path", "target", "flags")
EXIT_INVALID = 1


class _NoUpstream:
    """The handler is only built here, never asked to forward."""

    async def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes
    ) -> UpstreamResponse:  # pragma: no cover - never called
        raise AssertionError("check never forwards")

    async def aclose(self) -> None:  # pragma: no cover - never called
        return None


def _flags(route: Route) -> list[str]:
    flags = []
    if route.batch_target is not None:
        flags.append(f"batch={route.batch_target}")
    if route.topic_query:
        flags.append("topic_query")
    if route.idempotent:
        flags.append("idempotent")
    if route.observe:
        flags.append(
            "observe" + ("+ack" if route.observe_ack else "+con" if route.observe_con else "")
        )
    if route.plain:
        flags.append("plain")
    if route.status:
        flags.append(f"status_rows={len(route.status)}")
    if route.link:
        flags.append("link")
    return flags


def describe_route(route: Route) -> dict[str, Any]:
    target = route.target
    if route.http_method is not None:
        target = f"{route.http_method} {target}"
    return {
        "methods": ",".join(sorted(route.methods)),
        "path": route.path,
        "target": target,
        "flags": " ".join(_flags(route)),
    }


def describe(policy: Policy, source: str) -> dict[str, Any]:
    return {
        "source": source,
        "routes": [describe_route(route) for route in policy.routes.values()],
        "trusted_origins": sorted(policy.trusted_origins),
        "observe_events": policy.observe_events,
    }


def load_checked(settings: ProxySettings) -> Policy:
    """The policy ``proxy`` would run with these settings, or PolicyError/ValueError."""
    policy = route_policy(settings)
    ProxyHandler(
        policy=policy,
        upstream=_NoUpstream(),
        base_url=settings.upstream,
        proxy_token=None,
        max_payload=settings.max_payload,
    )
    return policy


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    profile_type: Callable[[str], str],
) -> None:
    text = "validate a route policy file or the profiles' route tables; print the routes"
    parser = commands.add_parser("check", help=text, description=text)
    parser.add_argument(
        "--policy", default=None, metavar="FILE", help="the policy file (env COAP_BRIDGE_POLICY)"
    )
    parser.add_argument(
        "--profile",
        dest="profiles",
        action="append",
        type=profile_type,
        default=None,
        metavar="NAME[,NAME]",
        help="profiles whose tables to merge when no --policy (env COAP_BRIDGE_PROFILES)",
    )
    parser.add_argument(
        "--upstream",
        default=None,
        help="the --upstream the proxy will run with (its origin may receive batches)",
    )
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    given = {
        key: value
        for key, value in (
            ("policy", args.policy),
            ("profiles", args.profiles),
            ("upstream", args.upstream),
        )
        if value is not None
    }
    try:
        settings = ProxySettings(**given)
    except ValidationError as exc:
        print(f"coap-bridge: invalid setting: {exc}", file=err)
        return EXIT_USAGE
    if settings.policy is not None:
        source = f"policy {settings.policy}"
    else:
        source = f"profiles {','.join(settings.profiles)}"
    try:
        policy = load_checked(settings)
    except (PolicyError, ValueError) as exc:
        print(f"coap-bridge: {source}: {exc}", file=err)
        return EXIT_INVALID
    report = describe(policy, source)
    if args.output == "json":
        print(json.dumps(report, indent=2), file=out)
        return EXIT_OK
    print(f"{source}: valid, {len(report['routes'])} routes", file=out)
    print(table(report["routes"], ROUTE_COLUMNS), file=out)
    if report["trusted_origins"]:
        print(f"trusted origins: {', '.join(report['trusted_origins'])}", file=out)
    return EXIT_OK
