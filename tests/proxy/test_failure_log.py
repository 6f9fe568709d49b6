"""A flood of upstream failures is a few log lines, not one per message (proxy/request_log.py,
FailureLog), and requests_total counts at every log level (proxy/metrics.py): a real proxy, a
real upstream address with nothing listening (every call refused: 5.02), real datagrams."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response as HttpResponse
from starlette.routing import Route

from proxy.coap import codes
from proxy.request_log import FailureLog
from proxy.server import RunningProxy, start_proxy
from proxy.settings import ProxySettings
from tests.support.coap import RawClient, request_datagram
from tests.support.http import free_port, serve_app

POLICY = """
[[route]]
path = "/thing"
methods = ["POST"]
target = "/thing"
"""
FAILURES = 30
FIRST = re.compile(r"^upstream call failed for device 127\.0\.0\.1:\d+: ")
HELD = re.compile(r"^upstream call failed (\d+) more times \((\w+)\) in the last \d+ s; ")


def _settings(tmp_path: Path, upstream: str, **extra: Any) -> ProxySettings:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    values: dict[str, Any] = {
        "coap_host": "127.0.0.1",
        "coap_port": 0,
        "coaps_port": "off",
        "upstream": upstream,
        "policy": str(policy),
        **extra,
    }
    return ProxySettings(**values)


async def _post(client: RawClient, mid: int) -> int:
    reply = await client.request(
        request_datagram(codes.POST, mid, "/thing", token=b"\x07", payload=b"x"), timeout=10.0
    )
    return reply.code


async def test_a_down_upstream_writes_two_lines_for_thirty_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An interval longer than the test: everything after the first failure is held back and
    # reported by the one line written at shutdown.
    settings = _settings(tmp_path, f"http://127.0.0.1:{free_port()}", log_interval=600.0)
    caplog.set_level(logging.WARNING, logger="proxy.forward")
    proxy = await start_proxy(settings)
    client = await RawClient.connect(*proxy.address)
    try:
        for mid in range(FAILURES):
            assert await _post(client, 1000 + mid) == codes.BAD_GATEWAY
        lines = [r.getMessage() for r in caplog.records if r.name == "proxy.forward"]
        assert len(lines) == 1, lines  # only the first, at once
        assert FIRST.match(lines[0]), lines
    finally:
        await client.aclose()
        await proxy.close()
    records = [r for r in caplog.records if r.name == "proxy.forward"]
    assert len(records) == 2, [r.getMessage() for r in records]
    held = HELD.match(records[1].getMessage())
    assert held is not None, records[1].getMessage()
    assert int(held.group(1)) == FAILURES - 1
    assert held.group(2) == "UpstreamUnreachable"
    assert records[1].suppressed == FAILURES - 1  # type: ignore[attr-defined]
    assert records[1].device.startswith("127.0.0.1:")  # type: ignore[attr-defined]


async def test_a_steady_flood_writes_one_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The clock is the test's: windows end when it says, the timers are real loop timers."""
    now = [100.0]
    logger = logging.getLogger("t.failures")
    failures = FailureLog("upstream call failed", logger, interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="t.failures")

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "t.failures"]

    failures.failed("UpstreamTimeout", "dev-1", "no answer in time")
    for n in range(5):
        failures.failed("UpstreamTimeout", f"dev-{n + 2}", "no answer in time")
    # Another cause has its own window: its first failure is written at once.
    failures.failed("UpstreamUnreachable", "dev-9", "refused")
    assert len(messages()) == 2
    now[0] = 110.0
    failures.flush()  # what the window's timer does when it ends (here by hand, at 110)
    assert messages()[2] == (
        "upstream call failed 5 more times (UpstreamTimeout) in the last 10 s; "
        "the last for device dev-6: no answer in time"
    )
    # Within the new window (110..120): held back again, until it ends.
    failures.failed("UpstreamTimeout", "dev-7", "no answer in time")
    assert len(messages()) == 3
    now[0] = 120.0
    failures.flush()
    assert messages()[3].startswith("upstream call failed 1 more times (UpstreamTimeout)")
    # A quiet window (120..130) later, the next failure is written at once again.
    now[0] = 131.0
    failures.failed("UpstreamTimeout", "dev-8", "no answer in time")
    assert messages()[4] == "upstream call failed for device dev-8: no answer in time"
    failures.flush()
    assert len(messages()) == 5  # nothing was held back


async def test_the_window_timer_reports_a_flood_that_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("t.timer")
    failures = FailureLog("upstream call failed", logger, interval=0.05)
    caplog.set_level(logging.WARNING, logger="t.timer")
    for n in range(4):
        failures.failed("UpstreamTimeout", f"dev-{n}", "late")
    for _ in range(200):  # bounded: the timer fires after 0.05 s
        if len(caplog.records) == 2:
            break
        await asyncio.sleep(0.05)
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "upstream call failed for device dev-0: l",
        "upstream call failed 3 more times (Upstr",
    ]


# --- requests_total at warning level ---------------------------------------------------------


@pytest.fixture
async def quiet_proxy(tmp_path: Path) -> AsyncIterator[tuple[RunningProxy, str]]:
    async def thing(request: HttpRequest) -> HttpResponse:
        await request.body()
        return HttpResponse(status_code=204)

    app = Starlette(routes=[Route("/thing", thing, methods=["POST"])])
    requests_log = logging.getLogger("proxy.requests")
    level = requests_log.level
    requests_log.setLevel(logging.WARNING)  # as with --log-level warning
    try:
        async with serve_app(app) as base_url:
            settings = _settings(
                tmp_path, base_url, metrics_port=0, metrics_host="127.0.0.1", log_interval=0.05
            )
            proxy = await start_proxy(settings)
            assert proxy.metrics is not None
            host, port = proxy.metrics.address
            try:
                yield proxy, f"http://{host}:{port}"
            finally:
                await proxy.close()
    finally:
        requests_log.setLevel(level)


async def test_requests_total_counts_at_warning_level(
    quiet_proxy: tuple[RunningProxy, str], caplog: pytest.LogCaptureFixture
) -> None:
    proxy, metrics_url = quiet_proxy
    client = await RawClient.connect(*proxy.address)
    try:
        for mid in range(3):
            assert await _post(client, 2000 + mid) == codes.CHANGED
    finally:
        await client.aclose()
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{metrics_url}/metrics")).text
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    key = ("coap_bridge_proxy_requests_total", (("code", "2.04"), ("route", "/thing")))
    assert values.get(key) == 3, text
    # Summaries ran (interval 0.05 s) or not: either way no request line was written.
    await asyncio.sleep(0.1)
    assert [r for r in caplog.records if r.name == "proxy.requests"] == []
