"""The benchmark's ratio to the raw copy (bench/run.py): taken per repetition, its median judged, its spread shown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.run import Result, paired_ratios, ratio_line  # noqa: E402 - bench/ is not installed


def _run(case: str, seconds: float) -> Result:
    return Result(case, 1_000_000, seconds, 100.0, "made up")


def test_each_run_is_divided_by_the_raw_copy_of_its_own_repetition() -> None:
    # the machine slows down in the second repetition: both cases feel it, their ratio does not
    a = [_run("a", 0.8), _run("a", 1.6), _run("a", 0.8)]
    b = [_run("b", 1.6), _run("b", 3.2), _run("b", 1.45)]
    assert paired_ratios(b, a) == pytest.approx([0.5, 0.5, 0.8 / 1.45])


def test_runs_must_pair_up() -> None:
    with pytest.raises(ValueError):
        paired_ratios([_run("b", 1.0)], [_run("a", 1.0), _run("a", 1.0)])


def test_the_line_gives_the_median_the_spread_and_every_ratio() -> None:
    line = ratio_line("(b) rows/s / (a) rows/s", [0.52, 0.61, 0.55])
    assert "median 0.55" in line and "spread 0.52-0.61 over 3 repetitions" in line and "(0.52, 0.61, 0.55)" in line
    assert ratio_line("(b)", [0.5]) == "  (b): 0.50 (one repetition)"
