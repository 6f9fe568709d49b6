"""Which routes plain CoAP reaches in production mode (require_dtls), per profile: the ones
marked ``plain`` (docs/CONTRACT.md §6, docs/PROFILES.md), over a real UDP socket to the real
proxy, with a real HTTP backend of the test's own behind it that records what arrives."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import codes
from proxy.coap import options as opt
from proxy.coap.codec import CON, Message, encode_parts
from proxy.server import start_proxy
from proxy.settings import ProxySettings
from tests.support.coap import RawClient
from tests.support.http import serve_app

# What the backend answers per first path segment: the status each profile's API gives on
# success (docs/PROFILES.md).
_ANSWERS = {"auth": 200, "topic": 204, "telemetry": 201, "bootstrap": 200, "ingest": 204}


class Device:
    """A plain-CoAP device in front of a proxy whose backend records each call."""

    def __init__(self, client: RawClient, calls: list[str]) -> None:
        self._client = client
        self.calls = calls
        self._mid = 0

    async def send(self, method: int, path: str, query: str = "", payload: bytes = b"") -> Message:
        self._mid += 1
        options = [(opt.URI_PATH, segment.encode()) for segment in path.strip("/").split("/")]
        if path == "/":
            options = []
        if query:
            options.append((opt.URI_QUERY, query.encode()))
        return await self._client.request(
            encode_parts(CON, method, self._mid, self._mid.to_bytes(2, "big"), options, payload)
        )


@contextlib.asynccontextmanager
async def device_of(profiles: Sequence[str], *, require_dtls: bool = True) -> AsyncIterator[Device]:
    calls: list[str] = []

    async def record(request: HttpRequest) -> HttpResponse:
        path = request.url.path
        query = f"?{request.url.query}" if request.url.query else ""
        calls.append(f"{request.method} {path}{query}")
        return HttpResponse(b"", status_code=_ANSWERS.get(path.split("/")[1], 404))

    app = Starlette(
        routes=[Route("/{rest:path}", record, methods=["GET", "POST", "PUT", "DELETE"])]
    )
    async with serve_app(app) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port="off",
            upstream=base_url,
            require_dtls=require_dtls,
            profiles=list(profiles),
        )
        proxy = await start_proxy(settings)
        client = await RawClient.connect(*proxy.address)
        try:
            yield Device(client, calls)
        finally:
            await client.aclose()
            await proxy.close()


async def test_managed_psk_serves_nothing_over_plain_coap_in_production() -> None:
    async with device_of(["managed_psk"]) as device:
        telemetry = await device.send(codes.POST, "/telemetry", "id=koru-869181072798893", b"{}")
        firmware = await device.send(codes.GET, "/firmware/1.0.0")
        bootstrap = await device.send(codes.GET, "/bootstrap")  # not a route of this profile
    assert (telemetry.code, telemetry.payload) == (codes.UNAUTHORIZED, b"")
    assert firmware.code == codes.UNAUTHORIZED
    assert bootstrap.code == codes.UNAUTHORIZED
    assert device.calls == []


async def test_managed_psk_telemetry_is_forwarded_over_plain_coap_in_development() -> None:
    async with device_of(["managed_psk"], require_dtls=False) as device:
        telemetry = await device.send(codes.POST, "/telemetry", "id=koru-869181072798893", b"{}")
    assert telemetry.code == codes.CREATED
    assert device.calls == ["POST /telemetry?id=koru-869181072798893"]


async def test_signed_session_is_served_over_plain_coap_in_production() -> None:
    async with device_of(["signed_session"]) as device:
        auth = await device.send(codes.POST, "/auth/pk1/dk1", payload=b'{"secureMode":2}')
        raw = await device.send(codes.POST, "/topic/sys/pk1/dk1/thing/model/up_raw", payload=b"x")
        wrong_method = await device.send(codes.GET, "/auth/pk1/dk1")
        elsewhere = await device.send(codes.POST, "/data", payload=b"x")
    assert auth.code == codes.CONTENT  # the route's "200.POST" = "2.05"
    assert raw.code == codes.CHANGED
    # A plain route asked with another method is still a 4.05: nothing is hidden there.
    assert wrong_method.code == codes.METHOD_NOT_ALLOWED
    assert elsewhere.code == codes.UNAUTHORIZED
    assert device.calls == ["POST /auth/pk1/dk1", "POST /topic/sys/pk1/dk1/thing/model/up_raw"]


async def test_combined_profiles_in_production() -> None:
    async with device_of(["sim_identity", "managed_psk", "signed_session"]) as device:
        bootstrap = await device.send(codes.GET, "/bootstrap")
        auth = await device.send(codes.POST, "/auth/x/y", payload=b"{}")
        telemetry = await device.send(codes.POST, "/telemetry", "id=d1", b"{}")
        data = await device.send(codes.POST, "/data", payload=b"x")
        root = await device.send(codes.POST, "/", payload=b"x")
        commands = await device.send(codes.GET, "/commands/8988280666000000001")
        discovery = await device.send(codes.GET, "/.well-known/core")
        unknown = await device.send(codes.GET, "/nope")
    assert bootstrap.code == codes.CONTENT
    assert auth.code == codes.CONTENT
    for refused in (telemetry, data, root, commands, discovery, unknown):
        assert (refused.code, refused.payload) == (codes.UNAUTHORIZED, b"")
    assert device.calls == ["GET /bootstrap", "POST /auth/x/y"]


@pytest.mark.parametrize("profiles", [["sim_identity"], ["1nce", "enos"]])
async def test_bootstrap_is_plain_wherever_sim_identity_is(profiles: list[str]) -> None:
    async with device_of(profiles) as device:
        bootstrap = await device.send(codes.GET, "/bootstrap")
        wrong_method = await device.send(codes.POST, "/bootstrap")
    assert bootstrap.code == codes.CONTENT
    assert wrong_method.code == codes.METHOD_NOT_ALLOWED
    assert device.calls == ["GET /bootstrap"]


async def test_a_policy_file_replaces_the_profiles_tables(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[route]]\npath = "/up"\nmethods = ["POST"]\ntarget = "/ingest"\n')
    calls: list[str] = []

    async def record(request: HttpRequest) -> HttpResponse:
        calls.append(request.url.path)
        return HttpResponse(b"", status_code=204)

    app = Starlette(routes=[Route("/{rest:path}", record, methods=["POST"])])
    async with serve_app(app) as base_url:
        settings = ProxySettings(
            coap_host="127.0.0.1",
            coap_port=0,
            coaps_port="off",
            upstream=base_url,
            profiles=["signed_session"],
            policy=str(policy),
        )
        proxy = await start_proxy(settings)
        client = await RawClient.connect(*proxy.address)
        try:
            device = Device(client, calls)
            up = await device.send(codes.POST, "/up", payload=b"x")
            auth = await device.send(codes.POST, "/auth/x/y", payload=b"{}")
        finally:
            await client.aclose()
            await proxy.close()
    assert up.code == codes.CHANGED
    assert auth.code == codes.NOT_FOUND
    assert calls == ["/ingest"]
