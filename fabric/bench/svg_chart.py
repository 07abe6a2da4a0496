"""Charts as standalone SVG documents, for the figures in docs/benchmarks.md.

No plotting dependency: a benchmark writes its own picture next to its JSON (``--plot``).

* ``bar_chart``: horizontal bars, on a log scale when the values span more than a factor of 20
  (a recompute next to a cache hit), each labelled with its value, so the picture reads without
  the axis;
* ``line_chart``: one line per series over a shared x axis (a figure against request rate),
  a linear x axis from 0, a y axis from 0, or logarithmic (decades) when every value is
  positive and they span more than a factor of 50; a legend;
* ``side_by_side``: several charts in one document.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from html import escape

_ROW = 34
_LABEL_W = 130
_BAR_W = 420
_VALUE_W = 150
_TOP = 44


def bar_chart(values: Mapping[str, float], *, title: str, unit: str) -> str:
    """``values`` (label -> positive number) as bars, first on top; returns the SVG text."""
    if not values or any(v <= 0 or not math.isfinite(v) for v in values.values()):
        raise ValueError("bar_chart needs at least one positive, finite value")
    high, low = max(values.values()), min(values.values())
    log = high / low > 20

    def length(v: float) -> float:
        if not log:
            return _BAR_W * v / high
        floor = low / 2  # the shortest bar stays visible
        return _BAR_W * math.log(v / floor) / math.log(high / floor)

    width = _LABEL_W + _BAR_W + _VALUE_W
    height = _TOP + _ROW * len(values) + 24
    scale = "log scale" if log else "linear scale"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (label, v) in enumerate(values.items()):
        y = _TOP + i * _ROW
        bar = max(length(v), 1.0)
        parts += [
            f'<text x="{_LABEL_W - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>',
            f'<rect x="{_LABEL_W}" y="{y + 4}" width="{bar:.1f}" height="{_ROW - 10}" '
            f'fill="#4878a8"/>',
            f'<text x="{_LABEL_W + bar + 6:.1f}" y="{y + 17}">{v:,.1f} {escape(unit)}</text>',
        ]
    parts.append(
        f'<text x="{_LABEL_W}" y="{height - 8}" fill="#666" font-size="11">bar length: '
        f"{scale}</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


_COLORS = ("#4878a8", "#d0743c", "#6a9f58", "#b0504f", "#8172b3", "#937860", "#da8bc3")
_PLOT_W, _PLOT_H, _MARGIN_L, _MARGIN_B, _LEGEND_W = 360, 220, 60, 44, 150


def _nice_max(value: float) -> float:
    """The smallest of 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * power >= value)


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
) -> str:
    """``series`` (name -> (x, y) points) as lines with markers; returns the SVG text."""
    points = [p for values in series.values() for p in values]
    if not points or any(not (math.isfinite(x) and math.isfinite(y)) for x, y in points):
        raise ValueError("line_chart needs at least one finite point")
    x_max = _nice_max(max(x for x, _ in points))
    ys = [y for _, y in points]
    log = min(ys) > 0 and max(ys) / min(ys) > 50
    if log:
        y_lo, y_hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        y_ticks = [10.0**e for e in range(y_lo, y_hi + 1)]
    else:
        y_lo, y_hi = 0, 1
        y_ticks = [_nice_max(max(ys)) * i / 5 for i in range(6)]
    width = _MARGIN_L + _PLOT_W + _LEGEND_W
    height = _TOP + _PLOT_H + _MARGIN_B
    bottom = _TOP + _PLOT_H

    def px(x: float) -> float:
        return _MARGIN_L + _PLOT_W * x / x_max

    def py(y: float) -> float:
        if log:
            return bottom - _PLOT_H * (math.log10(y) - y_lo) / (y_hi - y_lo)
        return bottom - _PLOT_H * y / y_ticks[-1]

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<line x1="{_MARGIN_L}" y1="{bottom}" x2="{_MARGIN_L + _PLOT_W}" y2="{bottom}" '
        'stroke="#333"/>',
        f'<line x1="{_MARGIN_L}" y1="{_TOP}" x2="{_MARGIN_L}" y2="{bottom}" stroke="#333"/>',
    ]
    for i in range(6):
        xv = x_max * i / 5
        parts.append(f'<text x="{px(xv):.1f}" y="{bottom + 16}" text-anchor="middle">{xv:g}</text>')
    for yv in y_ticks:
        parts += [
            f'<text x="{_MARGIN_L - 6}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:g}</text>',
            f'<line x1="{_MARGIN_L}" y1="{py(yv):.1f}" x2="{_MARGIN_L + _PLOT_W}" '
            f'y2="{py(yv):.1f}" stroke="#ddd"/>',
        ]
    if log:
        y_label += " (log scale)"
    parts += [
        f'<text x="{_MARGIN_L + _PLOT_W / 2}" y="{height - 8}" text-anchor="middle">'
        f"{escape(x_label)}</text>",
        f'<text x="14" y="{_TOP + _PLOT_H / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_TOP + _PLOT_H / 2})">{escape(y_label)}</text>',
    ]
    for index, (name, values) in enumerate(series.items()):
        color = _COLORS[index % len(_COLORS)]
        ordered = sorted(values)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in ordered)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts += [
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in ordered
        ]
        legend_y = _TOP + 8 + index * 18
        legend_x = _MARGIN_L + _PLOT_W + 14
        parts += [
            f'<rect x="{legend_x}" y="{legend_y - 9}" width="12" height="12" fill="{color}"/>',
            f'<text x="{legend_x + 18}" y="{legend_y + 1}">{escape(name)}</text>',
        ]
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def side_by_side(charts: Sequence[str]) -> str:
    """Several SVG documents of this module in one, left to right; returns the SVG text."""
    if not charts:
        raise ValueError("side_by_side needs at least one chart")
    sizes = [
        tuple(float(v) for v in re.findall(r'(?:width|height)="([0-9.]+)"', chart)[:2])
        for chart in charts
    ]
    width, height = sum(w for w, _ in sizes), max(h for _, h in sizes)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}">']
    offset = 0.0
    for chart, (w, _) in zip(charts, sizes, strict=True):
        parts.append(f'<g transform="translate({offset:g},0)">{chart}</g>')
        offset += w
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
