"""The cluster page's server side: ``/dashboard``, its files, and ``/v1/fabric/cluster``.

A real frontend (uvicorn on an ephemeral port) over an in-memory registry; workers are records
whose ``metrics`` endpoint is a real ``MetricsServer`` over a real ``KvbmMetrics`` +
``WorkerMetrics`` registry, with a pool snapshot and a G4 store the test moves, or a fake
decode worker (``frontend_fakes``) that answers requests; a node cache is a real one (its
service, its metrics registry on a ``MetricsServer``, a real client). Checked: every figure the
page shows moves when its source moves (tiers, hit rates, G4, requests, active and waiting, KV
reads and their rate, tokens per second; a node cache's occupancy, hit rate, live pins,
attached clients and its node's stored and loaded blocks; the frontend's requests, errors, in
flight, queued, TTFT, ITL, routes and their history, KV transfer time and bytes); a worker or
node cache whose metrics do not answer stays listed as ``unreachable``; the API key protects
the JSON, not the page; the static files come from an allow-list. The browser tests are
``tests/e2e/test_cluster_page.py`` and ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from frontend_fakes import BLOCK_SIZE, COMPAT, FakeWorker, RunningFrontend, wait_until

from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Role
from fabric.frontend.api_key import ApiKey
from fabric.frontend.dashboard_cluster import (
    MIN_INTERVAL_S,
    RouteHistory,
    Samples,
    frontend_json,
)
from fabric.frontend.generation import FrontendSettings
from fabric.frontend.metrics import FrontendMetrics, kv_block_bytes
from fabric.kvbm import (
    KvbmMetrics,
    KvGeometry,
    SequenceHash,
    Tier,
    host_storage,
    load_kvbm_config,
)
from fabric.node import NodeCacheConfig, attach_node_cache, build_node_cache
from fabric.node.metrics import node_cache_registry
from fabric.node.service import node_record
from fabric.worker.metrics import MetricsServer, WorkerMetrics

NUM_LAYERS, INNER_DIM = 2, 64  # float32, K and V: one block is 2 * 2 * 16 * 64 * 4 bytes
BLOCK_BYTES = NUM_LAYERS * 2 * BLOCK_SIZE * INNER_DIM * 4


@dataclass
class Snapshot:
    """A pool's stats as ``KvbmMetrics`` reads them (``PoolSnapshot``)."""

    num_blocks: int = 64
    num_in_use: int = 0
    num_cached: int = 0
    num_free: int = 64
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    registered: int = 0
    duplicates: int = 0


class MetricWorker:
    """A registered prefill worker whose metrics endpoint serves what the test sets."""

    def __init__(self, registry: InMemoryRegistry, worker_id: str, node: str | None = None) -> None:
        self.kvbm = KvbmMetrics()
        self.device = Snapshot()
        self.kvbm.bind_pool(Tier.DEVICE, lambda: self.device)
        self.store = {"blocks": 0, "hits": 0, "misses": 0}
        self.kvbm.bind_store(lambda: self.store)
        self.worker = WorkerMetrics(
            self.kvbm.registry, role="prefill", worker_id=worker_id, model="tiny"
        )
        self.server = MetricsServer(self.kvbm.registry)
        record = WorkerRecord(
            worker_id=worker_id,
            role=Role.PREFILL,
            endpoints=Endpoints(metrics=self.server.url),
            agent_name=None,
            layout=FabricLayout(
                model="tiny",
                block_size=BLOCK_SIZE,
                num_layers=NUM_LAYERS,
                outer_dim=2,
                inner_dim=INNER_DIM,
                dtype="float32",
            ),
            compat_hash=COMPAT,
            started_at=time.time(),
            node=node,
        )
        self.registration = WorkerRegistration(registry, record, ttl_s=5.0).start()

    def close(self) -> None:
        self.registration.close()
        self.server.close()


@pytest.fixture
def metric_worker(registry: InMemoryRegistry) -> Iterator[Callable[..., MetricWorker]]:
    """``metric_worker(worker_id, node=None)``: a registered worker with real metrics."""
    workers: list[MetricWorker] = []

    def make(worker_id: str, node: str | None = None) -> MetricWorker:
        workers.append(MetricWorker(registry, worker_id, node))
        return workers[-1]

    yield make
    for worker in workers:
        worker.close()


def get(url: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def cluster(running: RunningFrontend) -> dict[str, Any]:
    status, _, body = get(f"{running.url}/v1/fabric/cluster")
    assert status == 200, body
    return dict(json.loads(body))


def worker_of(snapshot: dict[str, Any], worker_id: str) -> dict[str, Any] | None:
    return next((w for w in snapshot["workers"] if w["id"] == worker_id), None)


def next_cluster(
    running: RunningFrontend, accept: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first snapshot ``accept`` takes (snapshots are cached ``MIN_INTERVAL_S``)."""
    seen: list[dict[str, Any]] = []

    def taken() -> bool:
        seen.append(cluster(running))
        return accept(seen[-1])

    assert wait_until(taken, timeout_s=10 * MIN_INTERVAL_S + 5), seen[-1]
    return seen[-1]


def test_worker_figures_follow_its_metrics(
    start_frontend: Callable[..., RunningFrontend],
    metric_worker: Callable[..., MetricWorker],
) -> None:
    running = start_frontend()
    worker = metric_worker("prefill-7")
    first = next_cluster(running, lambda s: worker_of(s, "prefill-7") is not None)
    shown = worker_of(first, "prefill-7")
    assert shown is not None
    assert (shown["role"], shown["state"], shown["error"]) == ("prefill", "up", None)
    assert shown["block_bytes"] == BLOCK_BYTES
    [device] = shown["tiers"]
    assert (device["tier"], device["name"], device["capacity"]) == ("G1", "device", 64)
    assert (device["used"], device["hit_rate"]) == (0, None)
    assert (shown["requests"], shown["transferred_blocks"]) == (0, 0)
    assert (shown["active"], shown["waiting"]) == (0, 0)
    assert shown["shared"] == {"tier": "G4", "blocks": 0, "hits": 0, "misses": 0, "hit_rate": None}

    worker.device.num_in_use, worker.device.num_cached = 3, 5
    worker.device.hits, worker.device.misses = 6, 2
    worker.worker.requests.labels("generate").inc(4)
    worker.worker.transferred_blocks.inc(10)
    worker.worker.generated_tokens.inc(40)
    worker.worker.active.set(2)
    worker.worker.waiting.set(1)
    worker.store.update(blocks=12, hits=3, misses=1)
    later = next_cluster(running, lambda s: (worker_of(s, "prefill-7") or {}).get("requests") == 4)
    shown = worker_of(later, "prefill-7")
    assert shown is not None
    [device] = shown["tiers"]
    assert (device["in_use"], device["cached"], device["used"]) == (3, 5, 8)
    assert (device["hits"], device["misses"], device["hit_rate"]) == (6, 2, 0.75)
    assert shown["transferred_bytes"] == 10 * BLOCK_BYTES
    assert shown["kv_read_bytes_per_s"] > 0  # 10 blocks since the previous scrape
    assert shown["tokens_per_s"] > 0
    assert (shown["active"], shown["waiting"]) == (2, 1)
    assert shown["shared"] == {"tier": "G4", "blocks": 12, "hits": 3, "misses": 1, "hit_rate": 0.75}


def test_a_node_cache_shows_its_own_metrics_and_its_workers_node_tier(
    start_frontend: Callable[..., RunningFrontend],
    metric_worker: Callable[..., MetricWorker],
    registry: InMemoryRegistry,
) -> None:
    running = start_frontend()
    worker = metric_worker("decode-3", node="host-a")
    metric_worker("decode-4", node="host-b")
    config = NodeCacheConfig(
        kvbm=load_kvbm_config(block_size=4, cpu_cache_blocks=16),
        geometry=KvGeometry(2, 1, 8, torch.float16),
        namespace=f"dash{uuid.uuid4().hex[:10]}",
        node="host-a",
        lease_s=5.0,
    )
    with build_node_cache(config) as service:
        server = MetricsServer(node_cache_registry(service.cache))
        record = node_record(service, config, model="tiny", metrics=server.url)
        registration = WorkerRegistration(registry, record, ttl_s=5.0).start()
        client = attach_node_cache(
            service.endpoint,
            identity="w",
            compat_hash=config.compat_hash,
            layout=config.layout_for(4),
        )
        try:
            first = next_cluster(
                running, lambda s: bool(s["node_caches"]) and len(s["workers"]) == 2
            )
            [shown] = first["node_caches"]
            assert (shown["id"], shown["node"], shown["state"]) == (
                "node-cache-host-a",
                "host-a",
                "up",
            )
            assert (shown["capacity"], shown["used"], shown["hit_rate"]) == (16, 0, None)
            assert (shown["attached_clients"], shown["live_pins"], shown["expired_leases"]) == (
                1,
                0,
                0,
            )
            assert (shown["workers"], shown["stored_blocks"], shown["loaded_blocks"]) == (
                ["decode-3"],
                0,
                0,
            )
            assert worker_of(first, "node-cache-host-a") is None  # never a routed worker

            hashes = [SequenceHash(h) for h in (1, 2, 3)]
            source = host_storage(config.layout_for(3), pin=False)
            assert client.store(hashes, source, [0, 1, 2]).num_stored == 3
            pinned = client.lookup([*hashes[:2], SequenceHash(9)])  # 2 hits, 1 miss
            assert pinned.lease_id is not None
            worker.kvbm.record_offloads(Tier.DEVICE, Tier.NODE, 5)
            worker.kvbm.record_onboards(Tier.NODE, Tier.DEVICE, 2)
            moved = next_cluster(running, lambda s: s["node_caches"][0]["stored_blocks"] == 5)
            [shown] = moved["node_caches"]
            assert shown["loaded_blocks"] == 2
            assert (shown["used"], shown["in_use"], shown["cached"]) == (3, 2, 1)
            assert (shown["hits"], shown["misses"], shown["hit_rate"]) == (2, 1, 2 / 3)
            assert shown["live_pins"] == 1
            client.release(pinned.lease_id)
            released = next_cluster(running, lambda s: s["node_caches"][0]["live_pins"] == 0)
            assert released["node_caches"][0]["in_use"] == 0

            server.close()  # the record stays, its metrics no longer answer
            gone = next_cluster(running, lambda s: s["node_caches"][0]["state"] == "unreachable")
            [shown] = gone["node_caches"]
            assert server.url in shown["error"] and shown["capacity"] == 16
            assert shown["used"] is None
        finally:
            client.close()
            registration.close()
            server.close()
    assert next_cluster(running, lambda s: not s["node_caches"])["node_caches"] == []


def test_an_unreachable_worker_stays_listed(
    start_frontend: Callable[..., RunningFrontend],
    metric_worker: Callable[..., MetricWorker],
) -> None:
    running = start_frontend()
    worker = metric_worker("prefill-8")
    worker.server.close()  # the record stays, its endpoint no longer answers
    snapshot = next_cluster(running, lambda s: worker_of(s, "prefill-8") is not None)
    shown = worker_of(snapshot, "prefill-8")
    assert shown is not None
    assert shown["state"] == "unreachable"
    assert worker.server.url in shown["error"]
    assert shown["tiers"] == []


def complete(running: RunningFrontend, model: str = "tiny") -> int:
    """One completion of 4 tokens; its HTTP status."""
    body = json.dumps({"model": model, "prompt": "KV blocks", "max_tokens": 4}).encode()
    request = urllib.request.Request(
        f"{running.url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_frontend_figures_move_with_requests(
    start_frontend: Callable[..., RunningFrontend],
    make_worker: Callable[..., FakeWorker],
) -> None:
    settings = FrontendSettings(
        idle_timeout_s=5.0, request_timeout_s=30.0, max_in_flight_per_worker=1, queue_timeout_s=8
    )
    running = start_frontend(settings)
    worker = make_worker("decode-0")
    before = next_cluster(running, lambda s: worker_of(s, "decode-0") is not None)
    front = before["frontend"]
    assert (front["requests"], front["routes"]["local"], front["ttft_ms"]) == (0, 0, None)
    assert (front["in_flight"], front["queued"], front["itl_ms"], front["errors"]) == (
        0,
        0,
        None,
        0,
    )
    shown = worker_of(before, "decode-0")
    assert shown is not None
    assert shown["state"] == "no_metrics"  # the fake's record names no metrics endpoint

    # Held by the worker's gate: one request in flight on decode-0, the next one queued (cap 1).
    worker.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(complete, running)
        assert wait_until(lambda: worker.requests.qsize() == 1)
        second = pool.submit(complete, running)
        busy = next_cluster(running, lambda s: s["frontend"]["queued"] == 1)
        assert busy["frontend"]["in_flight"] == 1
        assert (worker_of(busy, "decode-0") or {})["in_flight"] == 1
        worker.gate.set()
        assert (first.result(timeout=10), second.result(timeout=10)) == (200, 200)

    after = next_cluster(running, lambda s: s["frontend"]["completion_tokens"] == 8)["frontend"]
    assert (after["requests"], after["in_flight"], after["queued"]) == (2, 0, 0)
    assert after["routes"]["local"] == 2
    assert after["ttft_ms"] is not None and after["ttft_ms"] > 0
    assert after["itl_ms"] is not None and after["itl_ms"] > 0  # 4 tokens, one chunk each
    # The fake worker reports kv_transfer_ms but no transferred_blocks: nothing was read.
    assert after["kv_transfers"] == 0
    history = next_cluster(running, lambda s: bool(s["routes_history"]["buckets"]))
    assert sum(b["counts"]["local"] for b in history["routes_history"]["buckets"]) == 2

    assert complete(running, model="another") == 404
    failed = next_cluster(running, lambda s: s["frontend"]["errors"] == 1)["frontend"]
    assert failed["requests"] == 3


def test_route_history_buckets_deltas_and_forgets_old_ones() -> None:
    history = RouteHistory(bucket_s=10.0, horizon_s=30.0)
    history.sample(100.0, {"local": 5})  # the first sample is the baseline
    history.sample(101.0, {"local": 7, "prefill": 1})
    history.sample(105.0, {"local": 8, "prefill": 1})
    history.sample(112.0, {"local": 8, "prefill": 4})
    assert history.to_json(["local", "prefill"])["buckets"] == [
        {"start": 100.0, "counts": {"local": 3, "prefill": 1}},
        {"start": 110.0, "counts": {"local": 0, "prefill": 3}},
    ]
    history.sample(141.0, {"local": 9, "prefill": 4})
    assert [b["start"] for b in history.to_json(["local"])["buckets"]] == [140.0]


def test_the_key_protects_the_json_not_the_page(
    start_frontend: Callable[..., RunningFrontend],
) -> None:
    running = start_frontend(api_key=ApiKey("sesame"))
    status, headers, page = get(f"{running.url}/dashboard")
    assert status == 200
    assert b"/dashboard/static/dashboard.js" in page
    assert "script-src 'self'" in headers["content-security-policy"]
    assert get(f"{running.url}/v1/fabric/cluster")[0] == 401
    assert get(f"{running.url}/v1/fabric/cluster", key="wrong")[0] == 401
    status, _, body = get(f"{running.url}/v1/fabric/cluster", key="sesame")
    assert status == 200
    assert json.loads(body)["model"] == "tiny"


def test_static_files_come_from_an_allow_list(
    start_frontend: Callable[..., RunningFrontend],
) -> None:
    running = start_frontend()
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, headers, body = get(f"{running.url}/dashboard/static/{name}")
        assert (status, headers["content-type"].split(";")[0]) == (200, kind)
        assert body
    for name in ("dashboard.html", "..%2Fapi.py", "missing.js"):
        assert get(f"{running.url}/dashboard/static/{name}")[0] == 404


def test_kv_transfer_figures_count_requests_that_read_kv() -> None:
    metrics = FrontendMetrics(dict)
    layout = FabricLayout(
        block_size=BLOCK_SIZE,
        num_layers=NUM_LAYERS,
        outer_dim=2,
        inner_dim=INNER_DIM,
        dtype="float32",
    )
    assert kv_block_bytes(layout) == BLOCK_BYTES
    assert kv_block_bytes(FabricLayout(block_size=BLOCK_SIZE)) is None  # no geometry
    metrics.observe_transfer({"transferred_blocks": 0, "kv_transfer_ms": 0.0}, layout)
    metrics.observe_transfer({"kv_transfer_ms": 2.0}, layout)  # a worker that reads nothing
    own = Samples.of(metrics.registry)
    assert own.value("fabric_frontend_kv_transfer_seconds_count") == 0
    metrics.observe_transfer({"transferred_blocks": 3, "kv_transfer_ms": 4.0}, layout)
    own = Samples.of(metrics.registry)
    assert own.value("fabric_frontend_kv_transfer_seconds_count") == 1
    assert own.value("fabric_frontend_kv_transfer_seconds_sum") == pytest.approx(0.004)
    assert own.value("fabric_frontend_kv_transfer_bytes_total") == 3 * BLOCK_BYTES
    shown = frontend_json(own, in_flight=0)  # the page's cards: count, mean, bandwidth
    assert (shown["kv_transfers"], shown["kv_transfer_ms"]) == (1, pytest.approx(4.0))
    assert shown["kv_transfer_bytes_per_s"] == pytest.approx(3 * BLOCK_BYTES / 0.004)


def test_the_prefix_hit_figures_follow_the_routes_counter() -> None:
    metrics = FrontendMetrics(dict)
    assert frontend_json(Samples.of(metrics.registry), 0)["prefix_blocks"] == {}
    metrics.prefix_blocks.labels("hit").inc(6)  # as generation counts a routed request
    metrics.prefix_blocks.labels("miss").inc(2)
    shown = frontend_json(Samples.of(metrics.registry), 0)["prefix_blocks"]
    assert shown == {"hit": 6, "miss": 2}  # the page's prefix hit rate: 6 / 8
