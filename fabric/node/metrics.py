"""The node cache's Prometheus metrics: ``node_cache_registry(cache)``.

One collector reads ``NodeCache.stats()`` (one snapshot under the cache's lock) at each scrape
and exports it as ``fabric_node_cache_*``: occupancy (capacity, blocks in use and cached),
stores and loads, block hits and misses of lookups, evictions, live reservations and pins and
those reclaimed after their lease ended, and the clients attached to this instance. ``METRICS``
is the table of (name, kind, stats key, help); the figures are the cache's own counters, so
nothing here is written on the request path and a scrape can never disagree with ``stats()``.

Serving the registry over HTTP is the worker's ``MetricsServer`` (``python -m fabric.node
--metrics-port``); this module only builds the registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "fabric_node_cache_"


class Kind(Enum):
    GAUGE = "gauge"
    COUNTER = "counter"


METRICS: tuple[tuple[str, Kind, str, str], ...] = (
    ("blocks_capacity", Kind.GAUGE, "num_blocks", "Blocks in the shared segment."),
    (
        "blocks_in_use",
        Kind.GAUGE,
        "num_in_use",
        "Blocks referenced: pinned, reserved, or quarantined after an expired reservation.",
    ),
    ("blocks_cached", Kind.GAUGE, "num_cached", "Committed blocks no one references (evictable)."),
    ("stores", Kind.COUNTER, "reservations", "Stores begun (reservations granted)."),
    ("stored_blocks", Kind.COUNTER, "committed_blocks", "Blocks committed by stores."),
    ("loads", Kind.COUNTER, "pins", "Loads that found a prefix (pins granted)."),
    (
        "hits",
        Kind.COUNTER,
        "hits",
        "Blocks found: by lookups, or read through the shared index (optimistic_hits).",
    ),
    ("misses", Kind.COUNTER, "misses", "Blocks asked for by lookups and not found."),
    ("evictions", Kind.COUNTER, "evictions", "Cached blocks evicted to make room."),
    ("aborted_stores", Kind.COUNTER, "aborted", "Reservations released without a commit."),
    (
        "expired_reservations",
        Kind.COUNTER,
        "expired_reservations",
        "Reservations reclaimed after their lease ended (the writer died or stalled).",
    ),
    (
        "expired_pins",
        Kind.COUNTER,
        "expired_pins",
        "Pins reclaimed after their lease ended (the reader died or stalled).",
    ),
    ("live_reservations", Kind.GAUGE, "live_reservations", "Reservations live now."),
    ("reserved_slots", Kind.GAUGE, "reserved_slots", "Slots held by live reservations."),
    ("live_pins", Kind.GAUGE, "live_pins", "Pins live now."),
    ("pinned_blocks", Kind.GAUGE, "pinned_blocks", "Blocks held by live pins."),
    (
        "quarantined_slots",
        Kind.GAUGE,
        "quarantined_slots",
        "Slots of expired reservations, given to no one for one more lease time.",
    ),
    (
        "attached_clients",
        Kind.GAUGE,
        "attached_clients",
        "Clients that attached to this instance since it started.",
    ),
    (
        "refused_unattached",
        Kind.COUNTER,
        "refused_unattached",
        "Requests refused from clients not attached to this instance.",
    ),
    (
        "optimistic_hits",
        Kind.COUNTER,
        "optimistic_hits",
        "Blocks readers copied through the shared index, without a lookup (as they marked them).",
    ),
    ("disk_blocks", Kind.GAUGE, "disk_blocks", "Blocks in the disk tier (0: none)."),
    ("disk_written", Kind.COUNTER, "disk_written", "Blocks written through to the disk tier."),
    ("disk_onboarded", Kind.COUNTER, "disk_onboarded", "Blocks read from disk into the pool."),
    (
        "disk_skipped",
        Kind.COUNTER,
        "disk_skipped",
        "Committed blocks not written to disk: its write queue was full.",
    ),
    ("disk_failed", Kind.COUNTER, "disk_failed", "Blocks whose disk write failed."),
    ("disk_pending", Kind.GAUGE, "disk_pending", "Blocks queued for the disk (referenced)."),
)
"""(name without ``PREFIX`` and ``_total``, kind, ``NodeCache.stats()`` key, help)."""


class StatsSource(Protocol):
    """What the collector reads: ``NodeCache.stats()``, one consistent snapshot."""

    def stats(self) -> Mapping[str, int]: ...


class NodeCacheCollector(Collector):
    """``METRICS`` from one ``stats()`` snapshot of ``cache`` per scrape."""

    def __init__(self, cache: StatsSource) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        stats = self._cache.stats()
        for name, kind, key, doc in METRICS:
            family = GaugeMetricFamily if kind is Kind.GAUGE else CounterMetricFamily
            yield family(PREFIX + name, doc, value=stats[key])


def node_cache_registry(cache: StatsSource) -> CollectorRegistry:
    """A registry exporting ``cache``'s metrics (its own: one scrape shows this cache only)."""
    registry = CollectorRegistry()
    registry.register(NodeCacheCollector(cache))
    return registry
