"""Prometheus metrics of one KV block manager.

Owns a private ``CollectorRegistry`` (never the process-global one), so any number of managers can
live in one process or test without name collisions. Every metric is named ``fabric_kvbm_*``.

* Per tier, labelled ``tier`` (``Tier.value``, e.g. ``"G1"``), read at scrape time from the
  stats callback each pool binds (``bind_pool``): gauges ``blocks_in_use``, ``blocks_cached``
  (inactive but still matchable), ``blocks_free``, ``blocks_capacity``, and counters (in blocks)
  ``hits_total``, ``misses_total``, ``evictions_total``, ``registered_total``,
  ``duplicates_total``. All come from one snapshot per tier per scrape, so in use + cached + free
  == capacity holds within a scrape, and the pool's hot path pays nothing: it keeps plain integer
  counters and the collector reads them.
* The G4 shared disk store, read at scrape time from the callback it binds (``bind_store``):
  gauge ``shared_blocks`` (blocks this instance indexes) and counters ``shared_<event>_total``
  for hits, misses, corrupt (files removed as corrupt), written, skipped (already there),
  evicted and adopted (written by another instance).
* Moves between tiers, labelled ``source``/``target``: ``offloads_total``, ``onboards_total``,
  recorded by the manager with ``record_offloads`` / ``record_onboards`` (one call per batch,
  about 0.7 us: a dict lookup and prometheus_client's locked add).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fabric.kvbm.core.types import Tier

logger = logging.getLogger(__name__)

PREFIX = "fabric_kvbm_"


class PoolSnapshot(Protocol):
    """What the collector reads from a pool's stats snapshot (``PoolStats`` fits)."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_in_use(self) -> int: ...

    @property
    def num_cached(self) -> int: ...

    @property
    def num_free(self) -> int: ...

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    @property
    def evictions(self) -> int: ...

    @property
    def registered(self) -> int: ...

    @property
    def duplicates(self) -> int: ...


_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("blocks_in_use", "num_in_use", "Blocks referenced by at least one request."),
    ("blocks_cached", "num_cached", "Inactive blocks that can still be matched by hash."),
    ("blocks_free", "num_free", "Blocks holding nothing, ready to allocate."),
    ("blocks_capacity", "num_blocks", "Blocks in the pool."),
)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("hits", "hits", "Blocks found by prefix matching."),
    ("misses", "misses", "Blocks looked up by prefix matching and not found."),
    ("evictions", "evictions", "Cached blocks evicted to make room."),
    ("registered", "registered", "Blocks registered under a sequence hash."),
    ("duplicates", "duplicates", "Registrations of a hash already registered."),
)


class _PoolCollector(Collector):
    """Yields the per-tier gauges and counters from the bound callbacks, one snapshot per tier
    per scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tier_to_stats: dict[Tier, Callable[[], PoolSnapshot]] = {}

    def bind(self, tier: Tier, stats: Callable[[], PoolSnapshot]) -> None:
        with self._lock:
            self._tier_to_stats = {**self._tier_to_stats, tier: stats}

    def describe(self) -> Iterator[Metric]:
        for family, _ in self._families():
            yield family

    @staticmethod
    def _families() -> list[tuple[GaugeMetricFamily | CounterMetricFamily, str]]:
        gauges = [
            (GaugeMetricFamily(PREFIX + name, doc, labels=["tier"]), attr)
            for name, attr, doc in _GAUGES
        ]
        counters = [
            (CounterMetricFamily(PREFIX + name, doc, labels=["tier"]), attr)
            for name, attr, doc in _COUNTERS
        ]
        return [*gauges, *counters]

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        for tier, stats in self._tier_to_stats.items():
            try:
                snapshot = stats()
                values = [getattr(snapshot, attr) for _, attr in families]
            except Exception:
                logger.exception("stats callback of tier %s failed; gauges left out", tier.value)
                continue
            for (family, _), value in zip(families, values, strict=True):
                family.add_metric([tier.value], value)
        for family, _ in families:
            yield family


SHARED_COUNTERS = ("hits", "misses", "corrupt", "written", "skipped", "evicted", "adopted")


class _StoreCollector(Collector):
    """Yields the G4 store's gauge and counters from its bound callback at each scrape."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def describe(self) -> Iterator[Metric]:
        yield from self._families({})

    def collect(self) -> Iterator[Metric]:
        try:
            values = self._stats()
        except Exception:
            logger.exception("stats callback of the shared store failed; its metrics left out")
            return
        yield from self._families(values)

    @staticmethod
    def _families(values: dict[str, int]) -> Iterator[Metric]:
        doc = "Blocks this instance indexes in the G4 shared disk store."
        yield GaugeMetricFamily(PREFIX + "shared_blocks", doc, value=values.get("blocks"))
        for name in SHARED_COUNTERS:
            doc = f"G4 shared disk store: blocks {name}."
            yield CounterMetricFamily(PREFIX + f"shared_{name}", doc, value=values.get(name))


class _PairChildren(dict[tuple[Tier, Tier], Counter]):
    """Labelled children of a source/target counter, created on first use."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self._counter = counter

    def __missing__(self, key: tuple[Tier, Tier]) -> Counter:
        child = self[key] = self._counter.labels(source=key[0].value, target=key[1].value)
        return child


class KvbmMetrics:
    """Counters and occupancy gauges of one KV block manager, in its own registry."""

    def __init__(self) -> None:
        self._registry = CollectorRegistry()

        def per_move(name: str, doc: str) -> _PairChildren:
            return _PairChildren(
                Counter(PREFIX + name, doc, ["source", "target"], registry=self._registry)
            )

        self._offloads = per_move("offloads", "Blocks copied to a slower tier.")
        self._onboards = per_move("onboards", "Blocks copied to a faster tier.")
        self._pools = _PoolCollector()
        self._registry.register(self._pools)

    @property
    def registry(self) -> CollectorRegistry:
        """The registry holding every metric of this manager (serve or merge it as you like)."""
        return self._registry

    def bind_pool(self, tier: Tier, stats: Callable[[], PoolSnapshot]) -> None:
        """Read ``tier``'s gauges and counters from ``stats()`` at each scrape; rebinding
        replaces. The snapshot's counters must only grow (they are exported as counters)."""
        self._pools.bind(tier, stats)

    def bind_store(self, stats: Callable[[], dict[str, int]]) -> None:
        """Export the G4 store's ``blocks`` and ``SHARED_COUNTERS`` from ``stats()`` at each
        scrape (bind once)."""
        self._registry.register(_StoreCollector(stats))

    def record_offloads(self, source: Tier, target: Tier, n: int) -> None:
        """Count ``n`` blocks offloaded from ``source`` to ``target``."""
        self._offloads[source, target].inc(n)

    def record_onboards(self, source: Tier, target: Tier, n: int) -> None:
        """Count ``n`` blocks onboarded from ``source`` to ``target``."""
        self._onboards[source, target].inc(n)

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self._registry)
