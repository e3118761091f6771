"""The scaling model of bench/scaling.py on made-up costs: each of its three limits, and the table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.scaling import CaseCost, table  # noqa: E402 - bench/ is not installed


def test_one_task_is_limited_by_its_slowest_stage() -> None:
    cost = CaseCost.measured("x", 1_000_000, worker_cpu=2.0, source_cpu=0.5, target_cpu=1.0, bytes_in=50, bytes_out=80)
    assert cost.slowest_stage() == "worker"
    assert cost.per_task() == pytest.approx(500_000)
    assert cost.predict(1, 16) == (pytest.approx(500_000), "tasks")
    assert cost.predict(2, 16) == (pytest.approx(1_000_000), "tasks")


def test_the_server_saturates() -> None:
    # 1.5 µs of server CPU a row: 4 cores take at most 2.67M rows/s whatever the number of tasks
    cost = CaseCost.measured("x", 1_000_000, worker_cpu=1.0, source_cpu=0.5, target_cpu=1.0, bytes_in=50, bytes_out=80)
    rate, limit = cost.predict(16, 4)
    assert limit == "server CPU" and rate == pytest.approx(4 / 1.5e-6)
    assert cost.predict(2, 4)[1] == "tasks"


def test_the_network_saturates() -> None:
    cost = CaseCost.measured("x", 1_000_000, worker_cpu=0.1, source_cpu=0.01, target_cpu=0.01,
                             bytes_in=5_000, bytes_out=5_000)
    rate, limit = cost.predict(16, 64, network=1e9)
    assert limit == "network" and rate == pytest.approx(100_000)


def test_no_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="no rows"):
        CaseCost.measured("x", 0, 1.0, 1.0, 1.0, 1, 1)


def test_the_table_names_each_case_and_limit() -> None:
    cost = CaseCost.measured("(z) case", 1_000_000, 2.0, 0.5, 1.0, 50, 80)
    lines = table([cost], workers=(1, 4), server_cores=(4,))
    assert lines[2] == "| (z) case | 2.00 | 0.50 | 1.00 | 50 / 80 | worker |"
    assert lines[-1] == "| (z) case | 500,000 (tasks) | 2,000,000 (tasks) |"
