"""The web console (api/console/) over HTTP: sign-in and its cookie, refusals (no session,
another origin), each operation against the real store, "send as device" and the live view on
a real Mosquitto, and the live view's bounds.

The browser's own run through the console is tests/integration/test_console_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from api.app import create_app
from api.console.auth import COOKIE, SESSION_LIFETIME, session_token, valid_session
from api.console.live import LiveHub, filters_overlap, telemetry_filter
from api.publisher import MqttPublisher
from api.settings import ApiSettings
from api.store.base import Device
from api.store.memory import MemoryDeviceStore
from tests.api.conftest import (
    ACTIVE,
    ACTIVE_IP,
    API_KEY,
    INACTIVE,
    asgi_client,
    build_app,
    make_settings,
    real_server,
)
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer

ORIGIN = {"Origin": "http://api"}
OTHER_ID = "koru-869181072798893"


async def signed_in(http: httpx.AsyncClient, key: str = API_KEY) -> httpx.Response:
    origin = str(http.base_url).rstrip("/")
    response = await http.post("/console/login", data={"key": key}, headers={"Origin": origin})
    assert response.status_code == 303, response.text
    return response


def _cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={token}"}


async def stored(store: MemoryDeviceStore, device_id: str = ACTIVE) -> Device:
    """The device as the store holds it now; it must be there."""
    device = await store.get(device_id)
    assert device is not None, device_id
    return device


@pytest.fixture
async def store() -> MemoryDeviceStore:
    devices = MemoryDeviceStore()
    await devices.create(Device(iccid=ACTIVE, ip=ACTIVE_IP))
    await devices.create(Device(iccid=INACTIVE, ip="10.64.0.2", status="inactive"))
    return devices


@pytest.fixture
async def console(store: MemoryDeviceStore) -> AsyncIterator[httpx.AsyncClient]:
    """Signed in, on an app without a broker (these operations never publish)."""
    async with asgi_client(build_app(store)) as http:
        await signed_in(http)
        yield http


# --- sign-in ---------------------------------------------------------------------------------


async def test_sign_in_sets_a_strict_http_only_cookie_derived_from_the_key(
    store: MemoryDeviceStore,
) -> None:
    async with asgi_client(build_app(store)) as http:
        response = await signed_in(http)
    assert response.headers["location"] == "/console"
    cookie = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert "Path=/console" in cookie
    assert "SameSite=strict" in cookie
    assert f"Max-Age={SESSION_LIFETIME}" in cookie
    token = response.cookies[COOKIE]
    assert API_KEY not in token
    assert valid_session(API_KEY, token)
    assert not valid_session("another key", token)  # a changed key ends every session


async def test_a_wrong_key_is_401_and_the_sign_in_form_again(store: MemoryDeviceStore) -> None:
    async with asgi_client(build_app(store)) as http:
        response = await http.post("/console/login", data={"key": "guess"}, headers=ORIGIN)
        assert response.status_code == 401
        assert "Wrong key" in response.text
        assert 'name="key"' in response.text
        assert COOKIE not in response.headers.get("set-cookie", "")
        empty = await http.post("/console/login", data={"key": ""}, headers=ORIGIN)
        assert empty.status_code == 401
        assert (await http.get("/console")).status_code == 303


async def test_without_an_api_key_the_console_says_it_is_off(store: MemoryDeviceStore) -> None:
    async with asgi_client(build_app(store, api_key=None)) as http:
        page = await http.get("/console/login")
        assert page.status_code == 503
        assert "no management API key is configured" in page.text
        login = await http.post("/console/login", data={"key": "x"}, headers=ORIGIN)
        assert login.status_code == 503
        assert (await http.get("/console")).status_code == 503


async def test_pages_without_a_session_go_to_the_sign_in_form(store: MemoryDeviceStore) -> None:
    async with asgi_client(build_app(store)) as http:
        for path in ("/console", f"/console/devices/{ACTIVE}", "/console/live"):
            response = await http.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == "/console/login"
        events = await http.get("/console/live/events")
        assert events.status_code == 401
        # A form without a session changes nothing.
        posted = await http.post(
            f"/console/devices/{ACTIVE}/psk", data={"psk": "aB3dEf7hIjKlMnOp"}, headers=ORIGIN
        )
        assert posted.status_code == 401
        assert "sign in again" in posted.text
    assert (await stored(store)).psk is None


@pytest.mark.parametrize(
    "token",
    [
        session_token("not the key"),
        session_token(API_KEY, int(time.time()) - SESSION_LIFETIME - 1),  # expired
        session_token(API_KEY, int(time.time()) + 3600),  # from the future
        "garbage",
        f"{int(time.time())}.",
    ],
    ids=["other key", "expired", "future", "garbage", "no mac"],
)
async def test_a_forged_or_stale_cookie_is_no_session(store: MemoryDeviceStore, token: str) -> None:
    async with asgi_client(build_app(store)) as http:
        assert (await http.get("/console", headers=_cookie(token))).status_code == 303
        valid = session_token(API_KEY)
        assert (await http.get("/console", headers=_cookie(valid))).status_code == 200


# --- cross-site requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://api.evil"}],
    ids=["no origin", "other site", "null", "suffix"],
)
async def test_a_post_from_another_origin_is_403_and_changes_nothing(
    console: httpx.AsyncClient, store: MemoryDeviceStore, headers: dict[str, str]
) -> None:
    response = await console.post(
        f"/console/devices/{ACTIVE}/psk", data={"psk": "aB3dEf7hIjKlMnOp"}, headers=headers
    )
    assert response.status_code == 403
    assert "Refused" in response.text
    assert (await stored(store)).psk is None
    registered = await console.post("/console/devices", data={"id": OTHER_ID}, headers=headers)
    assert registered.status_code == 403
    assert await store.get(OTHER_ID) is None


async def test_sign_in_from_another_origin_is_403(store: MemoryDeviceStore) -> None:
    async with asgi_client(build_app(store)) as http:
        response = await http.post(
            "/console/login", data={"key": API_KEY}, headers={"Origin": "http://evil.example"}
        )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


# --- devices -----------------------------------------------------------------------------------


async def test_the_list_shows_devices_and_searches(console: httpx.AsyncClient) -> None:
    page = await console.get("/console")
    assert page.status_code == 200
    assert ACTIVE in page.text
    assert INACTIVE in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'href="/docs"' in page.text
    found = await console.get("/console", params={"q": "10.64.0.2"})
    assert INACTIVE in found.text
    assert ACTIVE not in found.text


async def test_user_input_is_escaped(console: httpx.AsyncClient) -> None:
    page = await console.get("/console", params={"q": '"><script>alert(1)</script>'})
    assert "<script>alert(1)" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    missing = await console.get('/console/devices/<img src="x" onerror="alert(1)">')
    assert missing.status_code == 404
    assert "<img src" not in missing.text
    assert "&lt;img src=&quot;x&quot; onerror=&quot;alert(1)&quot;&gt;" in missing.text


async def test_register_a_device_and_see_its_page(
    console: httpx.AsyncClient, store: MemoryDeviceStore
) -> None:
    response = await console.post(
        "/console/devices", data={"id": OTHER_ID, "imei": "869181072798893"}, headers=ORIGIN
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/console/devices/{OTHER_ID}?done=registered"
    device = await stored(store, OTHER_ID)
    assert device.imei == "869181072798893"
    page = await console.get(response.headers["location"])
    assert "Device registered." in page.text
    assert "869181072798893" in page.text


async def test_register_refusals_say_why(console: httpx.AsyncClient) -> None:
    bad = await console.post(
        "/console/devices", data={"iccid": "123", "ip": "1.2.3.4"}, headers=ORIGIN
    )
    assert bad.status_code == 422
    assert "iccid must be 19 or 20 digits" in bad.text
    taken = await console.post(
        "/console/devices", data={"iccid": ACTIVE, "ip": "10.9.9.9"}, headers=ORIGIN
    )
    assert taken.status_code == 409
    assert "Not registered" in taken.text


# --- PSK operations ----------------------------------------------------------------------------


async def test_set_and_revoke_a_psk(console: httpx.AsyncClient, store: MemoryDeviceStore) -> None:
    response = await console.post(
        f"/console/devices/{ACTIVE}/psk", data={"psk": "aB3dEf7hIjKlMnOp"}, headers=ORIGIN
    )
    assert response.status_code == 303
    device = await stored(store)
    assert device.psk == "aB3dEf7hIjKlMnOp"
    assert device.psk_user_set
    page = await console.get(response.headers["location"])
    assert "PSK set" in page.text
    assert "aB3dEf7hIjKlMnOp" not in page.text  # never shown back
    revoked = await console.post(f"/console/devices/{ACTIVE}/psk/revoke", headers=ORIGIN)
    assert revoked.status_code == 303
    assert (await stored(store)).psk is None


async def test_a_bad_psk_is_refused_without_repeating_it(
    console: httpx.AsyncClient, store: MemoryDeviceStore
) -> None:
    response = await console.post(
        f"/console/devices/{ACTIVE}/psk",
        data={"psk": "zz-not-hex", "format": "hex"},
        headers=ORIGIN,
    )
    assert response.status_code == 422
    assert "PSK not set" in response.text
    assert "zz-not-hex" not in response.text
    assert (await stored(store)).psk is None


async def test_a_generated_psk_is_shown_once(
    console: httpx.AsyncClient, store: MemoryDeviceStore
) -> None:
    response = await console.post(
        f"/console/devices/{ACTIVE}/credentials", data={"key_format": "hex64"}, headers=ORIGIN
    )
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    device = await stored(store)
    assert device.psk is not None
    assert len(device.psk) == 64
    assert f'<code id="issued-key">{device.psk}</code>' in response.text
    again = await console.get(f"/console/devices/{ACTIVE}")
    assert device.psk not in again.text


async def test_operations_on_an_unknown_device_are_404(console: httpx.AsyncClient) -> None:
    for action, data in (
        ("psk", {"psk": "aB3dEf7hIjKlMnOp"}),
        ("psk/revoke", {}),
        ("credentials", {}),
    ):
        response = await console.post(
            f"/console/devices/nobody/{action}", data=data, headers=ORIGIN
        )
        assert response.status_code == 404, action


# --- location ----------------------------------------------------------------------------------


async def test_set_a_location(console: httpx.AsyncClient, store: MemoryDeviceStore) -> None:
    response = await console.post(
        f"/console/devices/{ACTIVE}/location",
        data={"latitude": "52.520008", "longitude": "13.404954", "source": "GPS"},
        headers=ORIGIN,
    )
    assert response.status_code == 303, response.text
    device = await stored(store)
    assert device.location is not None
    assert (device.location.latitude, device.location.longitude) == ("52.520008", "13.404954")
    page = await console.get(f"/console/devices/{ACTIVE}")
    assert "52.520008, 13.404954" in page.text
    bad = await console.post(
        f"/console/devices/{ACTIVE}/location",
        data={"latitude": "91", "longitude": "0", "source": "GPS"},
        headers=ORIGIN,
    )
    assert bad.status_code == 422
    assert "latitude" in bad.text


# --- send as device and the live view, on a real broker ------------------------------------------


@pytest.fixture
async def broker_app(
    mosquitto: MosquittoServer, store: MemoryDeviceStore
) -> AsyncIterator[tuple[str, LiveHub]]:
    """The app on a real socket (uvicorn, its lifespan) and the test broker; the live view
    bounded to one viewer and three queued events."""
    settings = make_settings(mosquitto)
    publisher = MqttPublisher.from_settings(settings)
    await publisher.start()
    app = create_app(settings, store=store, publisher=publisher)
    hub = LiveHub(settings, max_viewers=1, queue_size=3)
    app.state.console_live = hub
    try:
        async with real_server(app) as url:
            yield url, hub
    finally:
        await publisher.close()


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, object]]]:
    name = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


async def test_send_as_device_publishes_as_the_device_would(
    broker_app: tuple[str, LiveHub], mosquitto: MosquittoServer
) -> None:
    url, _ = broker_app
    async with httpx.AsyncClient(base_url=url) as http:
        await signed_in(http)
        async with subscribed(mosquitto.url, f"devices/{ACTIVE}/messages") as sub:
            response = await http.post(
                f"/console/devices/{ACTIVE}/send",
                data={"payload": '{"t": 21.5}', "content_type": "application/json"},
                headers={"Origin": url},
            )
            assert response.status_code == 303, response.text
            assert response.headers["location"].endswith("?done=sent")
            [message] = await sub.wait_for(1)
        refused = await http.post(
            f"/console/devices/{INACTIVE}/send", data={"payload": "x"}, headers={"Origin": url}
        )
        assert refused.status_code == 409
        assert "inactive" in refused.text
    assert message.payload == b'{"t": 21.5}'
    assert message.qos == 1
    assert message.properties is not None
    props = dict(message.properties.UserProperty)
    assert props["iccid"] == ACTIVE
    assert props["device"] == ACTIVE
    assert props["content-format"] == "50"
    assert props["source"].startswith("127.0.0.1:")


async def test_the_live_view_shows_published_messages_and_caps_viewers(
    broker_app: tuple[str, LiveHub],
) -> None:
    url, _hub = broker_app
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        await signed_in(http)
        async with http.stream("GET", "/console/live/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = _events(stream)
            name, hello = await anext(events)
            assert (name, hello["filter"]) == ("hello", "devices/+/messages")
            # A second viewer is over this hub's cap of one.
            second = await http.get("/console/live/events")
            assert second.status_code == 503
            assert "1 live views are open" in second.text
            sent = await http.post(
                f"/console/devices/{ACTIVE}/send",
                data={
                    "payload": "00ff",
                    "encoding": "hex",
                    "content_type": "application/octet-stream",
                },
                headers={"Origin": url},
            )
            assert sent.status_code == 303
            name, message = await asyncio.wait_for(anext(events), 5)
    assert name == "message"
    assert message["topic"] == f"devices/{ACTIVE}/messages"
    assert message["device"] == ACTIVE
    assert (message["payload"], message["encoding"], message["size"]) == ("00ff", "hex", 2)
    assert message["dropped"] == 0


async def test_a_slow_viewer_keeps_the_newest_events_and_counts_the_dropped() -> None:
    hub = LiveHub(ApiSettings(), max_viewers=2, queue_size=3)
    viewer = hub.join()
    for n in range(10):
        await hub.on_message(f"devices/dev{n}/messages", str(n).encode(), {})
    stream = hub.stream(viewer)
    assert (await anext(stream)).startswith(b"retry: 2000\nevent: hello\n")
    chunk = (await anext(stream)).decode()
    shown = [json.loads(line[6:]) for line in chunk.splitlines() if line.startswith("data: ")]
    assert [event["payload"] for event in shown] == ["7", "8", "9"]
    assert [event["device"] for event in shown] == ["dev7", "dev8", "dev9"]
    assert {event["dropped"] for event in shown} == {7}
    await stream.aclose()
    assert viewer not in hub.viewers  # its slot is free again


async def test_the_viewer_cap_and_a_handler_that_never_raises() -> None:
    hub = LiveHub(ApiSettings(), max_viewers=1, queue_size=2)
    hub.join()
    with pytest.raises(Exception, match="1 live views are open"):
        hub.join()
    await hub.on_message("devices/x/messages", b"\xff" * 5000, {})  # cut, hex, no exception
    [viewer] = hub.viewers
    [event] = viewer.events
    assert event["truncated"] is True
    assert event["encoding"] == "hex"
    assert event["size"] == 5000


def test_the_live_filter_follows_the_topic_template() -> None:
    assert telemetry_filter("devices/{iccid}/messages") == ("devices/+/messages", 1)
    assert telemetry_filter("t/{device}") == ("t/+", 1)
    with pytest.raises(ValueError, match="not a whole level"):
        telemetry_filter("dev-{iccid}/x")
    assert filters_overlap("devices/+/commands", "devices/+/+")
    assert not filters_overlap("devices/+/messages", "devices/+/commands")
    hub = LiveHub(ApiSettings(topic_template="devices/{iccid}/commands"))
    assert hub.problem is not None
    assert "overlaps the command filter" in hub.problem


async def test_a_session_from_one_replica_works_on_another(store: MemoryDeviceStore) -> None:
    # Two API processes with the same key and nothing shared but the store: the cookie is
    # derived from the key, so either verifies the other's.
    async with asgi_client(build_app(store)) as first, asgi_client(build_app(store)) as second:
        token = (await signed_in(first)).cookies[COOKIE]
        assert (await second.get("/console", headers=_cookie(token))).status_code == 200
    async with asgi_client(build_app(store, api_key="a new key")) as rotated:
        assert (await rotated.get("/console", headers=_cookie(token))).status_code == 303


async def test_a_console_body_over_the_guards_cap_is_413_unread(console: httpx.AsyncClient) -> None:
    limit = ApiSettings().max_payload * 6 + 4096
    response = await console.post(
        "/console/devices",
        content=b"x" * (limit + 1),
        headers={**ORIGIN, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413


async def test_a_form_in_another_encoding_is_415(console: httpx.AsyncClient) -> None:
    response = await console.post("/console/devices", json={"id": OTHER_ID}, headers=ORIGIN)
    assert response.status_code == 415
    assert "application/x-www-form-urlencoded" in response.text


async def test_without_an_mqtt_link_the_live_view_says_so(console: httpx.AsyncClient) -> None:
    response = await console.get("/console/live/events")
    assert response.status_code == 503
    assert "needs the API's MQTT connection" in response.text
