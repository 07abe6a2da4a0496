"""Prometheus metrics of the frontend (``GET /metrics``), every name ``fabric_frontend_*``.

Owns a private ``CollectorRegistry`` (never the process-global one), so several frontends can
live in one test process.

* ``requests_total{endpoint}``, ``request_errors_total{endpoint,status}`` (HTTP status of the
  failure: 400, 404, 413, 429, 500, 503, 504), ``prompt_tokens_total``,
  ``completion_tokens_total``;
* ``refusals_total{reason}``: requests refused before reaching a worker, by ``errors.Refusal``:
  ``body_too_large`` and ``prompt_too_large`` (413), ``queue_full`` and ``no_room`` (429),
  ``no_workers`` (503); every reason is exported from the start, at 0;
* ``ttft_seconds`` (request received -> first token) and ``itl_seconds`` (time between tokens:
  the gap between two chunks divided by the second chunk's tokens, one observation per token);
* ``routes_total{kind}``: routed requests by route kind (``policy.RouteKind``): ``local`` (the
  serving worker computes the prompt), ``prefill`` (a decode worker reads a dedicated prefill
  worker's KV), ``peer_hit`` (the serving worker reads a prefix another worker holds), ``node`` (the
  serving worker reads its prefix from its node's tier); every kind is exported from the
  start, at 0;
* ``prefix_blocks_total{result}``: full prompt blocks the chosen KV provider (the named
  ``prefill_worker``, else the serving worker itself) already held (``hit``) or not (``miss``),
  as the router saw them;
* ``kv_transfer_seconds`` and ``kv_transfer_bytes_total``: the prompt KV a serving worker read
  from another worker, per finished request that read any (the worker's ``kv_transfer_ms`` and
  ``transferred_blocks`` statistics; bytes are blocks times the serving worker's block bytes,
  ``kv_block_bytes``, left out when its record does not give them);
* read at scrape time from the fleet: ``worker_in_flight{worker,role}``, ``workers{role}`` and
  ``worker_indexed_blocks{worker}`` (distinct blocks the KV index knows the worker holds, on
  any tier, from its KV events; absent for workers that publish none; a node cache whose
  events the index follows has one too, under its id); from the admission
  queue: ``queued`` (requests tokenizing or waiting for a worker with room; absent without a
  reader).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fabric.discovery.records import FabricLayout, WorkerLayout
from fabric.discovery.registry import Role
from fabric.frontend.errors import Refusal
from fabric.frontend.policy import RouteKind

PREFIX = "fabric_frontend_"
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

InFlightReader = Callable[[], Mapping[str, tuple[Role, int]]]


IndexReader = Callable[[], Mapping[str, int]]


class _RouterCollector(Collector):
    def __init__(self, read: InFlightReader, read_index: IndexReader | None) -> None:
        self._read = read
        self._read_index = read_index

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            PREFIX + "worker_in_flight",
            "Requests in flight on a worker (prefill: until its first token).",
            labels=["worker", "role"],
        )
        workers = GaugeMetricFamily(
            PREFIX + "workers", "Eligible workers known to the router.", labels=["role"]
        )
        counts = dict.fromkeys((Role.PREFILL, Role.DECODE, Role.AGGREGATED), 0)
        for worker_id, (role, count) in sorted(self._read().items()):
            in_flight.add_metric([worker_id, role.value], count)
            counts[role] = counts.get(role, 0) + 1
        for role, count in counts.items():
            workers.add_metric([role.value], count)
        yield in_flight
        yield workers
        if self._read_index is not None:
            indexed = GaugeMetricFamily(
                PREFIX + "worker_indexed_blocks",
                "Distinct blocks the KV index knows a worker holds (any tier).",
                labels=["worker"],
            )
            for worker_id, count in sorted(self._read_index().items()):
                indexed.add_metric([worker_id], count)
            yield indexed


class FrontendMetrics:
    """The frontend's metrics (see the module docstring)."""

    def __init__(
        self,
        read_in_flight: InFlightReader,
        read_index: IndexReader | None = None,
        read_queued: Callable[[], int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests", "Requests received.", ["endpoint"], registry=self.registry
        )
        self.errors = Counter(
            PREFIX + "request_errors",
            "Requests that failed, by HTTP status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.refusals = Counter(
            PREFIX + "refusals",
            "Requests refused before reaching a worker (413, 429, 503), by reason.",
            ["reason"],
            registry=self.registry,
        )
        for refusal in Refusal:
            self.refusals.labels(refusal.value)
        if read_queued is not None:
            Gauge(
                PREFIX + "queued",
                "Requests tokenizing or waiting for a worker with room.",
                registry=self.registry,
            ).set_function(read_queued)
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of routed requests.", registry=self.registry
        )
        self.completion_tokens = Counter(
            PREFIX + "completion_tokens", "Tokens generated.", registry=self.registry
        )
        self.ttft = Histogram(
            PREFIX + "ttft_seconds",
            "Time from request to first token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            PREFIX + "itl_seconds",
            "Time between two generated tokens.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.routes = Counter(
            PREFIX + "routes",
            "Routed requests by route kind (local, prefill, peer_hit, node).",
            ["kind"],
            registry=self.registry,
        )
        for kind in RouteKind:
            self.routes.labels(kind.value)
        self.prefix_blocks = Counter(
            PREFIX + "prefix_blocks",
            "Full prompt blocks the chosen KV provider already held (hit) or not (miss).",
            ["result"],
            registry=self.registry,
        )
        self.kv_transfer = Histogram(
            PREFIX + "kv_transfer_seconds",
            "Time a serving worker spent reading a request's prompt KV from another worker.",
            buckets=_TRANSFER_BUCKETS,
            registry=self.registry,
        )
        self.kv_transfer_bytes = Counter(
            PREFIX + "kv_transfer_bytes",
            "Bytes of prompt KV serving workers read from other workers.",
            registry=self.registry,
        )
        self.registry.register(_RouterCollector(read_in_flight, read_index))

    def observe_transfer(self, stats: Mapping[str, object], layout: WorkerLayout) -> None:
        """Count a finished request's KV read (its worker's statistics), if it read any."""
        blocks = stats.get("transferred_blocks")
        millis = stats.get("kv_transfer_ms")
        if not isinstance(blocks, int) or blocks <= 0 or not isinstance(millis, int | float):
            return
        self.kv_transfer.observe(millis / 1e3)
        block_bytes = kv_block_bytes(layout)
        if block_bytes is not None:
            self.kv_transfer_bytes.inc(blocks * block_bytes)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


def kv_block_bytes(layout: WorkerLayout) -> int | None:
    """Bytes of one KV block over all layers of a fabric worker's pool; None when its record
    does not give the geometry (a vLLM instance, an older worker)."""
    if not isinstance(layout, FabricLayout):
        return None
    dtype = getattr(torch, layout.dtype or "", None)
    dims = (layout.num_layers, layout.outer_dim, layout.block_size, layout.inner_dim)
    if not isinstance(dtype, torch.dtype):
        return None
    block_bytes = dtype.itemsize
    for dim in dims:
        if dim is None:
            return None
        block_bytes *= dim
    return block_bytes
