"""A horizontal bar chart as a standalone SVG document, for the figures in docs/benchmarks.md.

No plotting dependency: a benchmark writes its own picture next to its JSON (``--plot``). Bars
are drawn on a log scale when the values span more than a factor of 20 (a recompute next to a
cache hit), each labelled with its value, so the picture reads without the axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
