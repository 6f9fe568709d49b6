"""An API app serving the signed-session profile, on a real broker, with a clock the test
moves (tests/api/test_sessions.py, test_registry.py, test_presence.py)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from api.app import create_app
from api.presence import PresenceWatcher
from api.publisher import Publisher
from api.routes import presence, registry, sessions
from api.settings import ApiSettings
from api.store.base import DeviceStore
from api.store.memory import MemoryDeviceStore
from stores.presence import presence_for
from stores.registry import registry_for
from tests.api.conftest import API_KEY, PROXY_TOKEN
from tests.support.services import MosquittoServer

NOW = 1_800_000_000.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def sign_of(pk: str, dk: str, lifetime: int, secret: str, secure_mode: int = 2) -> str:
    """The platform's recipe, written out here independently of api/routes/sessions.py."""
    text = f"deviceKey{dk}lifetime{lifetime}productKey{pk}secureMode{secure_mode}{secret}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest().upper()


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class SignedApp:
    app: FastAPI
    http: httpx.AsyncClient
    clock: Clock
    watcher: PresenceWatcher


def _has_route(app: FastAPI, path: str) -> bool:
    return any(getattr(route, "path", None) == path for route in app.routes)


@contextlib.asynccontextmanager
async def signed_app(
    mosquitto: MosquittoServer,
    *,
    redis_url: str | None = None,
    publisher: Publisher | None = None,
    store: DeviceStore | None = None,
    **overrides: object,
) -> AsyncIterator[SignedApp]:
    """The app with its lifespan running (the presence watcher too)."""
    values: dict[str, object] = {
        "mqtt_url": mosquitto.url,
        "proxy_token": PROXY_TOKEN,
        "api_key": API_KEY,
        "mqtt_publish_timeout": 1.0,
        "redis_url": redis_url,
        "redis_prefix": "t",
        "profiles": ["sim_identity", "signed_session"],
        "command_share_group": "",
    }
    values.update(overrides)
    settings = ApiSettings(**values)  # type: ignore[arg-type]
    app = create_app(settings, store=store or MemoryDeviceStore(), publisher=publisher)
    # Until api/profiles.py lists them for the profile: include them here.
    if not _has_route(app, "/auth/{product_key}/{device_key}"):
        app.include_router(sessions.router)
        app.include_router(registry.router)
    if not _has_route(app, "/devices/{device_id}/presence"):
        app.include_router(presence.router)
    clock = Clock()
    await app.state.presence.store.close()
    await app.state.registry.close()
    app.state.registry = registry_for(redis_url, "t")
    watcher = PresenceWatcher(
        presence_for(redis_url, "t"),
        lambda: app.state.publisher,
        settings.status_topic,
        interval=0.05,
        clock=clock,
    )
    app.state.presence = watcher
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            yield SignedApp(app, http, clock, watcher)


async def register(http: httpx.AsyncClient, pk: str = "Pk0001", dk: str = "dev-1") -> str:
    """Product (if new) and device; returns the deviceSecret."""
    await http.post("/products", json={"productKey": pk}, headers=AUTH)
    answer = await http.post(f"/products/{pk}/devices", json={"deviceKey": dk}, headers=AUTH)
    assert answer.status_code == 201, answer.text
    secret: str = answer.json()["deviceSecret"]
    return secret
