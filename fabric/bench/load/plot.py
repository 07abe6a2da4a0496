"""The picture of a ``bench load`` run: goodput and ITL p99 against request rate, one line per
deployment (``svg_chart.line_chart``, two panels side by side). Rows with an ``error`` or
without the figure are left out; a deployment with no point has no line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fabric.bench.svg_chart import line_chart, side_by_side


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get("error") is None and row.get(key) is not None:
            series.setdefault(str(row["deployment"]), []).append(
                (float(row["rate"]), float(row[key]))
            )
    return series


def load_chart(rows: Sequence[Mapping[str, Any]]) -> str:
    """The SVG text of goodput (req/s) and ITL p99 (ms) against the requested rate."""
    return side_by_side(
        [
            line_chart(
                _series(rows, "goodput"),
                title="Goodput under the SLOs",
                x_label="request rate (req/s, Poisson)",
                y_label="goodput (req/s)",
            ),
            line_chart(
                _series(rows, "itl_ms_p99"),
                title="Inter-token latency p99",
                x_label="request rate (req/s, Poisson)",
                y_label="ITL p99 (ms)",
            ),
        ]
    )
