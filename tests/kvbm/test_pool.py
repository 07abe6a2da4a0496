"""BlockPool: lifecycle, dedup, matching, eviction, events, and stateful invariants."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from fabric.errors import InvalidInput, InvalidTransition, PoolExhausted
from fabric.kvbm.core.block import BlockState, ImmutableBlocks, MutableBlocks
from fabric.kvbm.core.events import AllCleared, BlockRemoved, BlockStored, RecordingSink
from fabric.kvbm.core.eviction import EvictionKind, build_policy
from fabric.kvbm.core.pool import BlockPool
from fabric.kvbm.core.types import SequenceHash, Tier

BS = 4


def full(pool: BlockPool, n: int) -> MutableBlocks:
    blocks = pool.allocate(n)
    assert blocks is not None
    blocks.advance(n * pool.block_size)
    return blocks


def hashes(*values: int) -> list[SequenceHash]:
    return [SequenceHash(v) for v in values]


def test_allocate_register_match_release_roundtrip() -> None:
    pool = BlockPool(8, BS)
    imm = pool.register(full(pool, 3), hashes(1, 2, 3))
    assert imm.block_ids == [0, 1, 2] and imm.sequence_hashes == [1, 2, 3]
    assert all(pool.state(b) is BlockState.REGISTERED for b in imm)
    hit = pool.match(hashes(1, 2, 9, 3))
    assert hit.block_ids == [0, 1]  # stops at the first miss
    assert pool.ref_count(0) == 2 and pool.ref_count(2) == 1
    pool.release(hit)
    pool.release(imm)
    stats = pool.stats()
    assert (stats.num_free, stats.num_cached, stats.num_in_use) == (5, 3, 0)
    assert (stats.hits, stats.misses, stats.registered) == (2, 2, 3)
    # cached blocks still match after their last release
    again = pool.match(hashes(1, 2, 3))
    assert again.block_ids == [0, 1, 2]
    pool.release(again)
    pool.check_invariants()


def test_mutable_states_and_partial_registration_refused() -> None:
    pool = BlockPool(4, BS)
    blocks = pool.allocate(2)
    assert blocks is not None
    assert [blocks.state(i) for i in range(2)] == [BlockState.RESET, BlockState.RESET]
    blocks.advance(5)
    assert [blocks.state(i) for i in range(2)] == [BlockState.COMPLETE, BlockState.PARTIAL]
    with pytest.raises(InvalidTransition, match="only complete blocks"):
        pool.register(blocks, hashes(1, 2))
    assert blocks.live  # a refused transition leaves the handle usable
    head, tail = blocks.split(1)
    assert not blocks.live and tail.num_tokens == 1 and head.num_tokens == BS
    imm = pool.register(head, hashes(1))
    with pytest.raises(InvalidInput, match="cannot advance"):
        tail.advance(BS)
    pool.release(tail)  # abort: unregistered block goes straight back to RESET
    pool.release(imm)
    assert pool.stats().num_free == 3
    pool.check_invariants()


def test_spent_handles_are_loud() -> None:
    pool = BlockPool(4, BS)
    blocks = full(pool, 1)
    imm = pool.register(blocks, hashes(1))
    with pytest.raises(InvalidTransition, match="already consumed"):
        pool.register(blocks, hashes(1))
    pool.release(imm)
    with pytest.raises(InvalidTransition, match="already consumed"):
        pool.release(imm)
    other = BlockPool(4, BS, Tier.HOST)
    foreign = full(other, 1)
    with pytest.raises(InvalidTransition, match="belongs to the HOST pool"):
        pool.release(foreign)
    pool.check_invariants()


def test_duplicate_hash_is_stored_once() -> None:
    sink = RecordingSink()
    pool = BlockPool(6, BS, events=sink)
    first = pool.register(full(pool, 2), hashes(1, 2))
    second = pool.register(full(pool, 3), hashes(1, 2, 3))
    assert second.block_ids[:2] == first.block_ids  # reused, not stored twice
    assert pool.ref_count(first.block_ids[0]) == 2
    stats = pool.stats()
    assert (stats.duplicates, stats.registered) == (2, 3)
    assert stats.num_free == 3  # the duplicates' blocks went back
    stored = [e for e in sink.events if isinstance(e, BlockStored)]
    assert [e.sequence_hashes for e in stored] == [(1, 2), (3,)]
    assert stored[1].parent_hash == 2  # run parent is the hash before the run
    pool.release(first)
    pool.release(second)
    pool.check_invariants()


def test_duplicate_of_a_cached_block_revives_it() -> None:
    pool = BlockPool(4, BS)
    pool.release(pool.register(full(pool, 1), hashes(7)))
    assert pool.stats().num_cached == 1
    imm = pool.register(full(pool, 1), hashes(7))
    assert pool.stats().num_cached == 0 and pool.stats().num_in_use == 1
    pool.release(imm)
    pool.check_invariants()


def test_allocation_evicts_cached_blocks_by_policy_and_emits_removed() -> None:
    sink = RecordingSink()
    pool = BlockPool(4, BS, events=sink)
    low = pool.register(full(pool, 2), hashes(1, 2), priority=0)
    high = pool.register(full(pool, 2), hashes(3, 4), priority=10)
    pool.release(high)
    pool.release(low)
    blocks = pool.allocate(3)  # evicts the two low-priority blocks, then the older high one
    assert blocks is not None
    removed = [h for e in sink.events if isinstance(e, BlockRemoved) for h in e.sequence_hashes]
    assert removed == [1, 2, 3]
    assert pool.contains(SequenceHash(4)) and not pool.contains(SequenceHash(1))
    assert pool.stats().evictions == 3
    pool.release(blocks)
    pool.check_invariants()


def test_not_enough_free_is_a_value_and_too_large_is_an_error() -> None:
    pool = BlockPool(4, BS)
    held = full(pool, 3)
    assert pool.allocate(2) is None
    pool.check_invariants()  # nothing leaked by the refused allocation
    with pytest.raises(PoolExhausted, match="holds 4 in total"):
        pool.allocate(5)
    pool.release(held)


def test_prefix_length_takes_no_reference() -> None:
    pool = BlockPool(4, BS)
    pool.release(pool.register(full(pool, 2), hashes(1, 2)))
    assert pool.prefix_length(hashes(1, 2, 3)) == 2
    assert pool.stats().num_in_use == 0 and pool.stats().hits == 0


def test_retain_and_context_manager() -> None:
    pool = BlockPool(4, BS)
    imm = pool.register(full(pool, 1), hashes(1))
    with pool.retain(imm) as extra:
        assert pool.ref_count(extra.block_ids[0]) == 2
    assert pool.ref_count(imm.block_ids[0]) == 1
    pool.release(imm)
    pool.check_invariants()


def test_reset_cache() -> None:
    sink = RecordingSink()
    pool = BlockPool(4, BS, events=sink)
    imm = pool.register(full(pool, 2), hashes(1, 2))
    assert pool.reset_cache() is False  # blocks in use: nothing changes
    pool.release(imm)
    assert pool.reset_cache() is True
    assert pool.stats().num_free == 4 and not pool.contains(SequenceHash(1))
    assert isinstance(sink.events[-1], AllCleared)
    pool.check_invariants()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_pool_sizes(bad: object) -> None:
    with pytest.raises(InvalidInput, match="positive int"):
        BlockPool(bad, BS)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="positive int"):
        BlockPool(4, bad)  # type: ignore[arg-type]


def test_register_checks_lengths() -> None:
    pool = BlockPool(4, BS)
    blocks = full(pool, 2)
    with pytest.raises(InvalidInput, match="2 blocks but 1"):
        pool.register(blocks, hashes(1))
    with pytest.raises(InvalidInput, match="token_ids"):
        pool.register(blocks, hashes(1, 2), token_ids=[1, 2, 3])
    pool.release(blocks)
    pool.check_invariants()


# -- stateful: random operation sequences, every policy, every tier -----------------------------


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / register / match / release / evict against a simple model."""

    mutables = Bundle("mutables")
    immutables = Bundle("immutables")

    def __init__(self) -> None:
        super().__init__()
        self.pool: BlockPool | None = None
        self.holders: dict[int, int] = {}  # hash -> handles referencing it (model)

    @precondition(lambda self: self.pool is None)
    @rule(
        kind=st.sampled_from(list(EvictionKind)),
        tier=st.sampled_from([Tier.DEVICE, Tier.HOST, Tier.DISK]),
        num_blocks=st.integers(1, 12),
    )
    def setup(self, kind: EvictionKind, tier: Tier, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks, BS, tier, policy=build_policy(kind))

    @precondition(lambda self: self.pool is not None)
    @rule(target=mutables, n=st.integers(0, 6))
    def allocate(self, n: int) -> MutableBlocks | None:
        assert self.pool is not None
        if n > self.pool.num_blocks:
            with pytest.raises(PoolExhausted):
                self.pool.allocate(n)
            return None
        free_before = self.pool.num_free
        blocks = self.pool.allocate(n)
        assert (blocks is None) == (n > free_before)
        return blocks

    @rule(
        target=immutables,
        blocks=consumes(mutables),
        start=st.integers(0, 20),
        prio=st.integers(0, 2),
    )
    def register(
        self, blocks: MutableBlocks | None, start: int, prio: int
    ) -> ImmutableBlocks | None:
        if blocks is None or self.pool is None:
            return None
        blocks.advance(blocks.capacity)
        chain = hashes(*range(start, start + len(blocks)))
        imm = self.pool.register(blocks, chain, priority=prio)
        assert imm.sequence_hashes == chain
        for b, h in zip(imm.block_ids, chain, strict=True):
            assert self.pool.state(b) is BlockState.REGISTERED and self.pool.contains(h)
        return imm

    @precondition(lambda self: self.pool is not None)
    @rule(target=immutables, start=st.integers(0, 20), n=st.integers(0, 6))
    def match(self, start: int, n: int) -> ImmutableBlocks:
        assert self.pool is not None
        chain = hashes(*range(start, start + n))
        expected = self.pool.prefix_length(chain)
        imm = self.pool.match(chain)
        assert len(imm) == expected
        return imm

    @rule(blocks=consumes(immutables))
    def release(self, blocks: ImmutableBlocks | None) -> None:
        if blocks is not None and self.pool is not None:
            self.pool.release(blocks)

    @rule(blocks=consumes(mutables))
    def abort(self, blocks: MutableBlocks | None) -> None:
        if blocks is not None and self.pool is not None:
            self.pool.release(blocks)

    @precondition(lambda self: self.pool is not None)
    @rule()
    def reset_cache(self) -> None:
        assert self.pool is not None
        in_use = self.pool.stats().num_in_use
        assert self.pool.reset_cache() == (in_use == 0)

    @invariant()
    def consistent(self) -> None:
        if self.pool is not None:
            self.pool.check_invariants()


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase


@pytest.mark.parametrize("kind", list(EvictionKind), ids=lambda k: k.value)
def test_full_churn_keeps_accounting(kind: EvictionKind) -> None:
    """Fill, release, and reallocate the whole pool repeatedly with distinct hashes."""
    pool = BlockPool(16, BS, policy=build_policy(kind))
    for round_ in range(20):
        blocks = full(pool, 16)
        imm = pool.register(blocks, hashes(*range(round_ * 16, round_ * 16 + 16)))
        pool.release(imm)
        pool.check_invariants()
    assert pool.stats().evictions == 19 * 16
