"""Scenario EO (E with the proxy's metrics listener on and scraped, request log at info, beside
E raw): its report line and a quick run through the real chain.

No assertion on speed: only that both rows come out clean (every request 2.04, each
acknowledged message delivered once), that /metrics was really scraped during the run, and that
the report states the comparison with the 3 % bar."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.harness import OBSERVED_SYSTEM
from bench.report import _observed_cost
from tests.bench.test_bench_smoke import _assert_chain_clean, _run


def test_report_line_compares_rates_against_the_three_percent_bar() -> None:
    raw = {"scenario": "E", "system": "coap-bridge", "rate": 10000.0, "completed": 1000,
           "cpu": {"proxy": 0.040}}  # fmt: skip
    within = {"scenario": "E", "system": OBSERVED_SYSTEM, "rate": 9800.0, "completed": 1000,
              "cpu": {"proxy": 0.041}, "scrapes": 30}  # fmt: skip
    line = _observed_cost([raw, within])
    assert "10,000 → 9,800 req/s (-2.0%)" in line
    assert "40 → 41 µs" in line
    assert "**met**" in line
    beyond = {**within, "rate": 9500.0}
    assert "**not met**" in _observed_cost([raw, beyond])
    assert _observed_cost([raw]) == ""


def test_rates_are_not_judged_when_something_else_used_the_machine() -> None:
    raw = {"scenario": "E", "system": "coap-bridge", "rate": 10000.0, "completed": 1000,
           "cpu": {"proxy": 0.040}, "wall": 20.0, "other_cpu": 0.1}  # fmt: skip
    disturbed = {"scenario": "E", "system": OBSERVED_SYSTEM, "rate": 8600.0,
                 "completed": 1000, "cpu": {"proxy": 0.041}, "scrapes": 30, "wall": 20.0,
                 "other_cpu": 6.8}  # fmt: skip
    line = _observed_cost([raw, disturbed])
    assert "not judged: 34% of a core was used outside the bench" in line
    assert "not met" not in line
    quiet = {**disturbed, "other_cpu": 0.2}
    assert "**not met**" in _observed_cost([raw, quiet])


@pytest.mark.integration
def test_quick_eo_runs_both_rows_clean_and_scrapes(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    rows, log = _run(tmp_path, "--scenarios", "EO", "--output", str(output))
    assert set(rows) == {("E", "coap-bridge"), ("E", OBSERVED_SYSTEM)}, log
    _assert_chain_clean(rows["E", "coap-bridge"], log)
    _assert_chain_clean(rows["E", OBSERVED_SYSTEM], log)
    assert rows["E", OBSERVED_SYSTEM]["scrapes"] >= 2, log
    assert rows["E", OBSERVED_SYSTEM]["scrape_failures"] == 0, log
    assert "Metrics on (EO)" in output.read_text()
