"""Which API resources each profile enables (docs/PROFILES.md).

``create_app`` includes the always-on routers (health is declared on the app itself), then the
routers of the enabled profiles (``ApiSettings.profiles``), then :func:`disabled_router`: the
resources of the profiles not enabled answer 404 with a message naming the profile, whatever
other routes share their path (a management PUT beside a device's GET would otherwise make the
GET a 405).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NoReturn

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute

from api.console import router as console_router
from api.errors import ApiError, clip
from api.feed import router as feed_router
from api.routes import (
    bootstrap,
    commands,
    credentials,
    devices,
    firmware,
    ingest,
    location,
    managed_credentials,
    onboarding,
    presence,
    registry,
    sessions,
    telemetry,
    templates,
)
from policies.profiles import MANAGED_PSK, SIGNED_SESSION, SIM_IDENTITY

ALWAYS_ON: tuple[APIRouter, ...] = (
    devices.router,
    credentials.router,
    commands.management,
    feed_router,
    firmware.management,
    presence.router,
    templates.management,
    console_router,  # the web console (api/console/), always on
)
"""Management, the proxy's change feed and the console: every profile's operators need them."""

# In the order they are included. A router two profiles share (the device side of commands)
# is included once.
PROFILE_ROUTERS: dict[str, tuple[APIRouter, ...]] = {
    SIM_IDENTITY: (
        ingest.router,  # /ingest and /ingest/batch (and the batch fast path, api/app.py)
        bootstrap.router,
        location.router,
        onboarding.router,
        # A position is set by an operator for the device-side GET /location only.
        location.management,
        commands.router,
    ),
    MANAGED_PSK: (
        telemetry.router,  # POST /telemetry?id=
        managed_credentials.router,  # the platform's own credentials path
        firmware.router,
        commands.router,
    ),
    SIGNED_SESSION: (
        sessions.router,  # /auth/{pk}/{dk} and the session's telemetry
        registry.router,  # products and their devices
    ),
}


class ProfileNotEnabled(ApiError):
    """A resource of a profile this API does not serve."""

    status_code = 404
    default_message = "not found"


def enabled_routers(profiles: Sequence[str]) -> list[APIRouter]:
    """The routers of ``profiles`` (code names), each once, in table order per profile."""
    routers: list[APIRouter] = []
    for profile in profiles:
        for router in PROFILE_ROUTERS[profile]:
            if not any(router is seen for seen in routers):
                routers.append(router)
    return routers


def disabled_router(profiles: Sequence[str]) -> APIRouter:
    """404 for each route of the profiles not in ``profiles`` (and not also enabled by one
    of them), outside the OpenAPI document: included after every enabled router, so it only
    answers what they do not serve."""
    enabled = enabled_routers(profiles)
    stubs = APIRouter(include_in_schema=False)
    for profile, routers in PROFILE_ROUTERS.items():
        if profile in profiles:
            continue
        for router in routers:
            if any(router is seen for seen in enabled):
                continue
            for route in _api_routes(router.routes):
                stubs.add_api_route(
                    route.path,
                    _refuse(profile),
                    methods=sorted(route.methods or ()),
                    # The same caller checks as the resource: only a caller who could use it
                    # learns which profile it belongs to (api/guard.py checks first anyway).
                    dependencies=route.dependencies,
                    include_in_schema=False,
                    response_model=None,
                )
    return stubs


def _api_routes(routes: Iterable[object]) -> list[APIRoute]:
    return [route for route in routes if isinstance(route, APIRoute)]


def _refuse(profile: str) -> Callable[[Request], Awaitable[NoReturn]]:
    async def refuse(request: Request) -> NoReturn:
        raise ProfileNotEnabled(
            f"{request.method} {clip(request.url.path)} belongs to the {profile} profile, "
            "which this API does not serve (docs/PROFILES.md)"
        )

    return refuse
