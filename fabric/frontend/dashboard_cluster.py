"""The cluster as the dashboard shows it: ``ClusterView.snapshot()``, a JSON-ready dict.

Owns the assembly of ``GET /v1/fabric/cluster`` (``dashboard``) from what the frontend already
knows and what its workers export, read at request time:

* the fleet: every eligible worker's record (role, engine, block geometry) and this frontend's
  in-flight count on it, the blocks the KV index knows it holds;
* each worker's Prometheus endpoint (the ``metrics`` URL of its record), scraped concurrently
  with ``SCRAPE_TIMEOUT_S``: per tier (``fabric_kvbm_*{tier}``: G1 device, G2 host, G2N node
  cache, G3 disk) blocks in use, cached, capacity, hits and misses; the G4 shared store
  (``fabric_kvbm_shared_*``); the worker's requests, queue and KV transfers
  (``fabric_worker_*``);
* this frontend's own registry (``metrics.FrontendMetrics``): requests, TTFT, ITL, routes taken,
  prefix hits, KV transfer time and bytes, refusals, queue;
* ``RouteHistory``: routes taken per ``BUCKET_S`` bucket over the last ``HISTORY_S``.
* node caches (``fleet.Fleet.node_caches``): their node (their records); from their own
  ``/metrics`` (``fabric.node.metrics``, scraped with the workers') their occupancy (used /
  capacity blocks), lookups' block hit rate, live pins and reservations and those reclaimed
  after their lease ended, evictions and attached clients; the workers of the same node and the
  blocks those workers stored to and loaded from the node tier (their
  ``fabric_kvbm_offloads_total{target="G2N"}`` and ``onboards_total{source="G2N"}``).

Invariants: a worker whose endpoint fails or times out is shown with ``state`` ``unreachable``
and its error (``no_metrics`` when its record names no endpoint), never dropped, and never
delays the snapshot past the timeout; rates (KV bytes per second, tokens per second) are
differences between two scrapes of the same worker process (its ``started_at``), so a restart
never shows a negative rate; snapshots are taken at most once per ``MIN_INTERVAL_S`` (concurrent
viewers share one), so the page cannot make the frontend scrape its workers faster than that.
Nothing here blocks the event loop: scrapes are ``httpx.AsyncClient`` requests and parsing a
worker's text is small.

``RouteHistory`` samples the ``routes_total`` counters at each snapshot: routes taken while
nobody polls land in the bucket of the next snapshot (totals stay exact, their time placement is
as coarse as the gap).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fabric.discovery.records import FabricLayout, WorkerRecord
from fabric.frontend.generation import Frontend
from fabric.frontend.metrics import kv_block_bytes
from fabric.frontend.policy import RouteKind
from fabric.kvbm import Tier

SCRAPE_TIMEOUT_S = 1.5
MIN_INTERVAL_S = 1.0
BUCKET_S = 10.0
HISTORY_S = 300.0
TIER_NAMES = {
    Tier.DEVICE: "device",
    Tier.HOST: "host",
    Tier.NODE: "node",
    Tier.DISK: "disk",
    Tier.SHARED: "shared",
}

Json = dict[str, Any]


class Samples:
    """Prometheus samples by name: ``value(name, **labels)`` sums the matching ones."""

    def __init__(self, samples: Iterable[tuple[str, Mapping[str, str], float]] = ()) -> None:
        self._by_name: dict[str, list[tuple[Mapping[str, str], float]]] = {}
        for name, labels, value in samples:
            self._by_name.setdefault(name, []).append((labels, value))

    @classmethod
    def parse(cls, text: str) -> Samples:
        """The samples of a text exposition (``/metrics``)."""
        return cls(
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        )

    @classmethod
    def of(cls, registry: CollectorRegistry) -> Samples:
        """The samples of an in-process registry."""
        return cls(
            (sample.name, sample.labels, sample.value)
            for family in registry.collect()
            for sample in family.samples
        )

    def has(self, name: str) -> bool:
        return name in self._by_name

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples ``name`` whose labels include ``labels`` (0 for none)."""
        return sum(
            value
            for sample_labels, value in self._by_name.get(name, ())
            if all(sample_labels.get(key) == want for key, want in labels.items())
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``label value -> value`` of the samples ``name`` (summed over other labels)."""
        out: dict[str, float] = {}
        for labels, value in self._by_name.get(name, ()):
            key = labels.get(label)
            if key is not None:
                out[key] = out.get(key, 0.0) + value
        return out


@dataclass(slots=True)
class RouteHistory:
    """Routes taken per ``bucket_s`` over the last ``horizon_s`` (see the module docstring)."""

    bucket_s: float = BUCKET_S
    horizon_s: float = HISTORY_S
    _last: dict[str, float] | None = None
    _buckets: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)

    def sample(self, now: float, totals: Mapping[str, float]) -> None:
        """Record the counters' ``totals`` at wall time ``now``."""
        last, self._last = self._last, dict(totals)
        if last is None:
            return
        start = now - now % self.bucket_s
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append((start, {}))
        counts = self._buckets[-1][1]
        for kind, total in totals.items():
            delta = total - last.get(kind, 0.0)
            if delta > 0:
                counts[kind] = counts.get(kind, 0.0) + delta
        while self._buckets and self._buckets[0][0] <= now - self.horizon_s:
            self._buckets.popleft()

    def to_json(self, kinds: Iterable[str]) -> Json:
        kinds = list(kinds)
        return {
            "bucket_s": self.bucket_s,
            "horizon_s": self.horizon_s,
            "kinds": kinds,
            "buckets": [
                {"start": start, "counts": {kind: counts.get(kind, 0.0) for kind in kinds}}
                for start, counts in self._buckets
            ],
        }


@dataclass(frozen=True, slots=True)
class WorkerScrape:
    """One scrape of a worker's metrics: when (monotonic), its samples, or why it failed."""

    at: float
    samples: Samples | None
    error: str | None


class ClusterView:
    """Snapshots of the cluster for one frontend (see the module docstring)."""

    def __init__(self, frontend: Frontend) -> None:
        self._frontend = frontend
        self._history = RouteHistory()
        self._previous: dict[tuple[str, float], WorkerScrape] = {}
        self._snapshot: Json | None = None
        self._taken_at = 0.0
        self._lock = asyncio.Lock()

    async def snapshot(self) -> Json:
        """The cluster now (at most ``MIN_INTERVAL_S`` old)."""
        async with self._lock:
            if self._snapshot is None or time.monotonic() - self._taken_at >= MIN_INTERVAL_S:
                self._snapshot = await self._take()
                self._taken_at = time.monotonic()
            return self._snapshot

    async def _take(self) -> Json:
        fleet = self._frontend.router.fleet
        records = sorted(fleet.workers().values(), key=lambda r: (r.role.value, r.worker_id))
        caches = sorted(fleet.node_caches().values(), key=lambda r: r.worker_id)
        in_flight = fleet.in_flight()
        indexed = fleet.indexed_blocks()
        scrapes = await scrape_workers([*records, *caches])
        scraped = list(zip(records, scrapes[: len(records)], strict=True))
        cache_scrapes = scrapes[len(records) :]
        now = time.time()
        own = Samples.of(self._frontend.metrics.registry)
        routes = own.by_label("fabric_frontend_routes_total", "kind")
        self._history.sample(now, routes)
        workers = []
        current: dict[tuple[str, float], WorkerScrape] = {}
        for record, scrape in scraped:
            key = (record.worker_id, record.started_at)
            current[key] = scrape
            workers.append(
                worker_json(
                    record,
                    scrape,
                    self._previous.get(key),
                    in_flight=in_flight.get(record.worker_id, (record.role, 0))[1],
                    indexed_blocks=indexed.get(record.worker_id),
                )
            )
        self._previous = current
        return {
            "model": self._frontend.model_name,
            "generated_at": now,
            "frontend": frontend_json(own, sum(count for _, count in in_flight.values())),
            "routes_history": self._history.to_json(kind.value for kind in RouteKind),
            "workers": workers,
            "node_caches": [
                node_cache_json(record, scrape, scraped)
                for record, scrape in zip(caches, cache_scrapes, strict=True)
            ],
        }


async def scrape_workers(records: Sequence[WorkerRecord]) -> list[WorkerScrape]:
    """Every worker's metrics, scraped concurrently, each within ``SCRAPE_TIMEOUT_S``."""
    async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S, trust_env=False) as client:
        return list(await asyncio.gather(*(_scrape(client, record) for record in records)))


async def _scrape(client: httpx.AsyncClient, record: WorkerRecord) -> WorkerScrape:
    url = record.endpoints.metrics
    if url is None:
        return WorkerScrape(time.monotonic(), None, "the worker's record names no metrics endpoint")
    try:
        response = await client.get(url)
        response.raise_for_status()
        samples = Samples.parse(response.text)
    except (httpx.HTTPError, ValueError) as exc:
        return WorkerScrape(time.monotonic(), None, f"{url}: {type(exc).__name__}: {exc}")
    return WorkerScrape(time.monotonic(), samples, None)


def frontend_json(own: Samples, in_flight: int) -> Json:
    """The frontend's figures from its own registry's samples (``in_flight``: the fleet's)."""

    def mean_ms(name: str) -> float | None:
        count = own.value(name + "_count")
        return own.value(name + "_sum") / count * 1e3 if count else None

    transfer_s = own.value("fabric_frontend_kv_transfer_seconds_sum")
    transfer_bytes = own.value("fabric_frontend_kv_transfer_bytes_total")
    return {
        "requests": own.value("fabric_frontend_requests_total"),
        "errors": own.value("fabric_frontend_request_errors_total"),
        "refusals": own.by_label("fabric_frontend_refusals_total", "reason"),
        "in_flight": in_flight,
        "queued": own.value("fabric_frontend_queued"),
        "prompt_tokens": own.value("fabric_frontend_prompt_tokens_total"),
        "completion_tokens": own.value("fabric_frontend_completion_tokens_total"),
        "ttft_ms": mean_ms("fabric_frontend_ttft_seconds"),
        "itl_ms": mean_ms("fabric_frontend_itl_seconds"),
        "routes": own.by_label("fabric_frontend_routes_total", "kind"),
        "prefix_blocks": own.by_label("fabric_frontend_prefix_blocks_total", "result"),
        "kv_transfers": own.value("fabric_frontend_kv_transfer_seconds_count"),
        "kv_transfer_ms": mean_ms("fabric_frontend_kv_transfer_seconds"),
        "kv_transfer_bytes": transfer_bytes,
        "kv_transfer_bytes_per_s": transfer_bytes / transfer_s if transfer_s else None,
    }


def worker_json(
    record: WorkerRecord,
    scrape: WorkerScrape,
    previous: WorkerScrape | None = None,
    *,
    in_flight: int | None = None,
    indexed_blocks: int | None = None,
) -> Json:
    """One worker as the page shows it (also ``fabric status``'s rows).

    Args:
        previous: the worker process's previous scrape, for rates (None: rates are None).
        in_flight: this frontend's requests on it (None: not known, e.g. read from etcd).
    """
    layout = record.layout
    block_bytes = kv_block_bytes(layout)
    body: Json = {
        "id": record.worker_id,
        "role": record.role.value,
        "engine": layout.engine.value,
        "state": _state(record, scrape),
        "error": scrape.error,
        "block_size": layout.block_size,
        "block_bytes": block_bytes,
        "started_at": record.started_at,
        "in_flight": in_flight,
        "indexed_blocks": indexed_blocks,
        "tiers": [],
        "shared": None,
    }
    samples = scrape.samples
    if samples is None:
        return body
    body["tiers"] = _tiers_json(samples)
    if samples.has("fabric_kvbm_shared_blocks"):
        hits = samples.value("fabric_kvbm_shared_hits_total")
        misses = samples.value("fabric_kvbm_shared_misses_total")
        body["shared"] = {
            "tier": Tier.SHARED.value,
            "blocks": samples.value("fabric_kvbm_shared_blocks"),
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
        }
    transferred = samples.value("fabric_worker_transferred_blocks_total")
    body.update(
        active=samples.value("fabric_worker_active_requests"),
        waiting=samples.value("fabric_worker_waiting_requests"),
        requests=samples.value("fabric_worker_requests_total"),
        generated_tokens=samples.value("fabric_worker_generated_tokens_total"),
        computed_tokens=samples.value("fabric_worker_computed_tokens_total"),
        cached_tokens=samples.value("fabric_worker_cached_tokens_total"),
        transferred_blocks=transferred,
        transferred_bytes=transferred * block_bytes if block_bytes is not None else None,
        offloaded_blocks=samples.value("fabric_kvbm_offloads_total"),
        onboarded_blocks=samples.value("fabric_kvbm_onboards_total"),
        tokens_per_s=_rate(scrape, previous, "fabric_worker_generated_tokens_total"),
        kv_read_bytes_per_s=None,
    )
    blocks_per_s = _rate(scrape, previous, "fabric_worker_transferred_blocks_total")
    if blocks_per_s is not None and block_bytes is not None:
        body["kv_read_bytes_per_s"] = blocks_per_s * block_bytes
    return body


def node_cache_json(
    record: WorkerRecord,
    scrape: WorkerScrape,
    workers: Sequence[tuple[WorkerRecord, WorkerScrape]],
) -> Json:
    """A node cache as the page shows it: its own metrics (``scrape``; without them, the
    record's capacity and None for the rest) and what the workers of its node report."""
    attached = [(w, s) for w, s in workers if record.node and w.node == record.node]
    node = Tier.NODE.value
    stored = loaded = 0.0
    for _, worker_scrape in attached:
        if worker_scrape.samples is not None:
            stored += worker_scrape.samples.value("fabric_kvbm_offloads_total", target=node)
            loaded += worker_scrape.samples.value("fabric_kvbm_onboards_total", source=node)
    body: Json = {
        "id": record.worker_id,
        "role": record.role.value,
        "state": _state(record, scrape),
        "error": scrape.error,
        "node": record.node,
        "capacity": record.layout.num_blocks if isinstance(record.layout, FabricLayout) else None,
        "block_bytes": kv_block_bytes(record.layout),
        "started_at": record.started_at,
        "workers": [w.worker_id for w, _ in attached],
        "stored_blocks": stored,
        "loaded_blocks": loaded,
        "used": None,
        "in_use": None,
        "cached": None,
        "hits": None,
        "misses": None,
        "hit_rate": None,
        "live_pins": None,
        "live_reservations": None,
        "expired_leases": None,
        "evictions": None,
        "attached_clients": None,
    }
    samples = scrape.samples
    if samples is None:
        return body

    def own(name: str) -> float:
        return samples.value("fabric_node_cache_" + name)

    in_use, cached = own("blocks_in_use"), own("blocks_cached")
    hits, misses = own("hits_total"), own("misses_total")
    body.update(
        capacity=own("blocks_capacity"),
        used=in_use + cached,
        in_use=in_use,
        cached=cached,
        hits=hits,
        misses=misses,
        hit_rate=hits / (hits + misses) if hits + misses else None,
        live_pins=own("live_pins"),
        live_reservations=own("live_reservations"),
        expired_leases=own("expired_pins_total") + own("expired_reservations_total"),
        evictions=own("evictions_total"),
        attached_clients=own("attached_clients"),
    )
    return body


def _state(record: WorkerRecord, scrape: WorkerScrape) -> str:
    """``up`` (its metrics answered; ``draining`` when its record says so: it finishes its
    requests and gets no new ones), ``unreachable`` (they did not) or ``no_metrics``."""
    if scrape.samples is not None:
        return "draining" if record.draining else "up"
    return "unreachable" if record.endpoints.metrics is not None else "no_metrics"


def _tiers_json(samples: Samples) -> list[Json]:
    capacity = samples.by_label("fabric_kvbm_blocks_capacity", "tier")
    order = [tier.value for tier in Tier]
    tiers = []
    for value in sorted(capacity, key=lambda v: order.index(v) if v in order else len(order)):
        hits = samples.value("fabric_kvbm_hits_total", tier=value)
        misses = samples.value("fabric_kvbm_misses_total", tier=value)
        in_use = samples.value("fabric_kvbm_blocks_in_use", tier=value)
        cached = samples.value("fabric_kvbm_blocks_cached", tier=value)
        name = next((TIER_NAMES[t] for t in Tier if t.value == value), value)
        tiers.append(
            {
                "tier": value,
                "name": name,
                "capacity": capacity[value],
                "in_use": in_use,
                "cached": cached,
                "used": in_use + cached,
                "hits": hits,
                "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
            }
        )
    return tiers


def _rate(scrape: WorkerScrape, previous: WorkerScrape | None, name: str) -> float | None:
    """Per second between two scrapes of one worker process; None without two."""
    if previous is None or previous.samples is None or scrape.samples is None:
        return None
    elapsed = scrape.at - previous.at
    if elapsed <= 0:
        return None
    return max(0.0, scrape.samples.value(name) - previous.samples.value(name)) / elapsed
