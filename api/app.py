"""The FastAPI application factory of the HTTP backend.

``create_app(settings)`` builds an app whose lifespan creates (unless given) and closes the
device store and the MQTT publisher. For ``uvicorn --factory`` there is
:func:`create_app_from_env`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.admission import SeparateAdmission, admission_for
from api.command_intake import CommandIntake
from api.commands import Commands
from api.docs_assets import install as install_docs
from api.errors import ApiError, install_error_handler
from api.fast_path import BatchFastPath
from api.feed import ChangeFeed
from api.guard import Guard
from api.idempotency import build_ledger
from api.metrics import install as install_metrics
from api.metrics import metered
from api.presence import PresenceWatcher
from api.profiles import ALWAYS_ON, disabled_router, enabled_routers
from api.publisher import MqttPublisher, Publisher
from api.request_log import RequestLog
from api.routes.templates import TemplateBook
from api.safe_json import SafeJsonRoute
from api.settings import ApiSettings
from api.store.base import DeviceStore
from api.store.memory import MemoryDeviceStore
from api.store.redis_store import RedisDeviceStore
from policies.profiles import SIM_IDENTITY
from stores.firmware import firmware_store_for
from stores.ledger import Ledger
from stores.presence import presence_for
from stores.queue import queue_for
from stores.registry import registry_for
from stores.relations import RelationCount, RelationReader
from stores.templates import templates_for

_TAGS = [
    {
        "name": "ingest",
        "description": "Device telemetry from the proxy to MQTT (docs/CONTRACT.md §9).",
    },
    {
        "name": "bootstrap",
        "description": "CoAP `GET /bootstrap` via the proxy: a device's PSK as CSV "
        "(docs/CONTRACT.md §7).",
    },
    {
        "name": "location",
        "description": "A device's last known position: CoAP `GET /location` via the proxy, "
        "and its management (issue #6).",
    },
    {
        "name": "onboarding",
        "description": "HTTPS onboarding called by devices directly: PSK as JSON or CSV, with "
        "byte ranges (docs/CONTRACT.md §8).",
    },
    {
        "name": "devices",
        "description": "Device registry: SIMs by iccid and ip (docs/CONTRACT.md §2).",
    },
    {
        "name": "credentials",
        "description": "A device's DTLS PSK: set, revoke, generate (shown once) "
        "(docs/CONTRACT.md §6, §13).",
    },
    {
        "name": "firmware",
        "description": "Firmware images: uploaded, listed and deleted by operators; "
        "downloaded block-wise by devices through the proxy, one byte range per block "
        "(issue 16).",
    },
    {
        "name": "templates",
        "description": "Payload templates: a device's binary payload translated to JSON "
        "before it is published (issue 17).",
    },
    {
        "name": "health",
        "description": "Probes for an orchestrator: `/healthz` (liveness: the process serves "
        "HTTP) and `/readyz` (readiness: the MQTT broker and the device store are reachable).",
    },
]

_DESCRIPTION = """\
The HTTP side of coap-bridge.

* **Proxy-facing** (`/ingest`, `/bootstrap`, `/location`): called by the coap-bridge proxy for
  CoAP requests. They require the proxy's shared token in `X-Bridge-Token` and name the device
  by the `Forwarded` header (and, over DTLS, the PSK identity in `X-Bridge-Identity`).
* **Device-facing** (`/onboarding/coap`): called by devices over HTTPS; the device is its source
  address.
* **Management** (`/devices/...`): `Authorization: Bearer <api key>`. A PSK is never returned by
  any of them, except once by `POST /devices/{iccid}/credentials`.

The caller is checked and the body's size judged from the headers before any body is read:
401/403 without the key or token, 413 over the cap (management 8 KiB, `/ingest` `max_payload`,
`/ingest/batch` `max_batch` × (`max_payload` + 1 KiB), anything else 8 KiB). JSON number
literals longer than 64 characters, beyond a double's range, or `NaN`/`Infinity` are a 422
(`json_invalid`); an error repeats at most 64 characters of any value it quotes.
"""


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    mqtt: Literal["connected", "disconnected"]
    store: str


READINESS_TIMEOUT = 1.0
"""Seconds the store gets to answer the readiness lookup (an orchestrator's probe timeout is
typically 1 s too)."""


class Readiness(BaseModel):
    """What ``/readyz`` found: ready only when both dependencies answer."""

    status: Literal["ready", "unready"]
    mqtt: Literal["connected", "disconnected"] = Field(
        description="the publisher's connection to the broker"
    )
    store: Literal["reachable", "unreachable"] = Field(
        description=f"the device store answered a lookup within {READINESS_TIMEOUT:g} s"
    )
    store_kind: str = Field(description="memory or redis")


# A well-formed iccid no SIM has (the 89 prefix, then zeros): the lookup finds nothing and
# only proves the store answers.
_PROBE_ICCID = "8900000000000000000"


async def _store_reachable(store: DeviceStore | None) -> bool:
    if store is None:
        return False
    try:
        await asyncio.wait_for(store.get(_PROBE_ICCID), READINESS_TIMEOUT)
    except (ApiError, TimeoutError, OSError):
        return False
    return True


def build_store(settings: ApiSettings) -> DeviceStore:
    """Redis when ``redis_url`` is set (shared by replicas), else memory (one process)."""
    if settings.redis_url:
        return RedisDeviceStore.from_url(settings.redis_url, prefix=settings.redis_prefix)
    return MemoryDeviceStore()


def create_app(
    settings: ApiSettings,
    *,
    store: DeviceStore | None = None,
    publisher: Publisher | None = None,
    idempotency: Ledger | None = None,
    fast_path: bool = True,
    relations: RelationCount | None = None,
) -> FastAPI:
    """Build the API. A given ``store``/``publisher`` is used as is and left open at shutdown
    (its owner closes it); the ones built here are closed by the lifespan. ``relations``: the
    records of which proxy holds which Observe relation (stores/relations.py; ``coap-bridge
    up`` without Redis shares its proxy's); by default read from Redis when there is one.

    The app starts even when the broker is down: the publisher keeps reconnecting and
    ``/ingest`` answers 503 until it is back. ``fast_path``: the proxy's batch calls skip
    FastAPI's router (api/fast_path.py); off, the route serves them (only the oracle test,
    tests/api/test_fast_path.py, turns it off: both must give the same answers).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as owned:
            app.state.store = store
            if store is None:
                built_store = build_store(settings)
                owned.push_async_callback(built_store.close)
                app.state.store = built_store
            if idempotency is None and settings.redis_url:
                shared = build_ledger(settings.redis_url, settings.redis_prefix)
                owned.push_async_callback(shared.close)
                app.state.idempotency = shared
            # One script for both questions when this app built both stores on one server.
            app.state.admission = admission_for(
                app.state.store,
                app.state.idempotency,
                same_server=store is None and idempotency is None and bool(settings.redis_url),
            )
            app.state.publisher = publisher
            if publisher is None:
                mqtt = MqttPublisher.from_settings(settings)
                owned.push_async_callback(mqtt.close)
                await mqtt.start()
                app.state.publisher = mqtt
            # Commands and the change feed are built with the app (usable without the
            # lifespan); closed here, the status worker first (it publishes).
            owned.push_async_callback(app.state.changes.close)
            if relations is None and app.state.relations is not None:
                owned.push_async_callback(app.state.relations.close)
            owned.push_async_callback(app.state.commands.close)
            owned.push_async_callback(app.state.firmware.close)
            owned.push_async_callback(app.state.registry.close)
            owned.push_async_callback(app.state.templates.close)
            # Closed before the publisher (pushed after it): queued statuses go out first.
            await app.state.presence.start()
            owned.push_async_callback(app.state.presence.close)
            # Commands from MQTT arrive on the publisher's connection (a publisher given by a
            # test may not subscribe: then there is no MQTT intake).
            app.state.command_intake = CommandIntake(
                app.state.commands,
                settings.command_topic,
                share_group=settings.command_share_group,
            )
            if isinstance(app.state.publisher, MqttPublisher):
                await app.state.command_intake.start(app.state.publisher)
            # Publishes counted for /metrics from here (api/metrics.py).
            metered(app)
            yield

    app = FastAPI(
        title="coap-bridge API",
        summary="HTTP backend of coap-bridge: telemetry to MQTT, DTLS credentials, device "
        "locations, HTTPS onboarding and the device registry.",
        description=_DESCRIPTION,
        version="0.1.0",
        openapi_tags=_TAGS,
        lifespan=lifespan,
        # /docs with Swagger UI served by the API itself, no CDN; ReDoc off (api/docs_assets.py).
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    # Set before the lifespan runs, so a test transport that skips the lifespan still works
    # when it passes store and publisher in.
    app.state.settings = settings
    app.state.store = store
    app.state.publisher = publisher
    app.state.idempotency = idempotency or build_ledger(None, settings.redis_prefix)
    app.state.admission = (
        SeparateAdmission(store, app.state.idempotency) if store is not None else None
    )
    app.state.changes = ChangeFeed(settings.redis_url, prefix=settings.redis_prefix)
    known: RelationCount | None = relations
    if relations is None and settings.redis_url:
        known = RelationReader.from_url(settings.redis_url, prefix=settings.redis_prefix)
    app.state.relations = known
    app.state.commands = Commands(
        settings,
        queue_for(settings.redis_url, prefix=settings.redis_prefix),
        app.state.changes,
        store=lambda: app.state.store,
        publisher=lambda: app.state.publisher,
    )
    app.state.firmware = firmware_store_for(settings.redis_url, prefix=settings.redis_prefix)
    # Presence (api/presence.py) and the signed-session registry (stores/registry.py): started
    # and closed by the lifespan.
    app.state.presence = PresenceWatcher(
        presence_for(settings.redis_url, settings.redis_prefix),
        lambda: app.state.publisher,
        settings.status_topic,
    )
    app.state.registry = registry_for(settings.redis_url, settings.redis_prefix)
    # Payload templates (issue 17): the store and the compiled templates of this replica.
    app.state.templates = TemplateBook(templates_for(settings.redis_url, settings.redis_prefix))
    install_error_handler(app)
    # Routes declared on the app itself parse JSON bodies at a bounded cost too.
    app.router.route_class = SafeJsonRoute
    if fast_path and SIM_IDENTITY in settings.profiles:
        app.add_middleware(BatchFastPath)  # it serves /ingest/batch, a sim_identity resource
    app.add_middleware(Guard)  # added last: outermost, so it runs before any body is read
    app.add_middleware(RequestLog, interval=settings.log_interval)  # reads headers only
    # The resources of the enabled profiles, then a 404 naming its profile for each resource of
    # the others (api/profiles.py).
    for router in (*ALWAYS_ON, *enabled_routers(settings.profiles)):
        app.include_router(router)
    app.include_router(disabled_router(settings.profiles))

    @app.get(
        "/healthz",
        tags=["health"],
        summary="Liveness: 200 while the process serves HTTP",
        description="Cheap and always 200; `mqtt` and `store` are for information only. "
        "Whether the API can do its work is `/readyz`.",
    )
    async def healthz(request: Request) -> Health:
        current_store: DeviceStore | None = request.app.state.store
        current_publisher: Publisher | None = request.app.state.publisher
        connected = current_publisher is not None and current_publisher.connected
        return Health(
            mqtt="connected" if connected else "disconnected",
            store=current_store.kind if current_store is not None else "none",
        )

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: 200 when the MQTT broker and the device store are reachable",
        description="503 while the broker is disconnected or the store does not answer a "
        f"lookup within {READINESS_TIMEOUT:g} s; the body says which.",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "a dependency is unreachable"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        current_store: DeviceStore | None = request.app.state.store
        current_publisher: Publisher | None = request.app.state.publisher
        connected = current_publisher is not None and current_publisher.connected
        reachable = await _store_reachable(current_store)
        ready = connected and reachable
        body = Readiness(
            status="ready" if ready else "unready",
            mqtt="connected" if connected else "disconnected",
            store="reachable" if reachable else "unreachable",
            store_kind=current_store.kind if current_store is not None else "none",
        )
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    install_metrics(app, _store_reachable)
    return app


def create_app_from_env() -> FastAPI:
    """``uvicorn --factory api.app:create_app_from_env``: settings from ``COAP_BRIDGE_*``."""
    return create_app(ApiSettings())
