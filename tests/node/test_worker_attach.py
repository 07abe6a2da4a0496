"""Reference workers attached to a node cache, in this process (the node's shared segment is
real; discovery is the in-memory registry, NIXL the loopback fake): a prefix one worker computed
is loaded by another from the node tier (one lookup, one copy), with the same output; a full node
tier evicts and never fails a request; a node cache that restarts is attached again without a
worker restart. Multi-process runs (real etcd, worker processes, kill -9) are in
``test_worker_processes.py``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "worker"))  # the serving tests' harness
from harness_probes import wait_until
from serving_harness import Frontend, Result, prompt_of

from fabric.config import load_config
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registration import WorkerDirectory, WorkerRegistration
from fabric.discovery.registry import Role
from fabric.kvbm import Tier, load_kvbm_config
from fabric.models.config import ModelConfig
from fabric.node import NodeCacheConfig, NodeCacheService, build_node_cache
from fabric.node.service import node_record
from fabric.transfer.loopback import LoopbackAgent, LoopbackRegistry
from fabric.worker.runtime import WorkerRuntime, build_worker

BLOCK = 16
NODE = "test"


@dataclass
class Host:
    """One host: a registry, its node cache (restartable) and its workers."""

    tiny_dir: Path
    namespace: str
    registry: InMemoryRegistry = field(default_factory=InMemoryRegistry)
    loopback: LoopbackRegistry = field(default_factory=LoopbackRegistry)
    runtimes: list[WorkerRuntime] = field(default_factory=list)
    service: NodeCacheService | None = None
    registration: WorkerRegistration | None = None

    def start_node(self, num_blocks: int = 64) -> NodeCacheService:
        config = NodeCacheConfig(
            kvbm=load_kvbm_config(block_size=BLOCK, cpu_cache_blocks=num_blocks),
            geometry=ModelConfig.from_dir(self.tiny_dir).kv_geometry(),
            namespace=self.namespace,
            node=NODE,
            lease_s=5.0,
        )
        self.service = build_node_cache(config)
        self.registration = WorkerRegistration(
            self.registry,
            node_record(self.service, config, model="tiny"),
            ttl_s=5.0,
            namespace=self.namespace,
        ).start()
        return self.service

    def stop_node(self) -> None:
        if self.registration is not None:
            self.registration.close()
        if self.service is not None:
            self.service.close()
        self.registration = self.service = None

    def start_worker(
        self,
        worker_id: str,
        *,
        node: bool = True,
        role: Role = Role.AGGREGATED,
        **settings: object,
    ) -> WorkerRuntime:
        node_settings = {"node_cache": "etcd", "node_name": NODE} if node else {}
        config = load_config(
            model=str(self.tiny_dir),
            worker_id=worker_id,
            namespace=self.namespace,
            block_size=BLOCK,
            registration_ttl_s=1.0,
            **{"device_blocks": 64, **node_settings, **settings},
        )
        runtime = build_worker(
            role,
            config,
            registry=self.registry,
            make_agent=lambda name: LoopbackAgent(name, self.loopback),
        )
        self.runtimes.append(runtime)
        return runtime

    def node_stats(self) -> dict[str, int]:
        assert self.service is not None
        return self.service.cache.stats()


@pytest.fixture
def host(tiny_dir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Host, Frontend]]:
    the_host = Host(tiny_dir, namespace=f"node-{request.node.name[-24:]}".replace("_", "-"))
    directory = WorkerDirectory(the_host.registry, namespace=the_host.namespace).start()
    front = Frontend(directory)
    try:
        yield the_host, front
    finally:
        front.close()
        directory.close()
        for runtime in reversed(the_host.runtimes):
            runtime.close()
        the_host.stop_node()
        the_host.registry.close()


def run(front: Frontend, worker_id: str, prompt: list[int]) -> Result:
    result = front.generate(worker_id, prompt, 6)
    assert result.final.finish_reason == "length", result.stats
    return result


def counter(runtime: WorkerRuntime, name: str, **labels: str) -> float:
    value = runtime.kvbm.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def from_node(runtime: WorkerRuntime) -> float:
    return counter(
        runtime, "fabric_kvbm_onboards_total", source=Tier.NODE.value, target=Tier.DEVICE.value
    )


def to_node(runtime: WorkerRuntime) -> float:
    return counter(
        runtime, "fabric_kvbm_offloads_total", source=Tier.DEVICE.value, target=Tier.NODE.value
    )


def idle(host: Host, *runtimes: WorkerRuntime) -> bool:
    stats = host.node_stats()
    pools_idle = all(r.kvbm.pool().stats().num_in_use == 0 for r in runtimes)
    return pools_idle and stats["live_pins"] == 0 and stats["live_reservations"] == 0


def test_a_prefix_computed_by_one_worker_is_loaded_by_another_from_the_node_tier(
    host: tuple[Host, Frontend],
) -> None:
    the_host, front = host
    the_host.start_node()
    a, b = the_host.start_worker("a"), the_host.start_worker("b")
    reference = the_host.start_worker("reference", node=False)
    shared = prompt_of(8 * BLOCK, seed=1)
    run(front, "a", shared + prompt_of(5, seed=2))
    assert to_node(a) == 8  # every full block stored once: the 8 shared ones
    assert the_host.node_stats()["committed_blocks"] == 8

    prompt = shared + prompt_of(20, seed=3)
    hit = run(front, "b", prompt)

    assert hit.stats["cached_tokens"] == 8 * BLOCK
    assert hit.stats["computed_tokens"] == 20
    assert hit.stats["prefill_worker"] == ""  # no peer was asked: the node tier served it
    assert from_node(b) == 8
    assert hit.tokens == run(front, "reference", prompt).tokens
    assert from_node(reference) == 0
    assert wait_until(lambda: idle(the_host, a, b), 10.0)
    the_host.service.cache.check_invariants()  # type: ignore[union-attr]


def test_a_full_node_tier_evicts_and_never_fails_a_request(host: tuple[Host, Frontend]) -> None:
    the_host, front = host
    the_host.start_node(num_blocks=6)  # less than one prompt's 8 full blocks
    a = the_host.start_worker("a")
    b = the_host.start_worker("b", device_blocks=24)
    reference = the_host.start_worker("reference", node=False)
    prompts = [prompt_of(8 * BLOCK + 3, seed=10 + i) for i in range(4)]
    for prompt in prompts:
        run(front, "a", prompt)
    stats = the_host.node_stats()
    assert stats["evictions"] > 0 and stats["num_cached"] <= 6
    for prompt in prompts:  # whatever is left is a hit, the rest is computed: same output
        assert run(front, "b", prompt).tokens == run(front, "reference", prompt).tokens
    assert from_node(b) <= 6 * len(prompts)
    assert wait_until(lambda: idle(the_host, a, b, reference), 10.0)
    the_host.service.cache.check_invariants()  # type: ignore[union-attr]


def test_a_restarted_node_cache_is_attached_again_without_a_worker_restart(
    host: tuple[Host, Frontend],
) -> None:
    the_host, front = host
    the_host.start_node()
    a, b = the_host.start_worker("a"), the_host.start_worker("b")
    run(front, "a", prompt_of(4 * BLOCK, seed=20))
    assert a.node is not None and a.node.num_attaches == 1
    the_host.stop_node()
    the_host.start_node()  # empty, a new segment under the same name, a new endpoint
    shared = prompt_of(6 * BLOCK, seed=21)
    # The first use after the restart finds the old service gone (a miss, never a failure);
    # the next one attaches to the new service.
    run(front, "a", prompt_of(2 * BLOCK, seed=22))
    run(front, "a", [*shared, 5])
    assert a.node.num_attaches == 2
    assert the_host.node_stats()["committed_blocks"] >= 6
    before = from_node(b)
    hit = run(front, "b", shared + prompt_of(3, seed=23))
    assert from_node(b) - before == 6 and hit.stats["cached_tokens"] == 6 * BLOCK
    assert hit.stats["kv_trace"] == f"node:0-{6 * BLOCK},recompute:{6 * BLOCK}-{6 * BLOCK + 3}"


@pytest.mark.parametrize("tail", [5, 0], ids=["partial-tail-block", "block-aligned"])
def test_same_host_pd_takes_the_prompt_from_the_node_tier(
    host: tuple[Host, Frontend], tail: int
) -> None:
    the_host, front = host
    the_host.start_node()
    prefill = the_host.start_worker("p", role=Role.PREFILL)
    decode = the_host.start_worker("d", role=Role.DECODE)
    the_host.start_worker("reference", node=False)
    prompt = prompt_of(8 * BLOCK + tail, seed=30)

    result = front.generate("d", prompt, 6, prefill_worker="p")

    assert result.final.finish_reason == "length", result.stats
    assert result.stats["prefill_worker"] == "p"
    assert to_node(prefill) == 8  # the prefill stored the prompt's full blocks...
    assert from_node(decode) == 8  # ...the decode took them from the node tier
    assert result.stats["transferred_blocks"] == (1 if tail else 0)  # the rest over NIXL
    read = f",prefill:{8 * BLOCK}-{8 * BLOCK + tail}" if tail else ""
    assert result.stats["kv_trace"] == f"node:0-{8 * BLOCK}{read}"  # the KV trace says so
    assert result.tokens == run(front, "reference", prompt).tokens
    assert wait_until(lambda: idle(the_host, prefill, decode), 10.0)
