"""The async offload manager wired into a worker: device registrations are copied to the host
tier, and a prompt whose blocks the device evicted is served from the host (onboarded, not
recomputed), in-process (in-memory registry, loopback agents) like test_serving_inprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from harness_probes import wait_until
from serving_harness import Frontend

from fabric.config import load_config
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Role
from fabric.kvbm import Tier
from fabric.transfer.loopback import LoopbackAgent, LoopbackRegistry
from fabric.worker.runtime import WorkerRuntime, build_worker

BLOCK = 16


@pytest.fixture
def worker(tiny_dir: Path) -> Iterator[tuple[WorkerRuntime, Frontend]]:
    registry = InMemoryRegistry()
    config = load_config(
        model=str(tiny_dir),
        worker_id="offload",
        namespace="offload-wiring",
        device_blocks=12,
        cpu_cache_blocks=64,
        block_size=BLOCK,
        registration_ttl_s=1.0,
    )
    loopback = LoopbackRegistry()
    runtime = build_worker(
        Role.AGGREGATED,
        config,
        registry=registry,
        make_agent=lambda name: LoopbackAgent(name, loopback),
    )
    directory = WorkerDirectory(registry, namespace="offload-wiring").start()
    front = Frontend(directory)
    try:
        yield runtime, front
    finally:
        front.close()
        directory.close()
        runtime.close()
        registry.close()


def prompt_of(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 1024, (length,), generator=generator).tolist()


def settled(runtime: WorkerRuntime) -> bool:
    """No offload queued or in flight and no block referenced on any tier."""
    assert runtime.offload is not None
    kvbm = runtime.kvbm
    return runtime.offload.idle and all(kvbm.pool(t).stats().num_in_use == 0 for t in kvbm.tiers)


def test_evicted_prefix_is_onboarded_from_the_host_tier(
    worker: tuple[WorkerRuntime, Frontend],
) -> None:
    runtime, front = worker
    kvbm = runtime.kvbm
    assert runtime.offload is not None and kvbm.tiers == (Tier.DEVICE, Tier.HOST)
    prompt = prompt_of(70, seed=1)  # 4 full blocks + 6 tokens
    hashes = kvbm.hash_tokens(prompt).sequence_hashes

    first = front.generate("offload", prompt, 4)
    assert first.final.finish_reason == "length", first.stats
    assert first.stats["computed_tokens"] == 70
    for seed in range(2, 8):  # 6 x 5 blocks through a 12-block device pool
        other = front.generate("offload", prompt_of(70, seed=seed), 4)
        assert other.final.finish_reason == "length", other.stats
    assert wait_until(lambda: settled(runtime), 10.0)
    assert not any(kvbm.pool().contains(h) for h in hashes)  # evicted from the device
    assert all(kvbm.pool(Tier.HOST).contains(h) for h in hashes)  # written through to host

    again = front.generate("offload", prompt, 4)
    assert again.final.finish_reason == "length", again.stats
    assert again.stats["cached_tokens"] == 64
    assert again.stats["computed_tokens"] == 6
    assert again.tokens == first.tokens
    assert all(kvbm.pool().contains(h) for h in hashes)  # onboarded

    assert wait_until(lambda: settled(runtime), 10.0)
    assert runtime.offload.stats.num_blocks_copied > 0
    for tier in kvbm.tiers:
        kvbm.pool(tier).check_invariants()
        assert kvbm.pool(tier).stats().num_in_use == 0
