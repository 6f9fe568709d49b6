"""Downlink commands through the API (issue 15): the management routes, the proxy-facing
resource and its acknowledgement, status messages on a real broker, and the change feed.

The app runs for real (uvicorn with its lifespan, tests/support/http.py) on a real mosquitto
and, in turn, on its memory store and on a real redis-server; the clock of the commands
service is moved instead of sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt
import httpx
import pytest

from api.app import create_app
from api.commands import Commands
from api.feed import ChangeFeed
from api.guard import Caller, rule_for
from api.settings import ApiSettings
from policies.forwarding import TOKEN_HEADER
from tests.api.conftest import (
    ACTIVE,
    ACTIVE_IP,
    AUTH,
    INACTIVE,
    INACTIVE_IP,
    PROXY_HEADERS,
    make_settings,
    proxied,
    real_server,
)
from tests.support.mqtt import subscribed
from tests.support.services import MosquittoServer, RedisServer

START = 1_800_000_000.0
OTHER = "8988280666000000003"
OTHER_IP = "10.64.0.3"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    http: httpx.AsyncClient
    url: str
    clock: Clock
    commands: Commands
    mqtt_url: str

    async def submit(self, iccid: str = ACTIVE, **body: object) -> httpx.Response:
        return await self.http.post(f"/devices/{iccid}/commands", json=body, headers=AUTH)

    async def listed(self, iccid: str = ACTIVE) -> list[dict[str, object]]:
        answer = await self.http.get(f"/devices/{iccid}/commands", headers=AUTH)
        assert answer.status_code == 200, answer.text
        commands: list[dict[str, object]] = answer.json()["commands"]
        return commands

    async def fetch(self, iccid: str = ACTIVE, ip: str = ACTIVE_IP) -> httpx.Response:
        return await self.http.get(f"/commands/{iccid}", headers=proxied(ip))

    async def ack(
        self, command_id: str | None, iccid: str = ACTIVE, ip: str = ACTIVE_IP
    ) -> httpx.Response:
        headers = proxied(ip)
        if command_id is not None:
            headers["If-Match"] = f'"{command_id}"'
        return await self.http.delete(f"/commands/{iccid}", headers=headers)


@contextlib.asynccontextmanager
async def running_api(
    mosquitto: MosquittoServer, redis_url: str | None, **overrides: object
) -> AsyncIterator[Api]:
    settings = make_settings(
        mosquitto, redis_url=redis_url, redis_prefix="t", feed_keepalive=0.2, **overrides
    )
    app = create_app(settings)
    clock = Clock()
    app.state.commands.clock = clock
    async with (
        real_server(app) as url,
        httpx.AsyncClient(base_url=url, timeout=5) as http,
    ):
        for iccid, ip, status in (
            (ACTIVE, ACTIVE_IP, "active"),
            (INACTIVE, INACTIVE_IP, "inactive"),
            (OTHER, OTHER_IP, "active"),
        ):
            device = {"iccid": iccid, "ip": ip, "status": status}
            created = await http.post("/devices", json=device, headers=AUTH)
            assert created.status_code in (201, 409), created.text  # 409: the other replica
        yield Api(http, url, clock, app.state.commands, mosquitto.url)


@pytest.fixture(params=["memory", "redis"])
async def api(request: pytest.FixtureRequest, mosquitto: MosquittoServer) -> AsyncIterator[Api]:
    redis_url = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis_url = server.url
    async with running_api(
        mosquitto, redis_url, max_payload=64, max_commands_per_device=3
    ) as running:
        yield running


# --- management -----------------------------------------------------------------------------


async def test_a_json_command_is_queued_and_listed(api: Api) -> None:
    answer = await api.submit(payload={"led": "on", "n": [1, 2.5]}, ttl=600)
    assert answer.status_code == 201, answer.text
    command = answer.json()
    assert command["iccid"] == ACTIVE
    assert command["state"] == "queued"
    assert command["content_format"] == 50
    assert command["size"] == len(b'{"led":"on","n":[1,2.5]}')
    assert (command["created_at"], command["expires_at"]) == (START, START + 600)
    assert len(command["id"]) <= 8  # it fits a CoAP ETag option (RFC 7252 §5.10.6)
    [listed] = await api.listed()
    assert listed == command


async def test_bytes_and_defaults(api: Api) -> None:
    answer = await api.submit(payload_base64=base64.b64encode(b"\x00\xff\x10").decode())
    assert answer.status_code == 201, answer.text
    assert (answer.json()["content_format"], answer.json()["size"]) == (42, 3)
    assert answer.json()["expires_at"] == START + 86_400
    cbor = await api.submit(payload_base64="oWFhAQ==", content_format=60)
    assert cbor.json()["content_format"] == 60


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({}, None),
        ({"payload": 1, "payload_base64": "AA=="}, None),
        ({"payload_base64": "not base64!"}, "payload_base64"),
        ({"payload_base64": "AAA"}, "payload_base64"),
        ({"payload": 1, "content_format": 12345}, "content_format"),
        ({"payload": 1, "ttl": 0}, "ttl"),
        ({"payload": 1, "ttl": 2_592_001}, "ttl"),
        ({"payload": 1, "extra": True}, None),
    ],
)
async def test_a_bad_command_is_a_422_that_says_why(
    api: Api, body: dict[str, object], where: str | None
) -> None:
    answer = await api.http.post(f"/devices/{ACTIVE}/commands", json=body, headers=AUTH)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail
    assert all(item["msg"] for item in detail)
    if where is not None:
        assert any(where in item["loc"] for item in detail), detail
    assert await api.listed() == []


async def test_refusals_unknown_device_too_large_full_and_no_key(api: Api) -> None:
    unknown = await api.submit("8988280666000009999", payload=1)
    assert unknown.status_code == 404
    assert "not found" in unknown.json()["detail"]
    large = await api.submit(payload="x" * 63)  # 65 bytes as JSON text: max_payload is 64
    assert large.status_code == 413
    assert "at most 64" in large.json()["detail"]
    # The guard refuses a body over max_payload × 2 + 1 KiB before reading it.
    huge = await api.http.post(
        f"/devices/{ACTIVE}/commands", content=b"x" * (64 * 2 + 1025), headers=AUTH
    )
    assert huge.status_code == 413
    keyless = await api.http.post(f"/devices/{ACTIVE}/commands", json={"payload": 1})
    assert keyless.status_code == 401
    for n in range(3):
        assert (await api.submit(payload=n)).status_code == 201
    full = await api.submit(payload=3)
    assert full.status_code == 409
    assert "3 commands" in full.json()["detail"]
    assert [c["size"] for c in await api.listed()] == [1, 1, 1]
    assert (
        await api.http.get("/devices/8988280666000009999/commands", headers=AUTH)
    ).status_code == 404


# --- the device's resource, via the proxy --------------------------------------------------


async def test_the_device_gets_its_commands_in_order_one_at_a_time(api: Api) -> None:
    first = (await api.submit(payload={"a": 1}, ttl=100)).json()
    second = (await api.submit(payload_base64="AQI=", content_format=60)).json()
    topic = f"devices/{ACTIVE}/commands/+/status"
    async with subscribed(api.mqtt_url, topic) as statuses:
        api.clock.now += 5
        got = await api.fetch()
        assert got.status_code == 200
        assert got.content == b'{"a":1}'
        assert got.headers["content-type"] == "application/json"
        assert got.headers["etag"] == f'"{first["id"]}"'
        assert got.headers["cache-control"] == "max-age=95"
        again = await api.fetch()  # not acknowledged: the same one again, still sent once
        assert again.headers["etag"] == f'"{first["id"]}"'
        [sent] = await statuses.wait_for(1)
        assert str(sent.topic) == f"devices/{ACTIVE}/commands/{first['id']}/status"
        assert json.loads(sent.payload) == {"id": first["id"], "state": "sent", "at": START + 5}

        api.clock.now += 1
        assert (await api.ack(first["id"])).status_code == 204
        [_, delivered] = await statuses.wait_for(2)
        assert json.loads(delivered.payload) == {
            "id": first["id"],
            "state": "delivered",
            "at": START + 6,
        }
        nxt = await api.fetch()
        assert nxt.content == b"\x01\x02"
        assert nxt.headers["content-type"] == "application/cbor"
        assert nxt.headers["etag"] == f'"{second["id"]}"'
        await statuses.wait_for(3)
        await statuses.assert_silent(0.2)
    states = [(c["id"], c["state"], c["sent_at"], c["delivered_at"]) for c in await api.listed()]
    assert states == [
        (first["id"], "delivered", START + 5, START + 6),
        (second["id"], "sent", START + 6, None),
    ]


async def test_no_command_is_an_empty_200_without_etag(api: Api) -> None:
    empty = await api.fetch()
    assert empty.status_code == 200
    assert empty.content == b""
    assert "etag" not in empty.headers


async def test_acknowledgements_name_the_head(api: Api) -> None:
    first = (await api.submit(payload=1)).json()
    second = (await api.submit(payload=2)).json()
    missing = await api.ack(None)
    assert missing.status_code == 428
    assert "If-Match" in missing.json()["detail"]
    assert (await api.ack(second["id"])).status_code == 412  # not the head
    assert (await api.ack("nosuchid")).status_code == 412
    weak = await api.http.delete(
        f"/commands/{ACTIVE}", headers={**proxied(ACTIVE_IP), "If-Match": f'W/"{first["id"]}"'}
    )
    assert weak.status_code == 412  # RFC 9110 §13.1.1: If-Match compares strongly
    assert (await api.ack(first["id"])).status_code == 204
    assert (await api.ack(first["id"])).status_code == 412  # delivered already
    assert [c["state"] for c in await api.listed()] == ["delivered", "queued"]


async def test_only_the_device_itself_may_read_or_acknowledge(api: Api) -> None:
    mine = (await api.submit(payload=1)).json()
    assert (await api.fetch(ACTIVE, ip=OTHER_IP)).status_code == 403
    assert (await api.ack(mine["id"], ACTIVE, ip=OTHER_IP)).status_code == 403
    assert (await api.fetch(ACTIVE, ip="10.9.9.9")).status_code == 401  # unknown caller
    assert (await api.fetch(INACTIVE, ip=INACTIVE_IP)).status_code == 401  # not active
    no_token = await api.http.get(f"/commands/{ACTIVE}", headers={"Forwarded": "for=10.64.0.1"})
    assert no_token.status_code == 403
    # Over DTLS the PSK identity names the device, whatever its address.
    by_identity = await api.http.get(
        f"/commands/{ACTIVE}", headers=proxied("192.0.2.1", identity=ACTIVE)
    )
    assert by_identity.headers["etag"] == f'"{mine["id"]}"'
    assert [c["state"] for c in await api.listed()] == ["sent"]


async def test_an_expired_command_is_never_sent_and_its_status_says_so(api: Api) -> None:
    brief = (await api.submit(payload=1, ttl=10)).json()
    later = (await api.submit(payload=2, ttl=100)).json()
    async with subscribed(api.mqtt_url, f"devices/{ACTIVE}/commands/+/status") as statuses:
        api.clock.now += 10
        got = await api.fetch()
        assert got.headers["etag"] == f'"{later["id"]}"'
        assert got.headers["cache-control"] == "max-age=90"
        [expired, sent] = await statuses.wait_for(2)
        assert json.loads(expired.payload) == {
            "id": brief["id"],
            "state": "expired",
            "at": START + 10,
        }
        assert json.loads(sent.payload)["state"] == "sent"
    assert (await api.ack(brief["id"])).status_code == 412
    assert [c["state"] for c in await api.listed()] == ["expired", "sent"]


# --- the change feed ------------------------------------------------------------------------


class Feed:
    """A client of ``GET /observe/events``: a task reads the raw stream line by line (None
    when it ended), so a wait that times out loses nothing."""

    def __init__(self) -> None:
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()

    async def pump(self, lines: AsyncIterator[str]) -> None:
        try:
            async for line in lines:
                self.lines.put_nowait(line)
        finally:
            self.lines.put_nowait(None)

    async def _line(self) -> str:
        line = await self.lines.get()
        if line is None:
            self.lines.put_nowait(None)
            raise EOFError
        return line

    async def next_event(self, timeout: float = 3.0) -> tuple[str, str]:
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            while True:
                line = await self._line()
                if line == "" and fields:
                    return fields.get("event", ""), fields.get("data", "")
                if line and not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value

    async def comment(self, timeout: float = 3.0) -> str:
        async with asyncio.timeout(timeout):
            while not (line := await self._line()).startswith(":"):
                pass
        return line

    async def assert_quiet(self, within: float = 0.5) -> None:
        """No event (comments are fine) for ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            event = await self.next_event(within)
            raise AssertionError(f"unexpected event {event}")

    async def ended(self, timeout: float = 5.0) -> bool:
        async with asyncio.timeout(timeout):
            while await self.lines.get() is not None:
                pass
        return True


@contextlib.asynccontextmanager
async def feed(url: str) -> AsyncIterator[Feed]:
    headers = {**PROXY_HEADERS, "Accept": "text/event-stream"}
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5, read=None)) as http,
        http.stream("GET", "/observe/events", headers=headers) as answer,
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        reader = Feed()
        task = asyncio.create_task(reader.pump(answer.aiter_lines()))
        try:
            assert await reader._line() == ": connected"  # registered before the answer
            yield reader
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await task


async def test_the_feed_announces_head_changes_only(api: Api) -> None:
    path = f"/commands/{ACTIVE}"
    async with feed(api.url) as events:
        first = (await api.submit(payload=1)).json()
        assert await events.next_event() == ("changed", path)
        await api.submit(payload=2)  # behind the head: nothing to tell
        await api.fetch()  # becoming sent does not change the representation's command
        await events.assert_quiet(0.3)
        assert (await api.ack(first["id"])).status_code == 204
        assert await events.next_event() == ("changed", path)
        other = (await api.submit(OTHER, payload=3)).json()
        assert await events.next_event() == ("changed", f"/commands/{OTHER}")
        assert other["iccid"] == OTHER


async def test_an_idle_feed_gets_keep_alive_comments(api: Api) -> None:
    async with feed(api.url) as events:
        assert await events.comment() == ": keep-alive"


async def test_the_expiry_of_the_head_is_announced(api: Api) -> None:
    await api.submit(payload=1, ttl=10)
    async with feed(api.url) as events:
        api.clock.now += 11
        assert await api.listed()  # any operation on the queue finds it expired
        assert await events.next_event() == ("changed", f"/commands/{ACTIVE}")


async def test_the_feed_needs_the_proxy_token(api: Api) -> None:
    answer = await api.http.get("/observe/events", headers={TOKEN_HEADER: "wrong"})
    assert answer.status_code == 403
    assert (await api.http.get("/observe/events")).status_code == 403


async def test_every_replica_relays_every_announcement(
    mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    async with (
        running_api(mosquitto, redis_server.url) as one,
        running_api(mosquitto, redis_server.url) as two,
        feed(one.url) as on_one,
        feed(two.url) as on_two,
    ):
        two.clock.now = one.clock.now
        queued = (await two.submit(payload=1)).json()  # queued through replica two
        for events in (on_one, on_two):
            assert await events.next_event() == ("changed", f"/commands/{ACTIVE}")
        # Replica one serves the same queue: the device reads and acknowledges there.
        got = await one.fetch()
        assert got.headers["etag"] == f'"{queued["id"]}"'
        assert (await one.ack(queued["id"])).status_code == 204
        for events in (on_one, on_two):
            assert await events.next_event() == ("changed", f"/commands/{ACTIVE}")


async def test_losing_redis_ends_the_feeds_and_refuses_new_ones_until_it_is_back(
    mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    async with running_api(mosquitto, redis_server.url) as api:
        async with feed(api.url) as events:
            redis_server.stop()
            assert await events.ended()  # the proxy reconnects and re-reads everything
        refused = await api.http.get("/observe/events", headers=PROXY_HEADERS)
        assert refused.status_code == 503
        assert "Redis" in refused.json()["detail"]
        assert (await api.submit(payload=1)).status_code == 503
        redis_server.start()  # empty: it keeps nothing on disk in these tests
        device = {"iccid": ACTIVE, "ip": ACTIVE_IP}
        assert (await api.http.post("/devices", json=device, headers=AUTH)).status_code == 201
        async with feed(api.url) as events:
            assert (await api.submit(payload=1)).status_code == 201
            assert await events.next_event(timeout=10) == ("changed", f"/commands/{ACTIVE}")


async def test_without_redis_announcements_stay_in_the_process() -> None:
    changes = ChangeFeed(None)
    listener = changes.listen()
    await changes.announce("/commands/1")
    assert listener.queue.get_nowait() == "/commands/1"
    changes.forget(listener)
    await changes.announce("/commands/2")
    assert listener.queue.empty()
    assert await changes.ready()
    await changes.close()


async def test_commands_from_mqtt_and_http_queue_in_arrival_order(api: Api) -> None:
    port = int(api.mqtt_url.rsplit(":", 1)[1])
    async with feed(api.url) as events, aiomqtt.Client("127.0.0.1", port) as client:
        await client.publish(f"devices/{ACTIVE}/commands", b"\x05\x06", qos=1)
        assert await events.next_event() == ("changed", f"/commands/{ACTIVE}")  # it is queued
        second = (await api.submit(payload=1)).json()
    from_mqtt, from_http = await api.listed()
    assert (from_mqtt["content_format"], from_mqtt["size"]) == (42, 2)
    assert from_http["id"] == second["id"]
    assert (await api.fetch()).content == b"\x05\x06"
    assert (await api.ack(str(from_mqtt["id"]))).status_code == 204
    assert (await api.fetch()).content == b"1"


def test_the_guard_knows_the_new_paths() -> None:
    defaults = ApiSettings()
    submit = rule_for(f"/devices/{ACTIVE}/commands")
    assert (submit.caller, submit.body_limit(defaults)) == (Caller.MANAGEMENT, 65536 * 2 + 1024)
    assert rule_for(f"/devices/{ACTIVE}/commands/").caller is Caller.MANAGEMENT
    assert rule_for(f"/devices/{ACTIVE}/location").body_limit(defaults) == 8192
    for path in (f"/commands/{ACTIVE}", "/observe/events"):
        assert (rule_for(path).caller, rule_for(path).body_limit(defaults)) == (Caller.PROXY, 8192)
