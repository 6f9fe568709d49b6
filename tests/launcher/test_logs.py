"""One log format for the whole process (launcher/logs.py) and the request logs
(proxy/request_log.py, api/request_log.py): ``coap-bridge`` run as a real process, requests
from libcoap's client and httpx, every line it writes parsed."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher import logs
from tests.support.bridge import Bridge, running_bridge
from tests.support.http import free_port
from tests.support.processes import Processes

CLIENT = "coap-client-notls"


def _record(msg: str, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("proxy.requests", logging.WARNING, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_line_has_the_fields_and_the_extras() -> None:
    record = _record("upstream call failed for device %s", device="8988280666000000001")
    record.args = ("8988280666000000001",)
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "proxy.requests"
    assert entry["msg"] == "upstream call failed for device 8988280666000000001"
    assert entry["device"] == "8988280666000000001"
    assert entry["ts"].endswith("Z")
    assert entry["ts"][10] == "T"


def test_json_line_keeps_a_traceback_on_one_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    assert "RuntimeError: boom" in json.loads(line)["exc"]


def test_text_line_appends_the_extras() -> None:
    line = logs.TextFormatter().format(_record("refused", device="10.0.0.1:5683", code="5.02"))
    assert line.endswith("WARNING proxy.requests: refused device=10.0.0.1:5683 code=5.02")


@pytest.mark.parametrize(
    ("log_format", "level", "named"),
    [("xml", "info", "log_format"), ("json", "loud", "log_level")],
)
def test_a_bad_format_or_level_names_the_setting(log_format: str, level: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        logs.logging_config(log_format, level)  # type: ignore[arg-type]


def test_a_bad_log_format_is_refused_at_start() -> None:
    from tests.support.bridge import bridge_command

    done = subprocess.run(
        [*bridge_command(), "api", "--log-format", "yaml"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "log_format" in done.stderr


# --- a real process ---------------------------------------------------------------------


def _entries(text: str) -> list[dict[str, Any]]:
    """Every line as JSON: a line that is not one fails the test (uvicorn's included)."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}\n--- whole log:\n{text}") from None
    return entries


async def _post(port: int, path: str = "/?t=demo") -> str:
    client = shutil.which(CLIENT)
    assert client, f"{CLIENT} not installed (Debian libcoap3-bin: make test installs it)"
    process = await asyncio.create_subprocess_exec(
        client,
        "-m",
        "post",
        "-e",
        "hello",
        "-B",
        "5",
        f"coap://127.0.0.1:{port}{path}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return out.decode(errors="replace")


async def _until(bridge_log: Any, found: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Parse the log until ``found(entries)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        entries = _entries(bridge_log())
        if found(entries):
            return entries
        assert time.monotonic() < deadline, bridge_log()
        await asyncio.sleep(0.2)


def _of(entries: list[dict[str, Any]], logger: str, level: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["logger"] == logger and e["level"] == level]


async def _traffic(bridge: Bridge) -> None:
    await _post(bridge.coap_port)
    await _post(bridge.coap_port, "/nowhere")
    async with bridge.api() as client:
        assert (await client.get("/devices")).status_code == 200


async def test_up_in_json_at_info_writes_summaries_and_no_request_lines(tmp_path: Path) -> None:
    extra = ["--log-format", "json", "--log-interval", "0.5"]
    async with running_bridge(tmp_path, extra=extra) as bridge:
        await _traffic(bridge)

        def summaries(entries: list[dict[str, Any]]) -> bool:
            return bool(_of(entries, "proxy.requests", "info")) and any(
                "/devices" in e.get("routes", {}) for e in _of(entries, "api.requests", "info")
            )

        entries = await _until(bridge.log, summaries)
    entries = _entries(bridge.log())
    # uvicorn's own lines come out in the same format.
    assert any(
        e["logger"].startswith("uvicorn") and "Started server process" in e["msg"] for e in entries
    )
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
        assert entry["level"] != "debug"
    coap = _of(entries, "proxy.requests", "info")
    codes: dict[str, int] = {}
    routes: dict[str, dict[str, int]] = {}
    for entry in coap:
        for code, n in entry["codes"].items():
            codes[code] = codes.get(code, 0) + n
        for route, per in entry["routes"].items():
            routes.setdefault(route, {}).update(per)
    assert codes.get("2.04") == 1, coap
    assert codes.get("4.04") == 1, coap
    assert routes["/"] == {"2.04": 1}
    assert routes["other"] == {"4.04": 1}
    http = [e for e in _of(entries, "api.requests", "info") if "/devices" in e["routes"]]
    assert http[0]["routes"]["/devices"] == {"200": 1}


async def test_debug_writes_a_line_per_exchange(tmp_path: Path) -> None:
    extra = ["--log-format", "json", "--log-level", "debug", "--log-interval", "60"]
    async with running_bridge(tmp_path, extra=extra) as bridge:
        await _traffic(bridge)

        def lines(entries: list[dict[str, Any]]) -> bool:
            coap = _of(entries, "proxy.requests", "debug")
            return len(coap) >= 2 and any(
                e.get("path") == "/devices" for e in _of(entries, "api.requests", "debug")
            )

        entries = await _until(bridge.log, lines)
    coap = {e["path"]: e for e in _of(entries, "proxy.requests", "debug")}
    posted = coap["/"]
    assert posted["method"] == "POST"
    assert posted["code"] == "2.04"
    assert posted["peer"].startswith("127.0.0.1:")
    assert posted["device"] == posted["peer"]
    assert posted["identity"] is None
    assert posted["duration_ms"] >= 0
    assert coap["/nowhere"]["code"] == "4.04"
    http = next(e for e in _of(entries, "api.requests", "debug") if e.get("path") == "/devices")
    assert http["method"] == "GET"
    assert http["code"] == 200
    assert http["peer"].startswith("127.0.0.1")
    # The proxy's batch call (many devices in one body) is logged as one request.
    batch = [e for e in _of(entries, "api.requests", "debug") if e["path"] == "/ingest/batch"]
    assert batch
    assert batch[0]["code"] == 200


async def test_an_error_line_names_the_device(tmp_path: Path) -> None:
    """The upstream is a closed port: the proxy answers 5.02 and says for which device."""
    processes = Processes(tmp_path)
    try:
        proxy = await processes.proxy(
            "proxy",
            upstream=f"http://127.0.0.1:{free_port()}",
            redis_url=None,
            env={"COAP_BRIDGE_LOG_FORMAT": "json"},
        )
        await _post(proxy.port)

        def failed(entries: list[dict[str, Any]]) -> bool:
            return any(e["level"] in ("warning", "error") and "device" in e for e in entries)

        entries = await _until(proxy.log, failed)
    finally:
        processes.stop_all()
    errors = [e for e in entries if e["level"] in ("warning", "error") and "device" in e]
    assert errors[0]["logger"] == "proxy.forward"
    assert errors[0]["device"].startswith("127.0.0.1:")
    assert errors[0]["device"] in errors[0]["msg"]
    # The summary at shutdown counts the 5.02.
    final = _entries(proxy.log())
    assert any(e.get("codes", {}).get("5.02") for e in _of(final, "proxy.requests", "info"))


async def test_api_request_log_names_the_proxied_device(tmp_path: Path) -> None:
    """An API call the proxy makes for a DTLS device names that identity, never a token."""
    extra = ["--log-format", "json", "--log-level", "debug", "--log-interval", "60"]
    async with running_bridge(tmp_path, extra=extra) as bridge:
        async with httpx.AsyncClient(base_url=bridge.api_url, timeout=5) as client:
            answer = await client.get(
                "/location",
                headers={
                    "X-Bridge-Token": bridge.proxy_token,
                    "X-Bridge-Identity": "8988280666000000001",
                    "Forwarded": 'for="127.0.0.1:40000";proto=coaps',
                },
            )
        assert answer.status_code < 500

        def found(entries: list[dict[str, Any]]) -> bool:
            return any(e.get("path") == "/location" for e in _of(entries, "api.requests", "debug"))

        entries = await _until(bridge.log, found)
    line = next(e for e in _of(entries, "api.requests", "debug") if e["path"] == "/location")
    assert line["device"] == "8988280666000000001"
    assert bridge.proxy_token not in bridge.log()


# --- the proxy's request log, in process ----------------------------------------------------


class _Handler:
    def answer_now(self, request: object) -> None:
        return None

    async def handle(self, request: object) -> object:
        raise AssertionError("not called")

    def needs_claim(self, request: object) -> bool:
        return True


def test_above_info_the_handler_still_counts_but_writes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """requests_total on /metrics comes from these counts: they go on at warning level."""
    from proxy import request_log

    handler = _Handler()
    requests = request_log.RequestLog(lambda path: path, logger=logging.getLogger("t.quiet"))
    requests.log.setLevel(logging.WARNING)
    wrapped = request_log.log_requests(handler, requests)  # type: ignore[arg-type]
    assert isinstance(wrapped, request_log._Counted)
    assert not isinstance(wrapped, request_log._Traced)
    requests.count("/t", 68)
    with caplog.at_level(logging.WARNING, logger="t.quiet"):
        requests.summary()
    assert caplog.records == []
    assert requests.cumulative() == {("/t", 68): 1}
    requests.log.setLevel(logging.DEBUG)
    traced = request_log.log_requests(handler, requests)  # type: ignore[arg-type]
    assert isinstance(traced, request_log._Traced)


def test_a_path_scan_does_not_grow_the_counts(caplog: pytest.LogCaptureFixture) -> None:
    from proxy import request_log

    logger = logging.getLogger("t.scan")
    requests = request_log.RequestLog(
        lambda path: "/known" if path == "/known" else None, logger=logger
    )
    requests.count("/known", 68)
    for n in range(request_log.MAX_KEYS + 50):
        requests.count(f"/scan/{n}", 132)
    assert len(requests.counts) == request_log.MAX_KEYS + 1
    with caplog.at_level(logging.INFO, logger="t.scan"):
        requests.summary()
    (record,) = caplog.records
    assert record.routes == {  # type: ignore[attr-defined]
        "/known": {"2.04": 1},
        "other": {"4.04": request_log.MAX_KEYS + 50},
    }
    assert requests.counts == {}
