"""Hostile request bodies against a real API process (issue 12, items 2–4).

Every route that takes a body gets numbers no parser should expand (``1e999999999`` held a
core for good, ``1e999`` was a 500, 5000 digits a 400), strings and nesting past what a
management body needs, 50 MB with and without credentials, and a chunked body that never
ends. Each must be refused with a short answer in the project's error shape, and the process
must answer ``/healthz`` afterwards. The server is a separate process (uvicorn with the app
factory): a request that freezes it makes the test fail on its timeout, not hang with it.

Timeouts here are about hangs, not speed: every refusal is milliseconds; ``ANSWER_WITHIN``
only separates "answered" from "never answered" on a busy machine.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx
import pytest

from policies.batch import BATCH_CONTENT_TYPE
from tests.api.conftest import ACTIVE, AUTH, PROXY_HEADERS, ApiProcess

ANSWER_WITHIN = 5.0
LARGE = 50 * 1024 * 1024
SHORT_ANSWER = 1024  # bytes: an error repeats at most a clipped piece of what was sent


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    credentials: dict[str, str]
    refused_without: int  # status without credentials
    template: dict[str, object] | None  # a JSON body; the hostile value goes into "field"
    field: str = ""

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def body_with(self, literal: str) -> bytes:
        """The template as JSON with ``literal`` (raw JSON text) as the value of ``field``."""
        assert self.template is not None
        marker = "\x00hostile\x00"
        text = json.dumps({**self.template, self.field: marker})
        return text.replace(json.dumps(marker), literal).encode()


LOCATION = {"longitude": 13.4, "latitude": 52.5, "source": "GPS", "sample_time": 1}
JSON_ROUTES = [
    Route("POST", "/devices", AUTH, 401, {"iccid": ACTIVE, "ip": "10.9.9.9"}, "iccid"),
    Route("PATCH", f"/devices/{ACTIVE}", AUTH, 401, {"terms_accepted": True}, "status"),
    Route("PUT", f"/devices/{ACTIVE}/psk", AUTH, 401, {"format": "plain"}, "psk"),
    Route("POST", f"/devices/{ACTIVE}/credentials", AUTH, 401, {}, "auth_type"),
    Route("PUT", f"/devices/{ACTIVE}/location", AUTH, 401, LOCATION, "longitude"),
    Route("PUT", f"/devices/{ACTIVE}/location", AUTH, 401, LOCATION, "sample_time"),
]
BODY_ROUTES = [
    *JSON_ROUTES[:5],
    Route("POST", "/ingest", PROXY_HEADERS, 403, None),
    Route("POST", "/ingest/batch", PROXY_HEADERS, 403, None),
]

HUGE_NUMBERS = {
    "1e999999999": "1e999999999",
    "1e999": "1e999",
    "-1e999999": "-1e999999",
    "0e999999999": "0e999999999",
    "5000-digits": "9" * 5000,
    "1e-999999999": "1e-999999999",
    "NaN": "NaN",
    "-Infinity": "-Infinity",
    "in-a-list": "[1e999999999]",
    "as-a-key-value": '{"x": 1e999999999}',
}


def _route_ids(routes: list[Route]) -> list[str]:
    return [f"{route}-{route.field}" if route.field else str(route) for route in routes]


async def _send(
    api: ApiProcess, route: Route, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=api.url, timeout=ANSWER_WITHIN) as http:
        try:
            return await http.request(route.method, route.path, content=body, headers=headers)
        except httpx.TimeoutException:
            pytest.fail(f"{route}: no answer within {ANSWER_WITHIN} s (the server is stuck)")


def _assert_short_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text[:300]
    assert len(response.content) <= SHORT_ANSWER, f"{len(response.content)} bytes came back"
    assert "detail" in response.json()


def _assert_alive(api: ApiProcess) -> None:
    assert api.responsive(ANSWER_WITHIN), "the API stopped answering /healthz"


@pytest.mark.parametrize("literal", HUGE_NUMBERS.values(), ids=HUGE_NUMBERS.keys())
@pytest.mark.parametrize("route", JSON_ROUTES, ids=_route_ids(JSON_ROUTES))
async def test_a_number_no_parser_should_expand_is_422_at_once(
    api_process: ApiProcess, route: Route, literal: str
) -> None:
    headers = {**route.credentials, "Content-Type": "application/json"}
    response = await _send(api_process, route, route.body_with(literal), headers)
    _assert_short_error(response, 422)
    _assert_alive(api_process)


@pytest.mark.parametrize(
    "literal",
    [
        pytest.param('"' + "x" * 7000 + '"', id="7000-char-string"),
        pytest.param("[" * 3000 + "]" * 3000, id="3000-deep-array"),
        pytest.param("[" * 300 + "]" * 300, id="300-deep-array"),
        pytest.param('{"a":' * 300 + "1" + "}" * 300, id="300-deep-object"),
        pytest.param("[" + ",".join(["1"] * 3000) + "]", id="3000-item-array"),
    ],
)
@pytest.mark.parametrize("route", JSON_ROUTES, ids=_route_ids(JSON_ROUTES))
async def test_a_422_repeats_only_a_clipped_piece_of_the_input(
    api_process: ApiProcess, route: Route, literal: str
) -> None:
    body = route.body_with(literal)
    assert len(body) <= 8 * 1024  # under the management cap: the route's own answer
    headers = {**route.credentials, "Content-Type": "application/json"}
    response = await _send(api_process, route, body, headers)
    _assert_short_error(response, 422)
    _assert_alive(api_process)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="100k-deep"),
        pytest.param(b'{"iccid": "' + b"x" * 5_000_000 + b'"}', id="5MB-string"),
    ],
)
@pytest.mark.parametrize("route", JSON_ROUTES[:5], ids=_route_ids(JSON_ROUTES[:5]))
async def test_a_management_body_over_the_cap_is_413(
    api_process: ApiProcess, route: Route, body: bytes
) -> None:
    headers = {**route.credentials, "Content-Type": "application/json"}
    _assert_short_error(await _send(api_process, route, body, headers), 413)
    _assert_alive(api_process)


@pytest.fixture(scope="module")
def fifty_mb() -> bytes:
    return b"[" + b"1," * (LARGE // 2) + b"1]"


@pytest.mark.parametrize("route", BODY_ROUTES, ids=_route_ids(BODY_ROUTES))
async def test_50_mb_without_credentials_is_refused_for_the_caller(
    api_process: ApiProcess, route: Route, fifty_mb: bytes
) -> None:
    headers = {"Content-Type": "application/json"}
    _assert_short_error(await _send(api_process, route, fifty_mb, headers), route.refused_without)
    _assert_alive(api_process)


@pytest.mark.parametrize("route", BODY_ROUTES, ids=_route_ids(BODY_ROUTES))
async def test_50_mb_with_credentials_is_413(
    api_process: ApiProcess, route: Route, fifty_mb: bytes
) -> None:
    content_type = BATCH_CONTENT_TYPE if route.path == "/ingest/batch" else "application/json"
    headers = {**route.credentials, "Content-Type": content_type}
    _assert_short_error(await _send(api_process, route, fifty_mb, headers), 413)
    _assert_alive(api_process)


# --- answered before the body is read ------------------------------------------------------
# Raw HTTP/1.1: the head and a first piece of the body, then nothing. The answer must come
# while the rest is still unsent: from the headers alone.


async def _answer_to_a_body_never_finished(
    api: ApiProcess, route: Route, headers: dict[str, str], framing: str, sent: int
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        lines = [f"{route.method} {route.path} HTTP/1.1", f"Host: 127.0.0.1:{api.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if framing == "declared":
            lines.append(f"Content-Length: {LARGE}")
            first = b"[" * sent
        else:
            lines.append("Transfer-Encoding: chunked")
            first = b"".join(b"%x\r\n%s\r\n" % (4096, b"[" * 4096) for _ in range(sent // 4096))
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + first)
        await writer.drain()
        try:
            status_line = await asyncio.wait_for(reader.readline(), ANSWER_WITHIN)
        except TimeoutError:
            pytest.fail(f"{route}: no answer while the body is unfinished (it waits for it)")
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("framing", ["declared", "chunked"])
@pytest.mark.parametrize("route", BODY_ROUTES, ids=_route_ids(BODY_ROUTES))
async def test_a_caller_without_credentials_is_answered_before_its_body(
    api_process: ApiProcess, route: Route, framing: str
) -> None:
    headers = {"Content-Type": "application/json"}
    status = await _answer_to_a_body_never_finished(api_process, route, headers, framing, 4096)
    assert status == route.refused_without
    _assert_alive(api_process)


@pytest.mark.parametrize("framing", ["declared", "chunked"])
@pytest.mark.parametrize("route", BODY_ROUTES, ids=_route_ids(BODY_ROUTES))
async def test_a_body_over_the_cap_is_413_before_the_rest_arrives(
    api_process: ApiProcess, route: Route, framing: str
) -> None:
    # Chunked: enough to pass the route's cap (the batch cap is max_batch × max_payload).
    sent = 4096 if framing == "declared" else _over_the_cap(route)
    status = await _answer_to_a_body_never_finished(
        api_process, route, route.credentials, framing, sent
    )
    assert status == 413
    _assert_alive(api_process)


def _over_the_cap(route: Route) -> int:
    if route.path == "/ingest/batch":
        return (65536 + 1024) * 256 + 4096
    if route.path == "/ingest":
        return 65536 + 4096
    return 8 * 1024 + 4096
