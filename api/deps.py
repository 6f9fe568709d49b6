"""FastAPI dependencies: shared objects from ``app.state`` and the two kinds of caller auth.

Shared state is passed in by :func:`api.app.create_app`, never global; tests give their own
objects to ``create_app`` (the batch route's fast path, api/fast_path.py, reads ``app.state``
directly, so overriding these dependencies would not reach it).
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.admission import Admission
from api.errors import ApiError, NotAuthenticated, NotConfigured, ProxyForbidden
from api.publisher import Publisher
from api.settings import ApiSettings
from api.store.base import DeviceStore
from policies.forwarding import TOKEN_HEADER
from stores.ledger import Ledger


# `async def` although nothing is awaited: FastAPI runs plain `def` dependencies in a thread
# pool, a thread hop per request that profiling showed on the hot path.
async def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


async def get_store(request: Request) -> DeviceStore:
    store: DeviceStore = request.app.state.store
    return store


async def get_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


async def get_now() -> datetime:
    """The current time (UTC). A dependency so tests can move the clock: the bootstrap rotation
    rule (docs/CONTRACT.md §7) and its rate limit are decided against this value, never the wall
    clock."""
    return datetime.now(UTC)


async def get_admission(request: Request) -> Admission:
    admission: Admission = request.app.state.admission
    return admission


async def get_idempotency(request: Request) -> Ledger:
    """The ledger of Idempotency-Keys (api/idempotency.py)."""
    idempotency: Ledger = request.app.state.idempotency
    return idempotency


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
IdempotencyDep = Annotated[Ledger, Depends(get_idempotency)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
NowDep = Annotated[datetime, Depends(get_now)]
StoreDep = Annotated[DeviceStore, Depends(get_store)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]

# auto_error=False: these only declare the schemes for /docs; the checks below raise project
# errors so every failure has the same JSON body.
_bearer = HTTPBearer(auto_error=False, description="Management API key")
_proxy_token = APIKeyHeader(
    name=TOKEN_HEADER, auto_error=False, description="Shared token of the coap-bridge proxy"
)


def _same_secret(given: str, expected: str) -> bool:
    # Constant-time, so response timing does not reveal how much of a guess was right.
    return hmac.compare_digest(given.encode(), expected.encode())


def api_key_refusal(settings: ApiSettings, scheme: str, key: str) -> ApiError | None:
    """Why a management call with ``Authorization: <scheme> <key>`` is refused, if it is.
    Shared by :func:`require_api_key` and the guard that runs before the body is read
    (api/guard.py), so both answer alike."""
    if settings.api_key is None:
        return NotConfigured("management API disabled: no API key is configured")
    if scheme.lower() != "bearer" or not _same_secret(key, settings.api_key):
        return NotAuthenticated()
    return None


def proxy_refusal(settings: ApiSettings, token: str | None) -> ApiError | None:
    """Why a call that claims to come from the proxy is refused, if it is (docs/CONTRACT.md §11)."""
    if settings.proxy_token is None:
        return NotConfigured("ingest disabled: no proxy token configured")
    if token is None or not _same_secret(token, settings.proxy_token):
        return ProxyForbidden()
    return None


async def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Management endpoints: ``Authorization: Bearer <api_key>``."""
    scheme, key = (credentials.scheme, credentials.credentials) if credentials else ("", "")
    if (refusal := api_key_refusal(settings, scheme, key)) is not None:
        raise refusal


async def require_proxy(
    settings: SettingsDep,
    token: Annotated[str | None, Depends(_proxy_token)],
) -> None:
    """Endpoints that trust device identity headers: only the proxy may call them
    (docs/CONTRACT.md §11)."""
    if (refusal := proxy_refusal(settings, token)) is not None:
        raise refusal
