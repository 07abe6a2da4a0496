"""The benchmarks' SVG bar chart: well-formed, one bar per value, log scale for wide ranges."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from fabric.bench.svg_chart import bar_chart

NS = "{http://www.w3.org/2000/svg}"


def bars(svg: str) -> list[float]:
    root = ET.fromstring(svg)
    rects = root.findall(f"{NS}rect")[1:]  # the first is the background
    return [float(r.get("width", "0")) for r in rects]


def test_one_bar_per_value_in_order_longest_for_the_largest() -> None:
    svg = bar_chart(
        {"recompute": 5000.0, "host_hit": 100.0, "disk_hit": 120.0}, title="t", unit="ms"
    )
    widths = bars(svg)
    assert len(widths) == 3 and widths[0] == max(widths) and widths[1] < widths[2]
    assert "log scale" in svg and "5,000.0 ms" in svg


def test_close_values_use_a_linear_scale() -> None:
    svg = bar_chart({"a": 10.0, "b": 5.0}, title="t <&>", unit="ms")
    widths = bars(svg)
    assert widths[0] == pytest.approx(2 * widths[1]) and "linear scale" in svg
    assert "t &lt;&amp;&gt;" in svg


@pytest.mark.parametrize("values", [{}, {"a": 0.0}, {"a": float("nan")}])
def test_bad_values_are_refused(values: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        bar_chart(values, title="t", unit="ms")
