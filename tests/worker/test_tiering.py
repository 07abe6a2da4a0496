"""Cross-instance prefix hits, in-process (in-memory registry, loopback agents): a prefix that
instance A computed is served to instance B from A's device or host tier (a peer hit) or from the
G4 shared store (after A's tiers evicted it, and after every instance restarted), never
recomputed; a corrupt stored block is a miss with correct output; concurrent requests offload
every block once and leak nothing; a full store evicts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from harness_probes import wait_until
from serving_harness import Frontend, Result

from fabric.config import load_config
from fabric.discovery.memory import InMemoryRegistry
from fabric.discovery.registration import WorkerDirectory
from fabric.discovery.registry import Role
from fabric.kvbm import Tier
from fabric.transfer.loopback import LoopbackAgent, LoopbackRegistry
from fabric.worker.runtime import WorkerRuntime, build_worker

BLOCK = 16
NAMESPACE = "tiering"
StartWorker = Callable[..., WorkerRuntime]


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    return tmp_path / "g4"


@pytest.fixture
def cluster(tiny_dir: Path) -> Iterator[tuple[StartWorker, Frontend]]:
    registry = InMemoryRegistry()
    loopback = LoopbackRegistry()
    runtimes: list[WorkerRuntime] = []

    def start(worker_id: str, **settings: object) -> WorkerRuntime:
        config = load_config(
            model=str(tiny_dir),
            worker_id=worker_id,
            namespace=NAMESPACE,
            block_size=BLOCK,
            registration_ttl_s=1.0,
            **{"device_blocks": 64, **settings},
        )
        runtime = build_worker(
            Role.AGGREGATED,
            config,
            registry=registry,
            make_agent=lambda name: LoopbackAgent(name, loopback),
        )
        runtimes.append(runtime)
        return runtime

    directory = WorkerDirectory(registry, namespace=NAMESPACE).start()
    front = Frontend(directory)
    try:
        yield start, front
    finally:
        front.close()
        directory.close()
        for runtime in reversed(runtimes):
            runtime.close()
        registry.close()


def prompt_of(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 1024, (length,), generator=generator).tolist()


def run(front: Frontend, worker_id: str, prompt: list[int], *, source: str = "") -> Result:
    result = front.generate(worker_id, prompt, 6, prefill_worker=source)
    assert result.final.finish_reason == "length", result.stats
    return result


def counter(runtime: WorkerRuntime, name: str, **labels: str) -> float:
    value = runtime.kvbm.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def computed_here(runtime: WorkerRuntime) -> float:
    return counter(runtime, "fabric_worker_computed_tokens_total")


def settled(runtime: WorkerRuntime) -> bool:
    """No offload queued or in flight and no block referenced in any pool."""
    kvbm = runtime.kvbm
    pools = [t for t in kvbm.tiers if t is not Tier.SHARED]
    idle = runtime.offload is None or runtime.offload.idle
    return idle and all(kvbm.pool(t).stats().num_in_use == 0 for t in pools)


def assert_clean(runtime: WorkerRuntime) -> None:
    assert wait_until(lambda: settled(runtime), 10.0)
    for tier in runtime.kvbm.tiers:
        if tier is not Tier.SHARED:
            runtime.kvbm.pool(tier).check_invariants()


def test_peer_hit_reads_the_prefix_from_the_instance_that_computed_it(
    cluster: tuple[StartWorker, Frontend],
) -> None:
    start, front = cluster
    a, b = start("a"), start("b")
    start("reference")
    shared = prompt_of(8 * BLOCK, seed=1)
    run(front, "a", shared + prompt_of(5, seed=2))
    prompt = shared + prompt_of(20, seed=3)  # same 8 blocks, another tail
    a_before, b_before = computed_here(a), computed_here(b)

    hit = run(front, "b", prompt, source="a")

    assert hit.stats["prefill_worker"] == "a"
    assert hit.stats["cached_tokens"] == 8 * BLOCK  # on a: nothing of the shared blocks computed
    assert hit.stats["computed_tokens"] == 20
    assert computed_here(a) - a_before == 20  # a computed only the tail
    assert computed_here(b) == b_before  # b computed nothing of the prompt
    assert hit.tokens == run(front, "reference", prompt).tokens
    for runtime in (a, b):
        assert_clean(runtime)
    assert front.record("a").endpoints.signal  # a is still serving


def test_peer_hit_after_the_peers_device_evicted_it_comes_from_its_host_tier(
    cluster: tuple[StartWorker, Frontend],
) -> None:
    start, front = cluster
    a = start("a", device_blocks=12, cpu_cache_blocks=64)
    start("b")
    start("reference")
    shared = prompt_of(4 * BLOCK, seed=4)
    run(front, "a", shared + prompt_of(6, seed=5))
    for seed in range(10, 16):  # 6 x 5 blocks through a 12-block device pool
        run(front, "a", prompt_of(70, seed=seed))
    assert_clean(a)
    hashes = a.kvbm.hash_tokens(shared).sequence_hashes
    assert not any(a.kvbm.pool().contains(h) for h in hashes)
    assert all(a.kvbm.pool(Tier.HOST).contains(h) for h in hashes)
    onboards_before = counter(a, "fabric_kvbm_onboards_total", source="G2", target="G1")

    prompt = shared + prompt_of(9, seed=6)
    hit = run(front, "b", prompt, source="a")

    assert hit.stats["cached_tokens"] == 4 * BLOCK and hit.stats["computed_tokens"] == 9
    onboards = counter(a, "fabric_kvbm_onboards_total", source="G2", target="G1")
    assert onboards - onboards_before == 4
    assert hit.tokens == run(front, "reference", prompt).tokens
    assert_clean(a)


def test_shared_store_serves_after_host_eviction_and_after_a_restart_of_every_instance(
    cluster: tuple[StartWorker, Frontend], shared_dir: Path
) -> None:
    start, front = cluster
    tiers = {
        "device_blocks": 12,
        "cpu_cache_blocks": 12,
        "shared_disk_dir": shared_dir,
        "shared_disk_blocks": 512,
    }
    a = start("a", **tiers)
    reference = start("reference")
    prompt = prompt_of(4 * BLOCK + 6, seed=7)
    first = run(front, "a", prompt)
    assert first.tokens == run(front, "reference", prompt).tokens
    for seed in range(20, 26):  # 6 x 5 blocks through 12-block device and host pools
        run(front, "a", prompt_of(70, seed=seed))
    assert_clean(a)
    hashes = a.kvbm.hash_tokens(prompt).sequence_hashes
    for tier in (Tier.DEVICE, Tier.HOST):
        assert not any(a.kvbm.pool(tier).contains(h) for h in hashes), tier
    assert all(a.kvbm.shared_store.contains(h) for h in hashes)

    b = start("b", **tiers)  # another instance on the same directory: a G4 hit, no peer
    hit = run(front, "b", prompt)
    assert hit.stats["cached_tokens"] == 4 * BLOCK and hit.stats["computed_tokens"] == 6
    assert counter(b, "fabric_kvbm_onboards_total", source="G4", target="G1") == 4
    assert hit.tokens == first.tokens

    for runtime in (a, b, reference):
        runtime.close()
    restarted = start("c", **tiers)
    again = run(front, "c", prompt)
    assert again.stats["cached_tokens"] == 4 * BLOCK and again.stats["computed_tokens"] == 6
    assert again.tokens == first.tokens
    assert_clean(restarted)


def test_a_flipped_byte_in_the_shared_store_is_a_miss_and_the_output_stays_right(
    cluster: tuple[StartWorker, Frontend], shared_dir: Path
) -> None:
    start, front = cluster
    tiers = {"shared_disk_dir": shared_dir, "shared_disk_blocks": 512}
    a = start("a", **tiers)
    prompt = prompt_of(5 * BLOCK + 3, seed=8)
    first = run(front, "a", prompt)
    assert_clean(a)
    hashes = a.kvbm.hash_tokens(prompt).sequence_hashes
    victim = next(shared_dir.rglob(f"{hashes[2]:016x}.kvb"))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))

    b = start("b", **tiers)
    hit = run(front, "b", prompt)

    assert hit.stats["cached_tokens"] == 2 * BLOCK  # blocks 0 and 1; 2 failed its checksum
    assert hit.tokens == first.tokens
    assert b.kvbm.shared_store.stats.corrupt == 1
    assert_clean(b)
    assert wait_until(lambda: b.kvbm.shared_store.contains(hashes[2]), 10.0)  # rewritten


def test_concurrent_requests_offload_every_block_once_and_leak_nothing(
    cluster: tuple[StartWorker, Frontend], shared_dir: Path
) -> None:
    start, front = cluster
    capacity = 16  # fewer than the 23 distinct blocks: the store must evict
    a = start(
        "a",
        device_blocks=48,
        cpu_cache_blocks=24,
        shared_disk_dir=shared_dir,
        shared_disk_blocks=capacity,
    )
    system = prompt_of(3 * BLOCK, seed=9)
    prompts = [system + prompt_of(2 * BLOCK + 5, seed=100 + i) for i in range(10)]
    ids = [front.send("a", p, 6) for p in prompts]  # all in flight at once
    results = [front.result("a", request_id) for request_id in ids]
    assert all(r.final.finish_reason == "length" for r in results)
    assert_clean(a)

    store, offload = a.kvbm.shared_store, a.offload
    assert offload is not None
    failed = {s.name: n for s, n in offload.stats.transfers.items() if n and s.name == "FAILED"}
    assert not failed
    distinct = {h for p in prompts for h in a.kvbm.hash_tokens(p).sequence_hashes}
    assert len(distinct) == 3 + 2 * 10
    assert store.stats.written == len(distinct)  # each block written once, none lost
    files = list(shared_dir.rglob("*.kvb"))
    assert len(files) == len(store) == capacity  # full: it evicted (LRU order: test_disk_store)
    assert store.stats.evicted == len(distinct) - capacity
    assert not list(shared_dir.rglob("*.tmp"))


def test_a_named_peer_is_not_asked_when_this_worker_holds_every_full_block(
    cluster: tuple[StartWorker, Frontend], shared_dir: Path
) -> None:
    start, front = cluster
    tiers = {"shared_disk_dir": shared_dir, "shared_disk_blocks": 512}
    a, b = start("a", **tiers), start("b", **tiers)
    # a partial last block, then a block-aligned prompt (its last block is recomputed anyway)
    for seed, length, tail in ((40, 6 * BLOCK + 5, 5), (41, 6 * BLOCK, BLOCK)):
        prompt = prompt_of(length, seed=seed)
        first = run(front, "a", prompt)
        assert_clean(a)  # written through to G4
        a_before, b_before = computed_here(a), computed_here(b)

        hit = run(front, "b", prompt, source="a")  # b finds every full block in G4 itself

        assert hit.stats["prefill_worker"] == "" and hit.stats["cached_tokens"] == length - tail
        assert computed_here(b) - b_before == tail and computed_here(a) == a_before  # no trip
        assert hit.tokens == first.tokens
