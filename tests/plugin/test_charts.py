"""The inline SVG charts: every bar where its count says, every label escaped."""

from __future__ import annotations

import re
from datetime import date

import pytest
from pseudonymise.plugin.charts import _nice_max, daily_outcomes, project_rows
from pseudonymise.plugin.trail import DailyUses


def test_axis_maximum_is_round_and_above() -> None:
    assert [_nice_max(v) for v in (0, 3, 5, 6, 11, 20, 21, 499, 501, 1000)] == [5, 5, 5, 10, 20, 20, 50, 500, 1000, 1000]


def test_daily_bars_stack_outcomes_to_scale() -> None:
    days = [DailyUses(date(2026, 11, 1), {"success": 6, "denied": 2}), DailyUses(date(2026, 11, 2)),
            DailyUses(date(2026, 11, 3), {"incomplete": 1})]
    svg = str(daily_outcomes(days, width=400, height=260))
    bars = re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="([\d.]+)" fill="#\w+" '
                      r'data-outcome="(\w+)" data-day="([\d-]+)" data-count="(\d+)"', svg)
    assert [(o, d, int(n)) for _, _, o, d, n in bars] == [
        ("success", "2026-11-01", 6), ("denied", "2026-11-01", 2), ("incomplete", "2026-11-03", 1)]
    heights = {o: float(h) for _, h, o, _, _ in bars}
    assert heights["success"] == pytest.approx(3 * heights["denied"]) == pytest.approx(6 * heights["incomplete"])
    (y_success, _, *_), (y_denied, h_denied, *_) = bars[0], bars[1]
    assert abs(float(y_denied) + float(h_denied) - float(y_success)) < 0.2  # stacked, not overlapping


def test_project_names_are_escaped() -> None:
    svg = str(project_rows([('<img src=x onerror="1">', 10, 12), ("b", 5, 5)]))
    assert "<img" not in svg and "&lt;img" in svg
    assert 'data-rows="10"' in svg and 'data-rows="5"' in svg
    assert "no successful pseudonymisation" in str(project_rows([]))


def test_class_size_bars_are_red_below_k_and_to_scale() -> None:
    from pseudonymise.plugin.charts import class_sizes

    distribution = [{"from": 1, "to": 1, "classes": 4, "rows": 4}, {"from": 2, "to": 2, "classes": 0, "rows": 0},
                    {"from": 5, "to": 9, "classes": 2, "rows": 13}, {"from": 10, "to": None, "classes": 1, "rows": 40}]
    svg = str(class_sizes(distribution, k=5, width=400))
    bars = re.findall(r'height="([\d.]+)" fill="(#\w+)" data-size="([^"]+)" data-classes="(\d+)" data-rows="(\d+)" '
                      r'data-below-k="(\w+)"', svg)
    assert [(size, colour, below) for _, colour, size, _, _, below in bars] == [
        ("1", "#c62828", "true"), ("5-9", "#2e7d32", "false"), ("10+", "#2e7d32", "false")]  # no bar for 0 classes
    heights = [float(h) for h, *_ in bars]
    assert heights[0] == pytest.approx(2 * heights[1]) == pytest.approx(4 * heights[2])
