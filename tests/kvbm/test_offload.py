"""OffloadManager: async moves keep every pool consistent, bytes intact, references returned."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from fabric.errors import InvalidTransition
from fabric.kvbm import load_kvbm_config
from fabric.kvbm.build import build_kvbm
from fabric.kvbm.core.block import ImmutableBlocks
from fabric.kvbm.core.layout import KvGeometry
from fabric.kvbm.core.types import SequenceHash, Tier
from fabric.kvbm.manager import KvBlockManager
from fabric.kvbm.offload import copier as offload_module
from fabric.kvbm.offload.manager import (
    MoveState,
    OffloadManager,
    Onboarding,
    TierMove,
    build_offload_manager,
)
from fabric.kvbm.tiers.block_copy import copy_blocks
from fabric.kvbm.tiers.storage import Storage, TensorStorage

GEOMETRY = KvGeometry(num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float32)
BS = 4
Fabric = tuple[KvBlockManager, OffloadManager]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Fabric]]:
    """Build a manager + offload manager from config overrides; close both at teardown."""
    built: list[Fabric] = []

    def build(**overrides: object) -> Fabric:
        settings: dict[str, object] = {
            "block_size": BS,
            "device_blocks": 16,
            "cpu_cache_blocks": 32,
            "disk_cache_blocks": 64,
            "disk_cache_dir": tmp_path,
            "disk_admit_after": 1,
            "offload_writeback_free": 0.0,
        }
        settings.update(overrides)
        config = load_kvbm_config(**settings)
        kvbm = build_kvbm(config, GEOMETRY)
        built.append((kvbm, build_offload_manager(kvbm, config)))
        return built[-1]

    yield build
    for kvbm, om in built:
        om.close(timeout_s=2.0)
        kvbm.close()


class Gate:
    """A copy that records each batch (source tier, target tier, blocks) and waits to be let on."""

    def __init__(self, kvbm: KvBlockManager) -> None:
        self.open = threading.Event()
        self.calls: list[tuple[Tier, Tier, int]] = []
        self._tier = {id(kvbm.storage(t)): t for t in kvbm.tiers}

    def __call__(
        self, src: Storage, src_ids: Sequence[int], dst: Storage, ids: Sequence[int]
    ) -> None:
        self.calls.append((self._tier[id(src)], self._tier[id(dst)], len(ids)))
        assert self.open.wait(10), "gate never opened"
        copy_blocks(src, src_ids, dst, ids)


def content(h: SequenceHash) -> torch.Tensor:
    """The KV of a block is a function of its hash, so any copy can be checked anywhere."""
    gen = torch.Generator().manual_seed(h & (2**63 - 1))
    return torch.randn(GEOMETRY.num_layers, 2, BS, 16, generator=gen)


def read(kvbm: KvBlockManager, tier: Tier, block_id: int) -> torch.Tensor:
    storage = kvbm.storage(tier)
    assert isinstance(storage, TensorStorage)
    return torch.stack(
        [
            torch.stack([storage.block_view(block_id, layer, o) for o in range(2)])
            for layer in range(GEOMETRY.num_layers)
        ]
    )


def prefill(kvbm: KvBlockManager, om: OffloadManager, tokens: list[int]) -> list[SequenceHash]:
    """A fake request: look up, compute every block, register (telling the offload manager)."""
    hashes = kvbm.hash_tokens(tokens).sequence_hashes
    kvbm.release_match(kvbm.match(hashes))
    blocks = kvbm.allocate(len(hashes))
    if blocks is None:  # every device block pinned by copies in flight
        return []
    storage = kvbm.storage(Tier.DEVICE)
    assert isinstance(storage, TensorStorage)
    for block_id, h in zip(blocks, hashes, strict=True):
        data = content(h)
        for layer in range(GEOMETRY.num_layers):
            for outer in range(2):
                storage.block_view(block_id, layer, outer).copy_(data[layer, outer])
    blocks.advance(blocks.capacity)
    with kvbm.register(blocks, hashes) as registered:
        om.on_registered(registered)
    return hashes


def evict(kvbm: KvBlockManager, tier: Tier) -> None:
    """Allocate every free block of ``tier`` once (evicting its cached blocks), then give back."""
    pool = kvbm.pool(tier)
    blocks = pool.allocate(pool.num_free)
    assert blocks is not None
    pool.release(blocks)


def assert_onboarded(
    kvbm: KvBlockManager, got: ImmutableBlocks, hashes: list[SequenceHash]
) -> None:
    assert got.tier is Tier.DEVICE and got.sequence_hashes == hashes[: len(got)]
    for block_id, h in zip(got.block_ids, got.sequence_hashes, strict=True):
        assert torch.equal(read(kvbm, Tier.DEVICE, block_id), content(h))


def assert_clean(kvbm: KvBlockManager) -> None:
    for tier in kvbm.tiers:
        kvbm.pool(tier).check_invariants()
        assert kvbm.pool(tier).stats().num_in_use == 0, tier


def test_offload_evict_onboard_keeps_bytes(make: Callable[..., Fabric]) -> None:
    kvbm, om = make()
    hashes = prefill(kvbm, om, list(range(3 * BS)))
    assert om.drain(5)
    assert all(kvbm.pool(t).contains(h) for t in (Tier.HOST, Tier.DISK) for h in hashes)
    evict(kvbm, Tier.DEVICE)
    got = om.onboard(hashes).wait(5)  # host hit
    assert got is not None and len(got) == 3
    assert_onboarded(kvbm, got, hashes)
    kvbm.release(got)
    evict(kvbm, Tier.DEVICE)
    evict(kvbm, Tier.HOST)
    got = om.onboard(hashes).wait(5)  # disk hit
    assert got is not None and len(got) == 3
    assert_onboarded(kvbm, got, hashes)
    kvbm.release(got)
    assert om.drain(5)
    assert_clean(kvbm)


def random_workload(
    rng: random.Random, kvbm: KvBlockManager, om: OffloadManager, prompts: list[list[int]]
) -> list[TierMove]:
    """Prefills, offloads, onboards (awaited or cancelled), cancels and evictions in a random
    order, one ``step`` after each; every onboarded block's bytes are checked."""
    transfers: list[TierMove] = []
    pending: list[tuple[Onboarding, list[SequenceHash]]] = []
    for i in range(300):
        last = i == 299
        tokens = rng.choice(prompts)[: rng.randint(1, 8) * BS]
        hashes = kvbm.hash_tokens(tokens).sequence_hashes
        action = rng.random()
        if action < 0.3:
            prefill(kvbm, om, tokens)
        elif action < 0.45:
            with kvbm.pool(rng.choice([Tier.DEVICE, Tier.HOST])).match(hashes) as held:
                if len(held):
                    transfers.append(om.offload(held, priority=rng.randint(0, 3)))
        elif action < 0.65:
            pending.append((om.onboard(hashes, priority=rng.randint(0, 3)), hashes))
        elif action < 0.75 and transfers:
            rng.choice(transfers).cancel()
        elif action < 0.8:
            evict(kvbm, Tier.DEVICE)
        elif pending:
            onboarding, hashes = pending.pop(rng.randrange(len(pending)))
            if rng.random() < 0.3:
                onboarding.cancel()
                continue
            pending.append((onboarding, hashes))
        while len(pending) > 4 or (pending and action >= 0.8) or (pending and last):
            onboarding, hashes = pending.pop()
            got = onboarding.wait(5)
            assert got is not None
            assert_onboarded(kvbm, got, hashes)
            kvbm.release(got)
        om.step()
    return transfers


@pytest.mark.parametrize("mode", ["write_through", "write_back"])
@pytest.mark.parametrize("seed", range(3))
def test_random_stress_loses_duplicates_and_leaks_nothing(
    make: Callable[..., Fabric], monkeypatch: pytest.MonkeyPatch, seed: int, mode: str
) -> None:
    kvbm, om = make(
        offload_mode=mode,
        offload_writeback_free=0.25,
        device_blocks=24,
        cpu_cache_blocks=64,
        disk_cache_blocks=128,
        offload_max_in_flight=2,
        offload_batch_blocks=4,
        offload_max_queued_blocks=24,
    )
    copy_rng, num_copies = random.Random(seed), iter(range(1, 1 << 30))

    def flaky_copy(src: Storage, src_ids: Sequence[int], dst: Storage, ids: Sequence[int]) -> None:
        time.sleep(copy_rng.random() * 0.002)  # copies overlap the owner thread's work
        if next(num_copies) % 10 == 0:
            raise OSError(5, "injected I/O error")
        copy_blocks(src, src_ids, dst, ids)

    copy_blocks(kvbm.storage(Tier.DEVICE), [0], kvbm.storage(Tier.HOST), [0])  # load kernels
    monkeypatch.setattr(offload_module, "copy_blocks", flaky_copy)
    prompts = [[c * 1000 + t for t in range(8 * BS)] for c in range(6)]
    transfers: list[TierMove] = []
    rng = random.Random(seed)
    for _ in range(5):  # how much a round copies depends on thread timing: run until enough
        transfers += random_workload(rng, kvbm, om, prompts)
        assert om.drain(10)
        assert_clean(kvbm)
        if om.stats.num_blocks_copied > 100 and om.stats.transfers[MoveState.FAILED]:
            break
    assert om.stats.transfers[MoveState.FAILED] > 0  # failures were exercised
    assert om.stats.num_blocks_copied > 100
    for t in transfers:
        assert t.done
        if t.state is MoveState.DONE:  # targets are large enough never to evict
            assert all(kvbm.pool(t.path.target).contains(h) for h in t.sequence_hashes)
    all_hashes = {h for p in prompts for h in kvbm.hash_tokens(p).sequence_hashes}
    for tier in kvbm.tiers:  # each registered block holds a distinct known hash, bytes intact
        pool = kvbm.pool(tier)
        held = [h for h in all_hashes if pool.contains(h)]
        assert len(held) == pool.num_blocks - pool.stats().num_free
        if tier is not Tier.DISK:
            with pool.match_present(held) as blocks:
                for block_id, h in zip(blocks.block_ids, blocks.sequence_hashes, strict=True):
                    assert torch.equal(read(kvbm, tier, block_id), content(h))
    monkeypatch.setattr(offload_module, "copy_blocks", copy_blocks)
    for p in prompts:  # whatever reached the disk reads back intact
        evict(kvbm, Tier.DEVICE)
        evict(kvbm, Tier.HOST)
        hashes = kvbm.hash_tokens(p).sequence_hashes
        got = om.onboard(hashes).wait(5)
        assert got is not None and len(got) == kvbm.pool(Tier.DISK).prefix_length(hashes)
        assert_onboarded(kvbm, got, hashes)
        kvbm.release(got)
    assert om.close(5)
    assert_clean(kvbm)


def test_cancel_returns_queued_and_in_flight_blocks(
    make: Callable[..., Fabric], monkeypatch: pytest.MonkeyPatch
) -> None:
    kvbm, om = make(offload_mode="write_back", offload_max_in_flight=1, offload_batch_blocks=1)
    a = prefill(kvbm, om, list(range(2 * BS)))
    b = prefill(kvbm, om, list(range(100, 100 + 3 * BS)))
    gate = Gate(kvbm)
    monkeypatch.setattr(offload_module, "copy_blocks", gate)
    with kvbm.pool().match(a) as held_a, kvbm.pool().match(b) as held_b:
        first, second = om.offload(held_a), om.offload(held_b)
    om.step()
    assert (first.state, second.state) == (MoveState.IN_FLIGHT, MoveState.QUEUED)
    assert kvbm.pool().stats().num_in_use == 5
    assert second.cancel() and second.state is MoveState.CANCELLED
    assert kvbm.pool().stats().num_in_use == 2  # the queued transfer's pins are back at once
    assert first.cancel() and not second.cancel()
    gate.open.set()
    assert om.drain(5)
    assert first.state is MoveState.CANCELLED
    assert not any(kvbm.pool(Tier.HOST).contains(h) for h in a + b)
    assert_clean(kvbm)


def test_cancelled_onboarding_releases_device_and_copies(
    make: Callable[..., Fabric], monkeypatch: pytest.MonkeyPatch
) -> None:
    kvbm, om = make()
    hashes = prefill(kvbm, om, list(range(4 * BS)))
    assert om.drain(5)
    keep = kvbm.pool().match(hashes[:1])  # block 0 stays on the device, 1-3 go
    evict(kvbm, Tier.DEVICE)
    kvbm.release(keep)
    gate = Gate(kvbm)
    monkeypatch.setattr(offload_module, "copy_blocks", gate)
    onboarding = om.onboard(hashes)
    assert onboarding.wait(0.05) is None  # copy held at the gate
    onboarding.cancel()
    gate.open.set()
    assert om.drain(5)
    assert gate.calls == [(Tier.HOST, Tier.DEVICE, 3)]
    assert kvbm.pool().prefix_length(hashes) == 1  # the cancelled copy registered nothing
    assert_clean(kvbm)


def test_failed_copy_returns_blocks_logs_and_counts(
    make: Callable[..., Fabric], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kvbm, om = make(offload_mode="write_back")
    hashes = prefill(kvbm, om, list(range(2 * BS)))

    def broken(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(offload_module, "copy_blocks", broken)
    with kvbm.pool().match(hashes) as held:
        transfer = om.offload(held)
    assert om.drain(5)
    assert transfer.state is MoveState.FAILED and transfer.error is not None
    assert "Input/output error" in str(transfer.error) and "returned" in caplog.text
    assert om.stats.transfers[MoveState.FAILED] == 1
    assert not kvbm.pool(Tier.HOST).contains(hashes[0])
    assert_clean(kvbm)
    monkeypatch.setattr(offload_module, "copy_blocks", copy_blocks)  # now host -> device fails
    with kvbm.pool().match(hashes) as held:
        om.offload(held)
    assert om.drain(5)
    evict(kvbm, Tier.DEVICE)
    monkeypatch.setattr(offload_module, "copy_blocks", broken)
    got = om.onboard(hashes).wait(5)
    assert got is not None and len(got) == 0  # a miss, not a failed request
    kvbm.release(got)
    assert_clean(kvbm)


def test_full_target_drops_offload_and_cuts_onboard(make: Callable[..., Fabric]) -> None:
    kvbm, om = make(offload_mode="write_back", cpu_cache_blocks=4)
    hashes = prefill(kvbm, om, list(range(2 * BS)))
    host = kvbm.pool(Tier.HOST)
    hog = host.allocate(4)
    with kvbm.pool().match(hashes) as held:
        dropped = om.offload(held)
    assert om.drain(5) and dropped.state is MoveState.DROPPED
    assert kvbm.pool().stats().num_in_use == 0  # the pinned sources went back
    host.release(hog)
    with kvbm.pool().match(hashes) as held:
        again = om.offload(held)  # documented: the caller may retry later
    assert om.drain(5) and again.state is MoveState.DONE and again.num_copied == 2
    evict(kvbm, Tier.DEVICE)
    device = kvbm.pool()
    hog = device.allocate(device.num_blocks)
    got = om.onboard(hashes).wait(5)
    assert got is not None and len(got) == 0
    kvbm.release(got)
    device.release(hog)
    assert om.stats.transfers[MoveState.DROPPED] == 2
    assert_clean(kvbm)


def test_queue_bound_refuses_with_busy(make: Callable[..., Fabric]) -> None:
    kvbm, om = make(offload_mode="write_back", offload_max_queued_blocks=3)
    a = prefill(kvbm, om, list(range(2 * BS)))
    b = prefill(kvbm, om, list(range(100, 100 + 2 * BS)))
    with kvbm.pool().match(a) as held_a, kvbm.pool().match(b) as held_b:
        queued, busy = om.offload(held_a), om.offload(held_b)
        duplicate = om.offload(held_a)  # already queued to HOST: nothing to add
    assert (queued.state, busy.state) == (MoveState.QUEUED, MoveState.BUSY)
    assert duplicate.state is MoveState.DONE and om.stats.num_blocks_skipped == 2
    assert kvbm.pool().stats().num_in_use == 2  # BUSY took no reference
    assert om.drain(5) and queued.state is MoveState.DONE
    with kvbm.pool().match(a) as held_a:
        assert om.offload(held_a).state is MoveState.DONE  # the host holds it: skipped
    assert_clean(kvbm)


def test_write_through_copies_at_once_write_back_under_pressure(
    make: Callable[..., Fabric],
) -> None:
    through, om_through = make(offload_mode="write_through")
    back, om_back = make(offload_mode="write_back", offload_writeback_free=0.25)
    for kvbm, om in ((through, om_through), (back, om_back)):
        prefill(kvbm, om, list(range(4 * BS)))
        assert om.drain(5)
    assert through.pool(Tier.HOST).stats().num_cached == 4
    assert through.pool(Tier.DISK).stats().num_cached == 4  # chained host -> disk
    assert back.pool(Tier.HOST).stats().num_cached == 0  # 12 of 16 device blocks still free
    hog = back.pool().allocate(10)  # 2 free < 25 %: the next allocations would evict
    om_back.step()
    assert om_back.drain(5)
    assert back.pool(Tier.HOST).stats().num_cached == 4
    assert back.pool(Tier.DISK).stats().num_cached == 0  # host is not under pressure
    back.pool().release(hog)
    assert_clean(through)
    assert_clean(back)


def test_onboard_overtakes_queued_offloads_and_priority_orders_requests(
    make: Callable[..., Fabric], monkeypatch: pytest.MonkeyPatch
) -> None:
    kvbm, om = make(offload_mode="write_back", offload_max_in_flight=1, offload_batch_blocks=1)
    x = prefill(kvbm, om, list(range(2 * BS)))
    with kvbm.pool().match(x) as held:
        om.offload(held)
    assert om.drain(5)
    evict(kvbm, Tier.DEVICE)
    a, b, c = (
        prefill(kvbm, om, list(range(s, s + n * BS))) for s, n in ((100, 1), (200, 3), (300, 4))
    )
    gate = Gate(kvbm)
    monkeypatch.setattr(offload_module, "copy_blocks", gate)
    for hashes, priority in ((a, 0), (b, 0), (c, 5)):
        with kvbm.pool().match(hashes) as held:
            om.offload(held, priority=priority)
        om.step()  # a goes in flight, b and c wait in the queue
    onboarding = om.onboard(x)
    gate.open.set()
    got = onboarding.wait(5)
    assert got is not None and len(got) == 2
    kvbm.release(got)
    assert om.drain(5)
    assert gate.calls == [
        (Tier.DEVICE, Tier.HOST, 1),
        (Tier.HOST, Tier.DEVICE, 2),  # the onboard overtook both queued offloads
        (Tier.DEVICE, Tier.HOST, 4),  # c before b: request priority
        (Tier.DEVICE, Tier.HOST, 3),
    ]
    assert_clean(kvbm)


def test_batches_coalesce_queued_blocks_of_one_path(
    make: Callable[..., Fabric], monkeypatch: pytest.MonkeyPatch
) -> None:
    kvbm, om = make(offload_mode="write_back", offload_batch_blocks=8)
    gate = Gate(kvbm)
    gate.open.set()
    monkeypatch.setattr(offload_module, "copy_blocks", gate)
    for start in range(0, 400, 100):
        hashes = prefill(kvbm, om, list(range(start, start + 2 * BS)))
        with kvbm.pool().match(hashes) as held:
            om.offload(held)
    assert om.drain(5)
    assert gate.calls == [(Tier.DEVICE, Tier.HOST, 8)]  # four submissions, one copy
    assert_clean(kvbm)


def test_disk_offload_respects_the_frequency_filter(make: Callable[..., Fabric]) -> None:
    kvbm, om = make(disk_admit_after=2)
    hashes = kvbm.hash_tokens(list(range(2 * BS))).sequence_hashes
    kvbm.release_match(kvbm.match(hashes[:1]))  # block 0 was used before
    prefill(kvbm, om, list(range(2 * BS)))
    assert om.drain(5)
    assert all(kvbm.pool(Tier.HOST).contains(h) for h in hashes)
    assert kvbm.pool(Tier.DISK).contains(hashes[0])
    assert not kvbm.pool(Tier.DISK).contains(hashes[1])
    assert om.stats.num_blocks_filtered == 1
    assert_clean(kvbm)


def test_close_is_bounded_with_a_stuck_copy(
    make: Callable[..., Fabric], monkeypatch: pytest.MonkeyPatch
) -> None:
    kvbm, om = make(offload_mode="write_back")
    hashes = prefill(kvbm, om, list(range(2 * BS)))
    gate = Gate(kvbm)
    monkeypatch.setattr(offload_module, "copy_blocks", gate)
    with kvbm.pool().match(hashes) as held:
        transfer = om.offload(held)
    om.step()
    began = time.monotonic()
    assert not om.close(timeout_s=0.3)  # the copy may still write: its blocks stay pinned
    assert time.monotonic() - began < 2.0
    assert transfer.state is MoveState.IN_FLIGHT
    assert kvbm.pool().stats().num_in_use == 2
    gate.open.set()
    om._thread.join(5)
    with pytest.raises(InvalidTransition, match="closed"):
        om.onboard(hashes)
