"""Scenario F's figures and verdict (bench/harness.py ``f_figures``) and its image bytes
(bench/blockload.py ``resource_body`` with a seed); the run itself is in test_bench_smoke.py."""

from __future__ import annotations

import pytest

from bench.blockload import B_SEED, resource_body
from bench.harness import f_figures
from bench.loadgen import LoadResult


def _clean(**changes: object) -> LoadResult:
    result = LoadResult(
        sent=2048, completed=2048, in_window=1024, window=2.0, codes={"2.05": 2048},
        blocks_in_window=1024, transfers=2,
    )  # fmt: skip
    for name, value in changes.items():
        setattr(result, name, value)
    return result


def test_cpu_per_block_and_images_per_second() -> None:
    cpu = {"proxy": 0.2048, "api": 1.024, "redis": 0.0, "load generator": 5.0}
    row = f_figures(_clean(), cpu, blocks=64)
    assert row["proxy_cpu_us_per_block"] == pytest.approx(100.0)
    assert row["api_cpu_us_per_block"] == pytest.approx(500.0)
    assert row["redis_cpu_us_per_block"] == 0.0
    assert "load generator_cpu_us_per_block" not in row
    assert row["image_transfers_per_second"] == pytest.approx(512 / 64)  # 512 blocks/s
    assert row["status"] == "OK"


@pytest.mark.parametrize(
    "changes",
    [
        {"timeouts": 1},
        {"corrupt": 1},
        {"etag_changes": 1},
        {"restarts": 1},
        {"codes": {"2.05": 2047, "5.03": 1}},
        {"completed": 0, "codes": {}, "in_window": 0, "blocks_in_window": 0},
    ],
)
def test_any_wrong_block_timeout_or_other_code_fails_the_row(changes: dict[str, object]) -> None:
    assert f_figures(_clean(**changes), {"proxy": 0.1}, blocks=64)["status"] == "FAILED"


def test_no_answered_block_gives_no_cpu_figure() -> None:
    row = f_figures(_clean(completed=0, codes={}), {"proxy": 0.1}, blocks=64)
    assert row["proxy_cpu_us_per_block"] is None


def test_an_image_per_seed() -> None:
    assert resource_body(4096) == resource_body(4096, B_SEED)  # B's resource as before
    assert resource_body(4096, b"one") == resource_body(4096, b"one")
    assert resource_body(4096, b"one") != resource_body(4096, b"two")
    assert len(resource_body(1024 * 1024, b"one")) == 1024 * 1024
