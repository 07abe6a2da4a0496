"""Tests for fabric.kvbm.metrics: counters, scrape-time gauges, registry isolation, exposition."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fabric.kvbm.core.types import Tier
from fabric.kvbm.metrics import KvbmMetrics


@dataclass
class FakeStats:
    num_blocks: int
    num_in_use: int
    num_cached: int
    num_free: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    registered: int = 0
    duplicates: int = 0


class FakePool:
    """Counts how often its stats are read."""

    def __init__(self, stats: FakeStats) -> None:
        self.current = stats
        self.num_reads = 0

    def stats(self) -> FakeStats:
        self.num_reads += 1
        return self.current


def _value(metrics: KvbmMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"fabric_kvbm_{name}", labels)


def _scrape(metrics: KvbmMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse ``render()`` output into {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.parametrize("name", ["hits", "misses", "evictions", "registered", "duplicates"])
def test_tier_counters_are_read_from_the_pool_snapshot(name: str) -> None:
    metrics = KvbmMetrics()
    device = FakePool(FakeStats(10, 0, 0, 10, **{name: 16}))
    metrics.bind_pool(Tier.DEVICE, device.stats)
    metrics.bind_pool(Tier.HOST, FakePool(FakeStats(10, 0, 0, 10)).stats)
    assert _value(metrics, f"{name}_total", tier="G1") == 16
    device.current = FakeStats(10, 0, 0, 10, **{name: 19})
    assert _value(metrics, f"{name}_total", tier="G1") == 19
    assert _value(metrics, f"{name}_total", tier="G2") == 0
    assert _value(metrics, f"{name}_total", tier="G3") is None  # no pool bound


@pytest.mark.parametrize(
    ("record", "name"),
    [("record_offloads", "offloads_total"), ("record_onboards", "onboards_total")],
)
def test_move_counters_are_labelled_by_source_and_target(record: str, name: str) -> None:
    metrics = KvbmMetrics()
    getattr(metrics, record)(Tier.DEVICE, Tier.HOST, 8)
    getattr(metrics, record)(Tier.DEVICE, Tier.HOST, 2)
    getattr(metrics, record)(Tier.HOST, Tier.DISK, 5)
    assert _value(metrics, name, source="G1", target="G2") == 10
    assert _value(metrics, name, source="G2", target="G3") == 5
    assert _value(metrics, name, source="G2", target="G1") is None


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        KvbmMetrics().record_offloads(Tier.DEVICE, Tier.HOST, -1)


def test_gauges_read_the_bound_callback_at_render_time_only() -> None:
    metrics = KvbmMetrics()
    device = FakePool(FakeStats(num_blocks=10, num_in_use=4, num_cached=5, num_free=1))
    host = FakePool(FakeStats(num_blocks=100, num_in_use=0, num_cached=0, num_free=100))
    metrics.bind_pool(Tier.DEVICE, device.stats)
    metrics.bind_pool(Tier.HOST, host.stats)
    metrics.record_offloads(Tier.DEVICE, Tier.HOST, 4)
    assert device.num_reads == 0  # nothing on the hot path

    scraped = _scrape(metrics)
    assert device.num_reads == 1  # one snapshot per tier per scrape
    g1 = (("tier", "G1"),)
    assert scraped["fabric_kvbm_blocks_in_use", g1] == 4
    assert scraped["fabric_kvbm_blocks_cached", g1] == 5
    assert scraped["fabric_kvbm_blocks_free", g1] == 1
    assert scraped["fabric_kvbm_blocks_capacity", g1] == 10
    assert scraped["fabric_kvbm_blocks_free", (("tier", "G2"),)] == 100
    assert ("fabric_kvbm_blocks_free", (("tier", "G3"),)) not in scraped  # no pool bound

    device.current = FakeStats(num_blocks=10, num_in_use=0, num_cached=2, num_free=8)
    assert _scrape(metrics)["fabric_kvbm_blocks_free", g1] == 8


def test_rebinding_a_tier_replaces_its_callback() -> None:
    metrics = KvbmMetrics()
    metrics.bind_pool(Tier.DISK, FakePool(FakeStats(1, 1, 0, 0)).stats)
    metrics.bind_pool(Tier.DISK, FakePool(FakeStats(7, 0, 0, 7)).stats)
    assert _value(metrics, "blocks_capacity", tier="G3") == 7


def test_a_failing_callback_drops_only_its_tier(caplog: pytest.LogCaptureFixture) -> None:
    metrics = KvbmMetrics()

    def broken() -> FakeStats:
        raise RuntimeError("pool gone")

    metrics.bind_pool(Tier.DEVICE, broken)
    metrics.bind_pool(Tier.HOST, FakePool(FakeStats(3, 1, 1, 1)).stats)
    with caplog.at_level(logging.ERROR, logger="fabric.kvbm.metrics"):
        scraped = _scrape(metrics)
    assert scraped["fabric_kvbm_blocks_in_use", (("tier", "G2"),)] == 1
    assert ("fabric_kvbm_blocks_in_use", (("tier", "G1"),)) not in scraped
    assert any("tier G1 " in r.getMessage() for r in caplog.records)


def test_two_instances_do_not_collide_nor_touch_the_global_registry() -> None:
    first, second = KvbmMetrics(), KvbmMetrics()
    first.bind_pool(Tier.HOST, FakePool(FakeStats(2, 1, 1, 0, evictions=5)).stats)
    assert _value(first, "evictions_total", tier="G2") == 5
    assert _value(second, "evictions_total", tier="G2") is None
    assert _value(second, "blocks_capacity", tier="G2") is None
    assert first.registry is not second.registry
    assert REGISTRY.get_sample_value("fabric_kvbm_evictions_total", {"tier": "G2"}) is None


def test_render_is_parseable_prometheus_text() -> None:
    metrics = KvbmMetrics()
    metrics.record_onboards(Tier.DISK, Tier.DEVICE, 2)
    metrics.bind_pool(Tier.DEVICE, FakePool(FakeStats(4, 1, 1, 2)).stats)
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    counters = ["hits", "misses", "evictions", "offloads", "onboards", "registered", "duplicates"]
    gauges = ["blocks_in_use", "blocks_cached", "blocks_free", "blocks_capacity"]
    assert {f"fabric_kvbm_{n}": "counter" for n in counters}.items() <= families.items()
    assert {f"fabric_kvbm_{n}": "gauge" for n in gauges}.items() <= families.items()
    assert all(name.startswith("fabric_kvbm_") for name in families)
