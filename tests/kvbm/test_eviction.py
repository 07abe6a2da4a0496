"""Eviction policies: one contract suite over every policy, then each policy's own order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fabric.errors import ConfigError
from fabric.kvbm.core.eviction import (
    EvictionKind,
    EvictionPolicy,
    FrequencyFilter,
    LfuPolicy,
    LruPolicy,
    PriorityLruPolicy,
    build_policy,
)
from fabric.kvbm.core.types import BlockId, SequenceHash

ALL_KINDS = list(EvictionKind)
ALL_TYPES = [LruPolicy, PriorityLruPolicy, LfuPolicy]


@pytest.fixture(params=ALL_KINDS, ids=lambda k: k.value)
def policy(request: pytest.FixtureRequest) -> EvictionPolicy[BlockId]:
    return build_policy(request.param)


# -- contract ----------------------------------------------------------------------------------


def test_evict_returns_each_inserted_block_once(policy: EvictionPolicy[BlockId]) -> None:
    for i in range(10):
        policy.insert([BlockId(i)], [i % 3])
    victims = policy.evict(4) + policy.evict(100)
    assert sorted(victims) == list(range(10))
    assert len(policy) == 0 and policy.evict(1) == []


def test_removed_blocks_are_never_evicted(policy: EvictionPolicy[BlockId]) -> None:
    for i in range(6):
        policy.insert([BlockId(i)], [0])
    policy.remove([BlockId(2)])
    policy.remove([BlockId(4)])
    policy.remove([BlockId(99)])  # unknown: no-op
    assert 2 not in policy and 3 in policy
    assert sorted(policy.evict(10)) == [0, 1, 3, 5]


def test_double_insert_is_refused_and_changes_nothing(policy: EvictionPolicy[BlockId]) -> None:
    policy.insert([BlockId(1)], [0])
    with pytest.raises(ValueError, match="already evictable"):
        policy.insert([BlockId(2), BlockId(1)], [0, 0])
    with pytest.raises(ValueError, match="repeat a key"):
        policy.insert([BlockId(3), BlockId(3)], [0, 0])
    assert len(policy) == 1 and 2 not in policy and 3 not in policy


def test_a_batch_is_inserted_in_order(policy: EvictionPolicy[BlockId]) -> None:
    policy.insert([BlockId(7), BlockId(3), BlockId(5)], [0, 0, 0])
    policy.insert([BlockId(1)], [0])
    assert policy.evict(4) == [7, 3, 5, 1]


def test_batches_with_mixed_priorities() -> None:
    p: PriorityLruPolicy[BlockId] = PriorityLruPolicy()
    p.insert([BlockId(1), BlockId(2), BlockId(3), BlockId(4)], [5, 0, 5, 1])
    p.remove([BlockId(2), BlockId(99)])
    assert p.evict(3) == [4, 1, 3]


def test_clear(policy: EvictionPolicy[BlockId]) -> None:
    for i in range(3):
        policy.insert([BlockId(i)], [0])
    policy.clear()
    assert len(policy) == 0 and policy.evict(3) == []


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.value)
@given(ops=st.lists(st.tuples(st.sampled_from("ire"), st.integers(0, 15), st.integers(0, 3))))
def test_contract_under_random_ops(kind: EvictionKind, ops: list[tuple[str, int, int]]) -> None:
    policy = build_policy(kind)
    model: set[int] = set()
    for op, block, arg in ops:
        if op == "i" and block not in model:
            policy.insert([BlockId(block)], [arg])
            model.add(block)
        elif op == "r":
            policy.remove([BlockId(block)])
            model.discard(block)
        elif op == "e":
            victims = policy.evict(arg)
            assert len(victims) == min(arg, len(model)) == len(set(victims))
            assert set(victims) <= model
            model -= set(victims)
        assert len(policy) == len(model)
        assert all(b in policy for b in model)


@pytest.mark.parametrize("policy_type", ALL_TYPES, ids=lambda t: t.__name__)
def test_policies_take_any_hashable_key(policy_type: type[EvictionPolicy[str]]) -> None:
    """Generic over the key: the pools use block ids, the G4 store sequence hashes."""
    policy: EvictionPolicy[str] = policy_type()
    policy.insert(["b", "a", "c"], [0, 0, 0])
    policy.remove(["a", "unknown"])
    assert "b" in policy and "a" not in policy and len(policy) == 2
    policy.insert(["a"], [0])
    with pytest.raises(ValueError, match="already evictable"):
        policy.insert(["d", "c"], [0, 0])
    assert policy.evict(3) == ["b", "c", "a"] and len(policy) == 0


@pytest.mark.parametrize("policy_type", ALL_TYPES, ids=lambda t: t.__name__)
def test_keys_need_no_order(policy_type: type[EvictionPolicy[object]]) -> None:
    """Keys are only hashed and compared for equality, never sorted (not even in errors)."""
    first, second = object(), object()
    policy: EvictionPolicy[object] = policy_type()
    policy.insert([first, second], [0, 0])
    with pytest.raises(ValueError, match="already evictable"):
        policy.insert([second, first], [0, 0])
    assert policy.evict(2) == [first, second]


# -- each policy's order -----------------------------------------------------------------------


def test_lru_order() -> None:
    p: LruPolicy[BlockId] = LruPolicy()
    for i in (5, 1, 3):
        p.insert([BlockId(i)], [9 - i])
    p.remove([BlockId(5)])
    p.insert([BlockId(5)], [0])
    assert p.evict(3) == [1, 3, 5]


def test_lru_touch_is_remove_then_insert() -> None:
    """The G4 store's index: a hit re-inserts a sequence hash as the most recently used."""
    p: LruPolicy[SequenceHash] = LruPolicy()
    big, five, seven = SequenceHash((1 << 64) - 1), SequenceHash(5), SequenceHash(7)
    p.insert([big, five, seven], [0, 0, 0])
    p.remove([big])
    p.insert([big], [0])
    assert p.evict(2) == [five, seven] and p.evict(2) == [big]


def test_priority_lru_evicts_low_priority_first_then_lru() -> None:
    p: PriorityLruPolicy[BlockId] = PriorityLruPolicy()
    p.insert([BlockId(1)], [5])
    p.insert([BlockId(2)], [0])
    p.insert([BlockId(3)], [5])
    p.insert([BlockId(4)], [0])
    assert p.evict(4) == [2, 4, 1, 3]


def test_lfu_evicts_least_used_and_forgets_counts_on_eviction() -> None:
    p: LfuPolicy[BlockId] = LfuPolicy()
    for _ in range(3):  # block 1 used three times
        p.insert([BlockId(1)], [0])
        p.remove([BlockId(1)])
    p.insert([BlockId(1)], [0])
    p.insert([BlockId(2)], [0])
    p.insert([BlockId(3)], [0])
    assert p.evict(2) == [2, 3]
    assert p.evict(1) == [1]
    p.insert([BlockId(1)], [0])  # new content in block 1: count starts again
    p.insert([BlockId(4)], [0])
    assert p.evict(1) == [1]


# -- disk admission filter ---------------------------------------------------------------------


def test_frequency_filter_admits_after_min_count() -> None:
    f = FrequencyFilter(min_count=2)
    f.observe([10, 11])
    assert not f.admits(10)
    f.observe([10])
    assert f.admits(10) and not f.admits(11)
    assert FrequencyFilter(min_count=1).admits(1) is False  # never seen is never admitted


def test_frequency_filter_ages_counts() -> None:
    f = FrequencyFilter(min_count=2, window=8)
    f.observe([1, 1, 1, 1, 2, 2, 3])  # 7 observations: no aging yet
    assert f.count(1) == 4 and f.count(2) == 2
    f.observe([4])  # the 8th: halve everything, drop singletons
    assert (f.count(1), f.count(2), f.count(3), f.count(4)) == (2, 1, 0, 0)
    assert f.admits(1) and not f.admits(2)


def test_frequency_filter_bad_config() -> None:
    with pytest.raises(ConfigError, match="min_count"):
        FrequencyFilter(min_count=0)
    with pytest.raises(ConfigError, match="window"):
        FrequencyFilter(window=0)
