"""Per-request KV traces through real processes: the response's ``fabric.kv_trace`` and
``GET /v1/requests/{id}`` say where each prompt range's K/V came from.

One deployment for the module, in its own namespace: ``prefill-t`` (lease TTL 3 s), ``decode-t``
(fallback: recompute), ``aggregated-t`` and a frontend. Requests are pinned, so each route is
known: a 1P1D request reads every prompt block from ``prefill-t`` over NIXL; an aggregated
worker's second request with the first one's prompt as its prefix finds that prefix in its own
device cache (or host tier) and computes the rest; a request whose pinned prefill worker is
SIGKILLed while it waits is recomputed by the decode worker, and its trace carries the reason.
Sources and ranges are asserted, timings only as non-negative.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_harness import (
    BLOCK_SIZE,
    MODEL,
    REQUEST_S,
    Deployment,
    prompt_ids,
    scrape,
    wait_until,
)

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer

pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

MAX_TOKENS = 4
STEPS = {"route", "queue", "onboard", "transfer", "transfer_wait", "prefill", "first_token"}


@pytest.fixture(scope="module")
def traced(
    etcd: EtcdServer,
    registry: EtcdRegistry,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    deployment = Deployment(
        "trace", etcd.endpoint, registry, model_dir, tmp_path_factory.mktemp("trace")
    )
    try:
        deployment.spawn_frontend()
        deployment.spawn_worker("prefill", "prefill-t", "--registration-ttl=3")
        deployment.spawn_worker("decode", "decode-t", "--prefill-fallback=recompute")
        deployment.spawn_worker("aggregated", "aggregated-t")
        deployment.wait_workers(prefill=1, decode=1, aggregated=1)
        yield deployment
    finally:
        deployment.close()


def pinned(deployment: Deployment, prompt: list[int], worker: str, source: str) -> dict[str, Any]:
    """The ``fabric`` field of one completion pinned to ``worker`` reading from ``source``."""
    response = deployment.client().completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        extra_body={"fabric": {"worker": worker, "prefill_worker": source}},
    )
    fabric = dict((response.model_extra or {})["fabric"])
    shown = httpx.get(f"{deployment.url}/v1/requests/{response.id}", timeout=REQUEST_S)
    assert shown.status_code == 200, shown.text
    assert shown.json()["fabric"] == fabric  # the route serves what the response carried
    steps = fabric["kv_trace"]["steps_ms"]
    assert set(steps) == STEPS and all(value >= 0 for value in steps.values()), steps
    return fabric


def segments(fabric: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    trace = fabric["kv_trace"]["segments"]
    return [(s["source"], s["start"], s["end"], s["worker"]) for s in trace]


def test_disaggregated_request_names_its_prefill_worker(traced: Deployment) -> None:
    def nixl_read(name: str, **labels: str) -> float:
        return traced.worker_metric("decode-t", name, 0.0, op="READ", **labels)

    bytes_before = nixl_read("fabric_nixl_transfer_bytes_total", backend="UCX")
    done_before = nixl_read("fabric_nixl_transfers_total", outcome="done")
    fabric = pinned(traced, prompt_ids(50, seed=71), "decode-t", "prefill-t")
    assert segments(fabric) == [("prefill", 0, 50, "prefill-t")]
    assert fabric["transferred_blocks"] == -(-50 // BLOCK_SIZE)
    assert fabric["kv_trace"]["fallback"] == ""
    # The read went through NIXL: its telemetry is on the decode worker's /metrics.
    assert nixl_read("fabric_nixl_transfer_bytes_total", backend="UCX") > bytes_before
    assert nixl_read("fabric_nixl_transfers_total", outcome="done") > done_before
    assert "fabric_signal_errors_total" in scrape(f"{traced.url}/metrics")  # exported there too


def test_aggregated_prefix_hit_is_device_then_recompute(traced: Deployment) -> None:
    prefix = prompt_ids(4 * BLOCK_SIZE, seed=72)
    first = pinned(traced, prefix, "aggregated-t", "")
    assert segments(first) == [("recompute", 0, 4 * BLOCK_SIZE, "")]
    second = pinned(traced, [*prefix, *prompt_ids(30, seed=73)], "aggregated-t", "")
    (cached, computed) = segments(second)
    assert cached[0] in ("device", "host") and cached[1:] == (0, 4 * BLOCK_SIZE, "")
    assert computed == ("recompute", 4 * BLOCK_SIZE, 4 * BLOCK_SIZE + 30, "")


def test_fallback_after_the_prefill_worker_died_carries_its_reason(traced: Deployment) -> None:
    """Last in the module: it kills ``prefill-t``."""
    victim = traced.procs["prefill-t"]
    prompt = prompt_ids(40, seed=74)
    with ThreadPoolExecutor(1) as pool:
        victim.pause()
        future = pool.submit(pinned, traced, prompt, "decode-t", "prefill-t")
        assert wait_until(
            lambda: traced.worker_metric("decode-t", "fabric_worker_active_requests") == 1, 5.0
        ), traced.logs()
        victim.kill()
        fabric = future.result(timeout=REQUEST_S)
    assert segments(fabric) == [("recompute", 0, 40, "")]
    reason = fabric["kv_trace"]["fallback"]
    assert "prefill-t" in reason and "left the directory" in reason
    assert fabric["fallback"] == reason and fabric["prefill_worker"] == ""
    traced.assert_no_blocks_in_use()
