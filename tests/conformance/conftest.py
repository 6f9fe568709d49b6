"""The conformance suite: one HTTP origin for the session (tests/conformance/origin.py),
one real proxy per test module in front of it (plain UDP on 127.0.0.1), a raw client per test.

The tally of checks (checks.py) is printed at the end of the run, and written as JSON to
$CONFORMANCE_REPORT when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from proxy.server import RunningProxy
from tests.conformance.checks import RESULTS, TDS
from tests.conformance.origin import OriginState, build_app
from tests.conformance.wire import Wire
from tests.support.coap import RawClient
from tests.support.http import serve_app


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def origin() -> AsyncIterator[tuple[OriginState, str]]:
    state = OriginState()
    async with serve_app(build_app(state)) as base_url:
        yield state, base_url


@pytest_asyncio.fixture(loop_scope="session")
async def wire(proxy: RunningProxy, origin: tuple[OriginState, str]) -> AsyncIterator[Wire]:
    origin[0].reset()
    client = await RawClient.connect(*proxy.address)
    yield Wire(client)
    await client.aclose()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    by_td: dict[str, list[bool]] = {}
    for verdict in RESULTS:
        by_td.setdefault(verdict.td + verdict.variant, []).append(verdict.passed)
    passed = sum(v.passed for v in RESULTS)
    terminalreporter.section("CoAP#4 conformance (tests/conformance)")
    for td, marks in sorted(by_td.items()):
        state = "pass" if all(marks) else "FAIL"
        write(f"{td:36} {state}  {sum(marks)}/{len(marks)} checks")
        for verdict in RESULTS:
            if verdict.td + verdict.variant == td and not verdict.passed:
                detail = " ".join(verdict.detail.split())[:160]
                write(f"    x {verdict.label}: {detail}")
    in_scope = len(TDS)
    write(f"{passed} of {len(RESULTS)} checks pass ({len(by_td)} TD runs, {in_scope} TDs in scope)")
    report = os.environ.get("CONFORMANCE_REPORT")
    if report:
        Path(report).write_text(json.dumps([v.__dict__ for v in RESULTS], indent=1))
