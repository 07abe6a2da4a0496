"""The connector's NIXL metrics (``fabric.integrations.vllm.telemetry``): a real P/D read
between a producer and a consumer connector worker (two NIXL agents of this process, UCX on
loopback, an in-memory registry instead of etcd) reaches vLLM's connector stats with NIXL's
bytes, and vLLM's Prometheus side adds them to the fabric's series; failed transfers count by
kind; ranks' stats merge.

Runs with the .venv-vllm interpreter::

    .venv-vllm/bin/python -m pytest tests/integrations/vllm -q -m "not slow"
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from page_fixtures import GEOMETRY, vllm_kv_caches
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

pytest.importorskip("vllm", reason="run with .venv-vllm (launch/setup_vllm.sh)")

from connector_sides import PROMPT, Instance

from fabric.discovery.memory import InMemoryRegistry
from fabric.integrations.vllm.connector import FabricConnector
from fabric.integrations.vllm.metadata import FabricMetadata, PeerHold, PeerRead, token_digest
from fabric.integrations.vllm.telemetry import (
    FabricPromMetrics,
    FabricTransferStats,
    TransferTally,
)
from fabric.integrations.vllm.worker import FabricWorker
from fabric.transfer import metrics as transfer_metrics
from fabric.transfer.metrics import TransferOutcome

NUM_HELD = 3


class _Shared(InMemoryRegistry):
    """One registry for both instances: their workers' ``close`` leaves it open."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def close(self) -> None:
        return


@pytest.fixture
def pd_pair(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FabricWorker, FabricWorker]]:
    """A producer's and a consumer's connector workers over pages of different bytes."""
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    registry = _Shared()
    monkeypatch.setattr("fabric.discovery.etcd.EtcdRegistry", lambda *a, **k: registry)
    made: list[FabricWorker] = []
    try:
        for seed, role in ((1, "kv_producer"), (2, "kv_consumer")):
            extra = {"etcd_endpoints": "http://127.0.0.1:9", "worker_id": f"{role}-t"}
            sides = Instance(extra, seed, role)  # scheduler + worker; P/D not started yet
            sides.scheduler.shutdown()
            made.append(sides.worker)
            sides.worker.register_kv_caches(vllm_kv_caches(seed))  # NIXL, joins the registry
        yield made[0], made[1]
    finally:
        for worker in reversed(made):
            worker.shutdown()
        InMemoryRegistry.close(registry)


def test_a_p_d_read_reaches_vllm_s_connector_stats_and_prometheus(
    pd_pair: tuple[FabricWorker, FabricWorker],
) -> None:
    producer, consumer = pd_pair
    num_tokens = NUM_HELD * GEOMETRY.block_size
    tokens = tuple(PROMPT[:num_tokens])
    hold = PeerHold("p", (5, 6, 7), num_tokens, token_digest(list(tokens)), 30.0)
    producer.start_load_kv(FabricMetadata(holds=[hold]))
    read = PeerRead("d", "kv_producer-t", "p", tokens, 0, (1, 2, 3))
    consumer.transfers.take()  # whatever came before
    deadline = time.monotonic() + 30
    consumer.start_load_kv(FabricMetadata(reads=[read]))
    while not consumer.get_finished(set())[1] and time.monotonic() < deadline:
        producer.progress()
        time.sleep(0.01)
    assert consumer.take_load_errors() == set()
    assert np.array_equal(consumer.pages.gather([1, 2, 3]), producer.pages.gather([5, 6, 7]))

    connector = FabricConnector.__new__(FabricConnector)
    connector._worker, connector._scheduler = consumer, None
    stats = connector.get_kv_connector_stats()
    assert isinstance(stats, FabricTransferStats)
    done = [r for r in stats.rows if r[1] == TransferOutcome.DONE.value]
    assert done and all(r[0] == "READ" for r in done)
    assert sum(int(r[3]) for r in done) == NUM_HELD * GEOMETRY.block_bytes
    assert connector.get_kv_connector_stats() is None  # taken once

    # vLLM's API server: the stats, as a dict, through the connector's Prometheus metrics.
    registry = CollectorRegistry()
    metrics = prom_metrics(registry)
    rebuilt = FabricConnector.build_kv_connector_stats(stats.to_dict())
    assert isinstance(rebuilt, FabricTransferStats) and rebuilt.rows == stats.rows
    metrics.observe(rebuilt.to_dict(), engine_idx=0)
    labels = {"model_name": "m", "engine": "0", "op": "READ"}
    moved = sum(
        registry.get_sample_value("vllm:fabric_nixl_transfer_bytes_total", {**labels, "backend": b})
        or 0.0
        for b in {str(r[2]) for r in done}
    )
    assert moved == NUM_HELD * GEOMETRY.block_bytes
    assert registry.get_sample_value(
        "vllm:fabric_nixl_transfers_total", {**labels, "outcome": "done"}
    ) == len(done)


def prom_metrics(registry: CollectorRegistry) -> FabricPromMetrics:
    """``FabricConnector.build_prom_metrics`` as vLLM calls it, into ``registry``."""
    types: dict[Any, Any] = {
        cls: functools.partial(cls, registry=registry) for cls in (Gauge, Counter, Histogram)
    }
    built = FabricConnector.build_prom_metrics(
        cast(Any, SimpleNamespace(kv_transfer_config=None)),
        types,
        ["model_name", "engine"],
        {0: ["m", "0"]},
    )
    assert isinstance(built, FabricPromMetrics)
    return built


def test_failures_count_by_kind_and_ranks_merge() -> None:
    tally = TransferTally()
    tally.start()
    try:
        transfer_metrics.record_error("READ", TransferOutcome.PEER_UNAVAILABLE)
        transfer_metrics.record_done("READ", "UCX", 2_000_000, 0.004, 2)
    finally:
        tally.stop()
    transfer_metrics.record_error("READ", TransferOutcome.CANCELLED)  # after stop: not taken
    rows = tally.take()
    assert [r[1] for r in rows] == ["peer_unavailable", "done"]
    assert tally.take() == []
    rank0 = FabricTransferStats(data={"nixl": rows})
    rank1 = FabricTransferStats(data={"nixl": [["READ", "done", "UCX", 1_000_000, 0.002, 1]]})
    merged = rank0.aggregate(rank1)
    assert isinstance(merged, FabricTransferStats)
    assert merged.reduce() == {
        "nixl_transfers": 2,
        "nixl_failed_transfers": 1,
        "nixl_MB": 3.0,
        "nixl_avg_ms": 3.0,
    }
    registry = CollectorRegistry()
    prom_metrics(registry).observe(merged.to_dict())
    labels = {"model_name": "m", "engine": "0", "op": "READ"}
    assert (
        registry.get_sample_value(
            "vllm:fabric_nixl_transfer_errors_total", {**labels, "kind": "peer_unavailable"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "vllm:fabric_nixl_transfer_seconds_count", {**labels, "backend": "UCX"}
        )
        == 2
    )
    assert FabricTransferStats().is_empty() and not merged.is_empty()
