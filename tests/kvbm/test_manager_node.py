"""The node tier inside the KvBlockManager (``attach_node``), over an in-process fake node that
keeps blocks in a host storage: a prefix one manager stored is onboarded by another byte for
byte and counted; a miss allocates (so evicts) nothing; a full device cuts the prefix; a load
that reads nothing returns every allocated block. The real node cache under real workers is
tested in tests/node."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from test_manager import BS, GEOMETRY, fill_device, read_device

from fabric.errors import ConfigError
from fabric.kvbm import LayoutKind, SequenceHash, Storage, copy_blocks, host_storage
from fabric.kvbm.build import build_kvbm
from fabric.kvbm.config import load_kvbm_config
from fabric.kvbm.core.types import Tier
from fabric.kvbm.manager import KvBlockManager


class FakeNode:
    """A node tier in this process: ``num_blocks`` slots of a host storage, no eviction."""

    def __init__(self, num_blocks: int) -> None:
        layout = GEOMETRY.layout(LayoutKind.FULLY_CONTIGUOUS, num_blocks, BS)
        self.storage = host_storage(layout, pin=False)
        self.slots: dict[SequenceHash, int] = {}
        self.allocations: list[int] = []
        self.fail_copies = False
        self.closed = False

    def store(
        self,
        sequence_hashes: Sequence[SequenceHash],
        src: Storage,
        block_ids: Sequence[int],
        *,
        parent_hash: SequenceHash | None = None,
    ) -> int:
        new = [i for i, h in enumerate(sequence_hashes) if h not in self.slots]
        free = [s for s in range(self.storage.layout.num_blocks) if s not in self.slots.values()]
        new = new[: len(free)]
        if new:
            copy_blocks(src, [block_ids[i] for i in new], self.storage, free[: len(new)])
        self.slots.update({sequence_hashes[i]: slot for i, slot in zip(new, free, strict=False)})
        return len(new)

    def load(
        self,
        sequence_hashes: Sequence[SequenceHash],
        dst: Storage,
        allocate: Callable[[int], Sequence[int]],
    ) -> int:
        held = 0
        while held < len(sequence_hashes) and sequence_hashes[held] in self.slots:
            held += 1
        if not held:
            return 0
        ids = list(allocate(held))
        self.allocations.append(len(ids))
        if self.fail_copies or not ids:
            return 0
        slots = [self.slots[h] for h in sequence_hashes[: len(ids)]]
        copy_blocks(self.storage, slots, dst, ids)
        return len(ids)

    def close(self) -> None:
        self.closed = True
        self.storage.close()


Make = Callable[..., KvBlockManager]


@pytest.fixture
def make() -> Iterator[Make]:
    built: list[KvBlockManager] = []

    def build(node: FakeNode | None, **overrides: object) -> KvBlockManager:
        settings: dict[str, object] = {"block_size": BS, "device_blocks": 8, **overrides}
        manager = build_kvbm(load_kvbm_config(**settings), GEOMETRY)
        if node is not None:
            manager.attach_node(node)
        built.append(manager)
        return manager

    yield build
    for manager in built:
        manager.close()


def onboarded(kvbm: KvBlockManager, hashes: list[SequenceHash]) -> list[torch.Tensor]:
    with kvbm.match_and_onboard(hashes) as handle:
        return read_device(kvbm, list(handle.block_ids))


def counted(kvbm: KvBlockManager, name: str, source: Tier, target: Tier) -> float:
    labels = {"source": source.value, "target": target.value}
    value = kvbm.metrics.registry.get_sample_value(f"fabric_kvbm_{name}_total", labels)
    return 0.0 if value is None else value


def test_a_prefix_stored_by_one_manager_is_onboarded_by_another(make: Make) -> None:
    node = FakeNode(16)
    a, b = make(node), make(node)
    hashes, contents = fill_device(a, list(range(5 * BS)))
    with a.pool().match_present(hashes) as handle:
        assert a.store_node(handle) == 5
        assert a.store_node(handle) == 0  # held already
    assert counted(a, "offloads", Tier.DEVICE, Tier.NODE) == 5

    got = onboarded(b, [*hashes, SequenceHash(999)])

    assert len(got) == 5
    assert all(torch.equal(x, y) for x, y in zip(got, contents, strict=True))
    assert counted(b, "onboards", Tier.NODE, Tier.DEVICE) == 5
    assert b.pool().contains(hashes[-1])  # registered on b's device: the next match is local
    assert onboarded(b, hashes[:2]) and node.allocations == [5]
    b.pool().check_invariants()


def test_a_miss_allocates_nothing_so_evicts_nothing(make: Make) -> None:
    node = FakeNode(4)
    kvbm = make(node)
    hashes, _ = fill_device(kvbm, list(range(8 * BS)))  # the device is full of cached blocks
    with kvbm.match_and_onboard([SequenceHash(1), SequenceHash(2)]) as handle:
        assert len(handle) == 0
    assert node.allocations == []
    assert all(kvbm.pool().contains(h) for h in hashes)
    assert kvbm.pool().stats().evictions == 0


def test_a_full_device_cuts_the_prefix_and_a_failed_load_returns_its_blocks(make: Make) -> None:
    node = FakeNode(16)
    a, b = make(node), make(node)
    hashes, _ = fill_device(a, list(range(6 * BS)))
    with a.pool().match_present(hashes) as handle:
        a.store_node(handle)
    pinned = b.allocate(5)  # 3 of 8 device blocks left
    assert pinned is not None
    with b.match_and_onboard(hashes) as handle:
        assert len(handle) == 3 and node.allocations == [3]
    b.release(pinned)
    node.fail_copies = True
    before = b.pool().num_free
    with b.match_and_onboard(hashes[3:]) as handle:
        assert len(handle) == 0
    assert b.pool().num_free == before
    b.pool().check_invariants()


def test_one_node_tier_per_manager_and_close_detaches_it(make: Make) -> None:
    node = FakeNode(4)
    kvbm = make(node)
    assert kvbm.node_attached and Tier.NODE not in kvbm.tiers
    with pytest.raises(ConfigError, match="attached already"):
        kvbm.attach_node(FakeNode(4))
    kvbm.close()
    assert node.closed
    plain = make(None)
    hashes, _ = fill_device(plain, list(range(2 * BS)))
    with plain.pool().match_present(hashes) as handle:
        assert plain.store_node(handle) == 0  # no node tier: nothing to do
    assert counted(plain, "offloads", Tier.DEVICE, Tier.NODE) == 0
