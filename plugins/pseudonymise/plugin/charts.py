"""Inline SVG charts for the pages: no JavaScript, no external assets, readable without colour.

Every text goes through ``markupsafe.escape``; every shape has a ``<title>`` (a tooltip, and what a
screen reader says).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup, escape

from pseudonymise.plugin.trail import DailyUses

#: Outcome -> colour, in stacking order (bottom first).
OUTCOME_COLOURS = {"success": "#2e7d32", "failed": "#c62828", "denied": "#ef6c00", "incomplete": "#757575"}


def _nice_max(value: int) -> int:
    """A round axis maximum at or above ``value`` that divides into whole ticks (5 of them)."""
    if value <= 5:
        return 5
    step = 10 ** (len(str(value)) - 1)
    for mult in (1, 2, 5, 10):
        if value <= mult * step:
            return mult * step
    return 10 * step


def _bar_chart_frame(name: str, title: str, width: int, height: int, left: int, right: int, top: int,
                     plot_h: int, top_value: int) -> list[str]:
    """The opening of a vertical bar chart: the SVG element, its title, and the value axis with 5 grid lines."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" aria-labelledby="{name}-title">',
             f'<title id="{name}-title">{escape(title)}</title>']
    for i in range(6):
        value = top_value * i / 5
        y = top + plot_h - plot_h * i / 5
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{value:g}</text>')
    return parts


def daily_outcomes(days: Sequence[DailyUses], width: int = 900, height: int = 260) -> Markup:
    """A stacked bar per day, one colour per outcome, with a legend."""
    left, right, top, bottom = 44, 10, 28, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = _nice_max(max((d.total for d in days), default=0))
    n = max(len(days), 1)
    slot = plot_w / n
    bar = max(slot * 0.7, 1.0)
    parts = _bar_chart_frame("daily", "Token uses per day by outcome", width, height, left, right, top, plot_h,
                             top_value)
    label_every = max(1, round(n / 10))
    for i, day in enumerate(days):
        x = left + i * slot + (slot - bar) / 2
        y = top + plot_h
        for outcome, colour in OUTCOME_COLOURS.items():
            count = day.counts.get(outcome, 0)
            if not count:
                continue
            h = plot_h * count / top_value
            y -= h
            tip = escape(f"{day.day.isoformat()}: {count} {outcome}")
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}" '
                         f'data-outcome="{outcome}" data-day="{day.day.isoformat()}" data-count="{count}">'
                         f'<title>{tip}</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="axis">'
                         f'{day.day.strftime("%d %b")}</text>')
    lx = left
    for outcome, colour in OUTCOME_COLOURS.items():
        parts.append(f'<rect x="{lx}" y="6" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{lx + 16}" y="16" class="legend">{outcome}</text>')
        lx += 110
    parts.append("</svg>")
    return Markup("".join(parts))


def project_rows(totals: Sequence[tuple[str, int, int]], width: int = 900) -> Markup:
    """A horizontal bar per project: rows pseudonymised."""
    bar_h, gap, label_w, top = 22, 8, 200, 8
    height = top * 2 + max(len(totals), 1) * (bar_h + gap)
    plot_w = width - label_w - 90
    top_value = _nice_max(max((r for _, r, _ in totals), default=0))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" aria-labelledby="projects-title">',
             '<title id="projects-title">Rows pseudonymised per project</title>']
    if not totals:
        parts.append(f'<text x="{label_w}" y="{top + 16}" class="axis">no successful pseudonymisation in this window</text>')
    for i, (project, rows, values) in enumerate(totals):
        y = top + i * (bar_h + gap)
        w = plot_w * rows / top_value
        name = escape(project)
        parts.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" class="legend">{name}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{max(w, 1):.1f}" height="{bar_h}" fill="#1565c0" '
                     f'data-project="{name}" data-rows="{rows}"><title>{name}: {rows} rows, {values} values '
                     f'pseudonymised</title></rect>')
        parts.append(f'<text x="{label_w + max(w, 1) + 6:.1f}" y="{y + 16}" class="axis">{rows}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def class_sizes(distribution: Sequence[Mapping[str, Any]], k: int, width: int = 900, height: int = 260) -> Markup:
    """A bar per class-size bin of a risk report: how many classes have that size; bins below ``k`` in red."""
    left, right, top, bottom = 54, 10, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = _nice_max(max((int(b["classes"]) for b in distribution), default=0))
    n = max(len(distribution), 1)
    slot = plot_w / n
    bar = max(slot * 0.7, 1.0)
    parts = _bar_chart_frame("sizes", "Equivalence classes by size", width, height, left, right, top, plot_h,
                             top_value)
    for i, b in enumerate(distribution):
        lo, hi, classes, rows = int(b["from"]), b["to"], int(b["classes"]), int(b["rows"])
        label = str(lo) if hi == lo else f"{lo}+" if hi is None else f"{lo}-{hi}"
        below = hi is not None and int(hi) < k
        x = left + i * slot + (slot - bar) / 2
        h = plot_h * classes / top_value
        y = top + plot_h - h
        colour = "#c62828" if below else "#2e7d32"
        tip = escape(f"size {label}: {classes} classes, {rows} rows{' (below k)' if below else ''}")
        if classes:
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}" '
                         f'data-size="{escape(label)}" data-classes="{classes}" data-rows="{rows}" '
                         f'data-below-k="{str(below).lower()}"><title>{tip}</title></rect>')
        parts.append(f'<text x="{x + bar / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="axis">'
                     f'{escape(label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle" class="axis">class size '
                 f'(rows sharing one combination of quasi-identifiers); red: below k={k}</text>')
    parts.append(f'<rect x="{left}" y="6" width="12" height="12" fill="#c62828"/><text x="{left + 16}" y="16" '
                 f'class="legend">below k</text><rect x="{left + 110}" y="6" width="12" height="12" fill="#2e7d32"/>'
                 f'<text x="{left + 126}" y="16" class="legend">k or more</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
