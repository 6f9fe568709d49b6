"""The signed-session device side (api/routes/sessions.py) on a real broker: the auth message
and its sign, telemetry inside a session, replays, and what reaches MQTT."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from stores.registry import AuthOutcome
from tests.api.conftest import proxied
from tests.api.signed_support import SignedApp, register, sign_of, signed_app
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer

PK, DK = "Pk0001", "869181072798893"
DEVICE = f"{PK}:{DK}"
IP, OTHER_IP = "10.64.1.1", "10.64.1.2"
AUTH_PATH = f"/auth/{PK}/{DK}"
MEASURE = f"/topic/sys/{PK}/{DK}/thing/measurepoint/post"
RAW = f"/topic/sys/{PK}/{DK}/thing/model/up_raw"


@pytest.fixture(params=["memory", "redis"])
async def signed(
    request: pytest.FixtureRequest, mosquitto: MosquittoServer
) -> AsyncIterator[SignedApp]:
    redis_url = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_server").url
    async with signed_app(mosquitto, redis_url=redis_url) as built:
        yield built


def auth_body(secret: str, lifetime: int = 60, sign: str | None = None) -> bytes:
    message = {
        "secureMode": 2,
        "lifetime": lifetime,
        "sign": sign if sign is not None else sign_of(PK, DK, lifetime, secret),
    }
    return json.dumps(message).encode()


async def test_a_signed_auth_opens_a_session_and_telemetry_reaches_mqtt(
    signed: SignedApp, mosquitto: MosquittoServer
) -> None:
    secret = await register(signed.http, PK, DK)
    http = signed.http
    answer = await http.post(AUTH_PATH, content=auth_body(secret), headers=proxied(IP))
    assert (answer.status_code, answer.content) == (200, b"")
    payload = b'{"measurepoints":{"temp":21.5},"time":1700000000000}'
    async with subscribed(mosquitto.url, f"devices/{DEVICE}/messages") as messages:
        answer = await http.post(
            MEASURE,
            content=payload,
            headers={**proxied(IP, 40123), "Content-Type": "application/json"},
        )
        assert answer.status_code == 204, answer.text
        [message] = await messages.wait_for(1)
    assert message.payload == payload
    properties = dict(message.properties.UserProperty)  # type: ignore[union-attr]
    assert properties["device"] == DEVICE
    assert properties["product-key"] == PK
    assert properties["device-key"] == DK
    assert properties["resource"] == "thing/measurepoint/post"
    assert properties["source"] == f"{IP}:40123"
    assert properties["content-format"] == "50"


async def test_raw_bytes_are_published_as_sent(
    signed: SignedApp, mosquitto: MosquittoServer
) -> None:
    secret = await register(signed.http, PK, DK)
    await signed.http.post(AUTH_PATH, content=auth_body(secret), headers=proxied(IP))
    payload = bytes(range(256))
    async with subscribed(mosquitto.url, f"devices/{DEVICE}/messages") as messages:
        answer = await signed.http.post(RAW, content=payload, headers=proxied(IP))
        assert answer.status_code == 204
        [message] = await messages.wait_for(1)
    assert message.payload == payload


async def test_a_sign_one_character_off_is_refused(signed: SignedApp) -> None:
    secret = await register(signed.http, PK, DK)
    good = sign_of(PK, DK, 60, secret)
    bad = good[:-1] + ("0" if good[-1] != "0" else "1")
    answer = await signed.http.post(
        AUTH_PATH, content=auth_body(secret, sign=bad), headers=proxied(IP)
    )
    assert answer.status_code == 401
    # The right sign for another lifetime is no sign for this one.
    wrong = auth_body(secret, lifetime=61, sign=good)
    assert (
        await signed.http.post(AUTH_PATH, content=wrong, headers=proxied(IP))
    ).status_code == 401
    # No session was opened by either.
    assert (await signed.http.post(RAW, content=b"x", headers=proxied(IP))).status_code == 401


async def test_a_lower_case_sign_is_the_same_sign(signed: SignedApp) -> None:
    secret = await register(signed.http, PK, DK)
    body = auth_body(secret, sign=sign_of(PK, DK, 60, secret).lower())
    assert (await signed.http.post(AUTH_PATH, content=body, headers=proxied(IP))).status_code == 200


async def test_unknown_product_or_device_is_401(signed: SignedApp) -> None:
    secret = await register(signed.http, PK, DK)
    body = auth_body(secret)
    for path in (f"/auth/Other/{DK}", f"/auth/{PK}/other", f"/auth/{PK}/bad%20key", "/auth/_x/y"):
        answer = await signed.http.post(path, content=body, headers=proxied(IP))
        assert answer.status_code == 401, path


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1,2]",
        b'{"secureMode":2,"lifetime":60}',
        b'{"secureMode":3,"lifetime":60,"sign":"' + b"A" * 64 + b'"}',
        b'{"secureMode":2,"lifetime":29,"sign":"' + b"A" * 64 + b'"}',
        b'{"secureMode":2,"lifetime":86401,"sign":"' + b"A" * 64 + b'"}',
        b'{"secureMode":2,"lifetime":"60","sign":"' + b"A" * 64 + b'"}',
        b'{"secureMode":2,"lifetime":60.0,"sign":"' + b"A" * 64 + b'"}',
        b'{"secureMode":true,"lifetime":60,"sign":"' + b"A" * 64 + b'"}',
        b'{"secureMode":2,"lifetime":60,"sign":"' + b"A" * 63 + b'"}',
        b'{"secureMode":2,"lifetime":60,"sign":"' + b"G" * 64 + b'"}',
        b"",
    ],
)
async def test_a_malformed_auth_message_is_400(signed: SignedApp, body: bytes) -> None:
    await register(signed.http, PK, DK)
    answer = await signed.http.post(AUTH_PATH, content=body, headers=proxied(IP))
    assert answer.status_code == 400
    assert answer.json()["detail"]


async def test_the_lifetime_bounds_are_inclusive(signed: SignedApp) -> None:
    secret = await register(signed.http, PK, DK)
    for lifetime in (30, 86_400):
        body = auth_body(secret, lifetime=lifetime)
        assert (
            await signed.http.post(AUTH_PATH, content=body, headers=proxied(IP))
        ).status_code == 200


async def test_telemetry_outside_a_session_is_401(signed: SignedApp) -> None:
    secret = await register(signed.http, PK, DK)
    assert (await signed.http.post(MEASURE, content=b"{}", headers=proxied(IP))).status_code == 401
    await signed.http.post(AUTH_PATH, content=auth_body(secret, 30), headers=proxied(IP))
    # From another address: not the session's.
    assert (
        await signed.http.post(MEASURE, content=b"{}", headers=proxied(OTHER_IP))
    ).status_code == 401
    # Silent for its lifetime: the session is over.
    signed.clock.now += 31
    assert (await signed.http.post(MEASURE, content=b"{}", headers=proxied(IP))).status_code == 401
    # Without the proxy's token: refused before anything.
    assert (await signed.http.post(MEASURE, content=b"{}")).status_code == 403


async def test_measure_points_that_are_not_json_are_400(signed: SignedApp) -> None:
    secret = await register(signed.http, PK, DK)
    await signed.http.post(AUTH_PATH, content=auth_body(secret), headers=proxied(IP))
    answer = await signed.http.post(MEASURE, content=b"{not json", headers=proxied(IP))
    assert answer.status_code == 400


async def test_messages_keep_the_session_alive_and_a_replay_cannot(signed: SignedApp) -> None:
    secret = await register(signed.http, PK, DK)
    http, clock = signed.http, signed.clock
    body = auth_body(secret, 30)
    assert (await http.post(AUTH_PATH, content=body, headers=proxied(IP))).status_code == 200
    for _ in range(3):  # 60 s in all, a message every 20 s: the session slides
        clock.now += 20
        assert (await http.post(RAW, content=b"x", headers=proxied(IP))).status_code == 204
    # The same auth again changes nothing; from elsewhere it moves the session there.
    assert (await http.post(AUTH_PATH, content=body, headers=proxied(IP))).status_code == 200
    assert (await http.post(AUTH_PATH, content=body, headers=proxied(OTHER_IP))).status_code == 200
    assert (await http.post(RAW, content=b"x", headers=proxied(IP))).status_code == 401
    assert (await http.post(AUTH_PATH, content=body, headers=proxied(IP))).status_code == 200
    assert (await http.post(RAW, content=b"x", headers=proxied(IP))).status_code == 204
    # The session ends. A captured copy of the auth, replayed: one session …
    clock.now += 31
    assert (await http.post(AUTH_PATH, content=body, headers=proxied(OTHER_IP))).status_code == 200
    # … which nobody uses; after it, the copy opens nothing.
    clock.now += 31
    assert (await http.post(AUTH_PATH, content=body, headers=proxied(OTHER_IP))).status_code == 401
    # The device itself, with another lifetime (another sign), is let in.
    fresh = auth_body(secret, 45)
    assert (await http.post(AUTH_PATH, content=fresh, headers=proxied(IP))).status_code == 200


async def test_an_auth_that_is_answered_same_does_not_extend(signed: SignedApp) -> None:
    secret = await register(signed.http, PK, DK)
    registry = signed.app.state.registry
    await signed.http.post(AUTH_PATH, content=auth_body(secret, 30), headers=proxied(IP))
    signed.clock.now += 20
    sign = sign_of(PK, DK, 30, secret)
    assert (
        await registry.open_session(DEVICE, sign, IP, 30, now=signed.clock.now) is AuthOutcome.SAME
    )
    signed.clock.now += 11
    assert (await signed.http.post(RAW, content=b"x", headers=proxied(IP))).status_code == 401


async def test_broker_down_is_503_and_auth_still_works(
    signed: SignedApp, mosquitto: MosquittoServer
) -> None:
    secret = await register(signed.http, PK, DK)
    mosquitto.stop()
    # The online status cannot be published: the auth is answered all the same.
    answer = await signed.http.post(AUTH_PATH, content=auth_body(secret), headers=proxied(IP))
    assert answer.status_code == 200
    answer = await signed.http.post(RAW, content=b"x", headers=proxied(IP))
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
