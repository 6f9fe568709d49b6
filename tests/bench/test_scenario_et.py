"""Scenario ET (E from a device with a 10-field payload template, beside E raw): its witness
reads sequence ids out of JSON, its report line, and a quick run through the real chain.

No assertion on speed: only that both rows come out clean (every request 2.04, each
acknowledged message delivered once as JSON) and the report says what the template cost."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bench.harness import SEQ_KEY, TEMPLATE_10, TEMPLATE_SYSTEM
from bench.report import _template_cost
from bench.subscriber import FOREIGN, Subscriber, _json_seq
from policies.templates import compile_template
from tests.bench.test_bench_smoke import _assert_chain_clean, _run


def test_the_bench_template_has_ten_fields_and_carries_the_sequence_id() -> None:
    template = compile_template(TEMPLATE_10)
    assert len(TEMPLATE_10["sense"]) == 10
    assert template.min_length <= 100  # E's payload
    seq = (7 << 56) | 12345
    payload = struct.pack(">Q", seq) + b"x" * 92  # as bench/loadgen.py builds it
    document = template.translate(payload).document
    assert document[SEQ_KEY] == seq
    assert _json_seq(json.dumps(document, separators=(",", ":")), SEQ_KEY) == seq


@pytest.mark.parametrize(
    "line",
    ['{"probe":true}', "not json", "[1]", '{"seq":-1}', '{"seq":"1"}', f'{{"seq":{1 << 64}}}'],
)
def test_anything_but_a_sequence_id_is_foreign(line: str) -> None:
    assert _json_seq(line, SEQ_KEY) == FOREIGN


def test_json_lines_are_counted_as_they_grow_whole_lines_only(tmp_path: Path) -> None:
    subscriber = Subscriber("mqtt://127.0.0.1:1", "t", tmp_path, json_seq=SEQ_KEY)
    out = subscriber._out
    out.write_text('{"seq":1}\n{"seq":2}\n{"se')
    assert subscriber._lines() == 2
    with out.open("a") as more:
        more.write('q":3}\n')
    assert subscriber._lines() == 3
    assert subscriber._lines() == 3  # nothing new: nothing counted twice


def test_report_line_compares_api_cpu_per_message() -> None:
    rows = [
        {"scenario": "E", "system": "coap-bridge", "rate": 6000.0, "completed": 1000,
         "cpu": {"api": 0.030}},
        {"scenario": "E", "system": TEMPLATE_SYSTEM, "rate": 5900.0, "completed": 1000,
         "cpu": {"api": 0.034}},
    ]  # fmt: skip
    line = _template_cost(rows)
    assert "+4 µs" in line
    assert "30 → 34 µs" in line
    assert _template_cost(rows[:1]) == ""


@pytest.mark.integration
def test_quick_et_runs_raw_and_template_rows_clean(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    rows, log = _run(tmp_path, "--scenarios", "ET", "--output", str(output))
    assert set(rows) == {("E", "coap-bridge"), ("E", TEMPLATE_SYSTEM)}, log
    _assert_chain_clean(rows["E", "coap-bridge"], log)
    _assert_chain_clean(rows["E", TEMPLATE_SYSTEM], log)
    assert rows["E", TEMPLATE_SYSTEM]["foreign"] >= 1, log  # the witness's probe, not ours
    assert "Payload template (ET)" in output.read_text()
