"""The router on a node tier, through real processes: a prefix one worker stored in its node's
cache is routed to another instance of that node, which reads it from the node tier.

One deployment in its own namespace on the session's etcd: a node cache (``fabric serve
node-cache``, node ``e2e-node-<ns>``), aggregated workers ``agg-a`` and ``agg-b`` attached to it
(``--node-cache etcd``), ``agg-0`` on another node without one (its id sorts first, so a load
tie would go to it without the node tier), and a frontend. Verdicts come from the responses'
``fabric`` field, ``GET /v1/requests/{id}`` and ``/metrics``, never from timings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_harness import (
    BLOCK_SIZE,
    MODEL,
    REQUEST_S,
    Deployment,
    metric,
    prompt_ids,
    scrape,
    spawn,
    wait_until,
)

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer

pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

MAX_TOKENS = 6
NODE_BLOCKS = 64
PREFIX_BLOCKS = 8
WAIT_S = 60.0


@pytest.fixture(scope="module")
def deployed(
    etcd: EtcdServer,
    registry: EtcdRegistry,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Deployment, str]]:
    deployment = Deployment(
        "noderoute", etcd.endpoint, registry, model_dir, tmp_path_factory.mktemp("noderoute")
    )
    node = f"e2e-node-{deployment.namespace[-6:]}"
    try:
        deployment.procs["node-cache"] = spawn(
            "node-cache",
            [
                "serve",
                "node-cache",
                f"--model={model_dir}",
                f"--blocks={NODE_BLOCKS}",
                f"--block-size={BLOCK_SIZE}",
                f"--namespace={deployment.namespace}",
                f"--node={node}",
                f"--etcd={etcd.endpoint}",
                "--registration-ttl=2",
            ],
            deployment.log_dir,
        )
        deployment.spawn_frontend()
        attached = ("--node-cache=etcd", f"--node-name={node}", "--registration-ttl=2")
        deployment.spawn_worker("aggregated", "agg-a", *attached)
        deployment.spawn_worker("aggregated", "agg-b", *attached)
        deployment.spawn_worker("aggregated", "agg-0", "--node-name=e2e-elsewhere")
        deployment.wait_workers(aggregated=3)
        yield deployment, node
    finally:
        deployment.close()
        # The node cache removes its segment and owner file when it stops cleanly; after a
        # failure (a process killed in teardown) they are removed here.
        for leftover in Path("/dev/shm").glob(f"kvfabric-{deployment.namespace}-*"):
            leftover.unlink(missing_ok=True)


def complete(
    deployment: Deployment, prompt: list[int], **fabric: str
) -> tuple[str, dict[str, Any]]:
    """One completion (pinned with ``fabric``, if given): its text and its ``fabric`` field, which
    ``GET /v1/requests/{id}`` must show too."""
    extra = {"fabric": fabric} if fabric else None
    response = deployment.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, extra_body=extra
    )
    info = dict((response.model_extra or {})["fabric"])
    shown = httpx.get(f"{deployment.url}/v1/requests/{response.id}", timeout=REQUEST_S)
    assert shown.status_code == 200, shown.text
    assert shown.json()["fabric"] == info
    return response.choices[0].text, info


def segments(info: dict[str, Any]) -> list[tuple[str, int, int]]:
    return [(s["source"], s["start"], s["end"]) for s in info["kv_trace"]["segments"]]


def test_a_prefix_in_the_node_tier_routes_to_another_instance_of_the_node(
    deployed: tuple[Deployment, str],
) -> None:
    deployment, node = deployed
    prefix = prompt_ids(PREFIX_BLOCKS * BLOCK_SIZE, seed=91)
    prefix_tokens = PREFIX_BLOCKS * BLOCK_SIZE
    # agg-a computes the prefix; every full block it registers is stored in the node cache.
    _, first = complete(deployment, [*prefix, *prompt_ids(5, seed=92)], worker="agg-a")
    assert first["worker"] == "agg-a" and segments(first)[0][0] == "recompute"

    def node_indexed() -> float:
        text = scrape(f"{deployment.url}/metrics")
        labels = {"worker": f"node-cache-{node}"}
        return metric(text, "fabric_frontend_worker_indexed_blocks", 0.0, **labels)

    assert wait_until(lambda: node_indexed() >= PREFIX_BLOCKS, WAIT_S, poll_s=0.2), (
        f"the frontend did not index the node cache's blocks:\n{deployment.logs()}"
    )
    # agg-a gone (SIGKILL: its device copy with it), agg-b and agg-0 idle: agg-b serves, from
    # the node tier, though agg-0's id sorts first.
    deployment.procs["agg-a"].kill()
    deployment.wait_workers(aggregated=2)
    prompt = [*prefix, *prompt_ids(20, seed=93)]
    text, routed = complete(deployment, prompt)
    assert (routed["worker"], routed["route"], routed["routed_prefill_worker"]) == (
        "agg-b",
        "node",
        "",
    ), deployment.logs()
    assert routed["routed_prefix_blocks"] == PREFIX_BLOCKS
    assert segments(routed) == [
        ("node", 0, prefix_tokens),
        ("recompute", prefix_tokens, len(prompt)),
    ]
    # The same prompt computed from scratch elsewhere gives the same answer.
    recomputed, local = complete(deployment, prompt, worker="agg-0", prefill_worker="")
    assert segments(local) == [("recompute", 0, len(prompt))] and recomputed == text
    metrics = scrape(f"{deployment.url}/metrics")
    assert metric(metrics, "fabric_frontend_routes_total", kind="node") == 1.0
