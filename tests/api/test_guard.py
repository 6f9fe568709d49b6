"""The guard's table (api/guard.py) against the routes themselves, the bounded JSON parser on
every route with a body (api/safe_json.py), and what an error may repeat (api/errors.py).

Issue 12: bodies were read and parsed before the caller was known, with no size limit; JSON
numbers were expanded without bound; a 422 repeated its whole input and a 404 its whole path.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from api.deps import require_api_key, require_proxy
from api.errors import ECHO_LIMIT, echo
from api.guard import Caller, rule_for
from api.safe_json import DecimalJsonRoute, SafeJsonRoute
from api.settings import ApiSettings
from api.store.memory import MemoryDeviceStore
from tests.api.conftest import ACTIVE, AUTH, PROXY_HEADERS, asgi_client, build_app

_APP = build_app(MemoryDeviceStore())
# Every route the app serves, those of included routers too (FastAPI includes them lazily).
_ROUTES = [
    context.original_route
    for context in iter_route_contexts(_APP.routes)
    if isinstance(context.original_route, APIRoute)
]
assert len(_ROUTES) >= 17, _ROUTES


def _label(route: APIRoute) -> str:
    return f"{sorted(route.methods)[0]} {route.path}"


def _caller_of(route: APIRoute) -> Caller:
    calls = {dependency.call for dependency in route.dependant.dependencies}
    if require_api_key in calls:
        return Caller.MANAGEMENT
    if require_proxy in calls:
        return Caller.PROXY
    return Caller.ANYONE


@pytest.mark.parametrize("route", _ROUTES, ids=[_label(route) for route in _ROUTES])
def test_the_guard_asks_for_what_the_route_asks_for(route: APIRoute) -> None:
    path = route.path.replace("{iccid}", ACTIVE)
    method = sorted(route.methods)[0]
    assert rule_for(path, method).caller is _caller_of(route)
    assert rule_for(path + "/", method).caller is _caller_of(route)  # the slash redirect too


@pytest.mark.parametrize(
    "route",
    [route for route in _ROUTES if route.body_field is not None],
    ids=[_label(route) for route in _ROUTES if route.body_field is not None],
)
def test_every_route_with_a_json_body_parses_it_at_a_bounded_cost(route: APIRoute) -> None:
    assert isinstance(route, SafeJsonRoute)


def test_location_degrees_stay_decimal() -> None:
    [put] = [r for r in _ROUTES if r.path.endswith("/location") and "PUT" in r.methods]
    assert isinstance(put, DecimalJsonRoute)


DEFAULTS = ApiSettings()


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("/ingest/batch", (65536 + 1024) * 256),
        ("/ingest", 65536),
        ("/bootstrap", 8192),
        ("/location", 8192),
        ("/devices", 8192),
        (f"/devices/{ACTIVE}/location", 8192),
        ("/onboarding/coap", 8192),
        ("/healthz", 8192),
        ("/no/such/path", 8192),
    ],
)
def test_body_caps(path: str, limit: int) -> None:
    assert rule_for(path).body_limit(DEFAULTS) == limit


def test_the_batch_cap_follows_the_proxys_max_batch_and_max_payload() -> None:
    settings = ApiSettings(max_batch=1024, max_payload=1000)
    assert rule_for("/ingest/batch").body_limit(settings) == (1000 + 1024) * 1024


# --- behaviour, in process -----------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(build_app(MemoryDeviceStore())) as client:
        yield client


async def test_a_chunked_body_within_the_cap_reaches_the_route_whole(
    api: httpx.AsyncClient,
) -> None:
    body = b'{"iccid": "%s", "ip": "10.1.2.3"}' % ACTIVE.encode()

    async def chunks() -> AsyncIterator[bytes]:
        for n in range(0, len(body), 5):
            yield body[n : n + 5]

    headers = {**AUTH, "Content-Type": "application/json"}
    created = await api.post("/devices", content=chunks(), headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["ip"] == "10.1.2.3"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no-key"),
        pytest.param({"Authorization": "Basic bWU6cHc="}, 401, id="other-scheme"),
        pytest.param({"Authorization": "Bearer wrong"}, 401, id="wrong-key"),
        pytest.param(PROXY_HEADERS, 401, id="proxy-token-is-no-key"),
    ],
)
async def test_management_refusals_keep_their_shape(
    api: httpx.AsyncClient, headers: dict[str, str], status: int
) -> None:
    response = await api.post("/devices", content=b"{}", headers=headers)
    assert response.status_code == status
    assert response.json() == {"detail": "missing or invalid bearer API key"}
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="coap-bridge"'


async def test_without_an_api_key_configured_management_is_503_before_the_body() -> None:
    app = build_app(MemoryDeviceStore(), api_key=None)
    async with asgi_client(app) as client:
        response = await client.post("/devices", content=b"x" * 100_000, headers=AUTH)
    assert response.status_code == 503
    assert "no API key" in response.json()["detail"]


async def test_a_404_repeats_only_a_clipped_piece_of_the_path(api: httpx.AsyncClient) -> None:
    for path in ("/devices/" + "9" * 10_000, "/devices/" + "9" * 10_000 + "/location"):
        response = await api.get(path, headers=AUTH)
        assert response.status_code == 404
        assert len(response.content) < 200, response.text[:300]


# --- what a 422 may repeat (pure) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param(None, None, id="null"),
        pytest.param(True, True, id="bool"),
        pytest.param(42, 42, id="int"),
        pytest.param(2**100, "<101-bit integer>", id="huge-int"),
        pytest.param(1.5, 1.5, id="float"),
        pytest.param(math.inf, "inf", id="inf"),
        pytest.param(Decimal("180"), 180, id="decimal-int"),
        pytest.param(Decimal("13.5"), 13.5, id="decimal-fraction"),
        pytest.param(Decimal("1e999999999"), "1E+999999999", id="decimal-huge"),
        pytest.param("x" * 1000, "x" * ECHO_LIMIT + "…", id="long-string"),
        pytest.param(b"\xff" * 3, "\ufffd" * 3, id="bytes"),
        pytest.param(list(range(20)), [*range(8), "…"], id="long-list"),
        pytest.param([[[[1]]]], [["…"]], id="deep-list"),
        pytest.param({"k" * 100: 1}, {"k" * ECHO_LIMIT + "…": 1}, id="long-key"),
    ],
)
def test_echo(value: object, shown: object) -> None:
    assert echo(value) == shown
