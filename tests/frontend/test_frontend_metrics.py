"""The frontend's scrape-time gauges read the fleet: load per worker and what the KV index holds."""

from __future__ import annotations

from fabric.discovery.registry import Role
from fabric.frontend.metrics import FrontendMetrics


def test_indexed_blocks_are_exported_per_subscribed_worker() -> None:
    metrics = FrontendMetrics(
        lambda: {"agg-a": (Role.AGGREGATED, 1), "agg-b": (Role.AGGREGATED, 0)},
        lambda: {"agg-b": 9},
    )
    text = metrics.render().decode()
    assert 'fabric_frontend_worker_indexed_blocks{worker="agg-b"} 9.0' in text
    assert 'worker_indexed_blocks{worker="agg-a"}' not in text  # publishes no events
    assert 'fabric_frontend_worker_in_flight{role="aggregated",worker="agg-a"} 1.0' in text


def test_without_an_index_reader_the_gauge_is_absent() -> None:
    text = FrontendMetrics(lambda: {}).render().decode()
    assert "worker_indexed_blocks" not in text
