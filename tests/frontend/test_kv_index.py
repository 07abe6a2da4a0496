"""KvPrefixIndex bookkeeping (pure, no sockets)."""

from __future__ import annotations

from frontend_fakes import BLOCK_SIZE, COMPAT

from fabric.frontend.kv_index import KvPrefixIndex
from fabric.kvbm import AllCleared, BlockRemoved, BlockStored, SequenceHash, Tier, sequence_hashes

PROMPT = list(range(100, 100 + 4 * BLOCK_SIZE + 3))  # 4 full blocks and a partial one
HASHES = sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT)


def stored(hashes: list[SequenceHash], tier: Tier = Tier.DEVICE) -> BlockStored:
    return BlockStored(tier, tuple(hashes), None, None, None, BLOCK_SIZE)


def test_match_stops_at_the_first_missing_block() -> None:
    index = KvPrefixIndex()
    index.apply("a", [stored(HASHES[:3])])
    index.apply("b", [stored([HASHES[0], HASHES[2]])])  # a hole at block 1
    assert index.match_lengths(HASHES, ["a", "b", "c"]) == {"a": 3, "b": 1, "c": 0}


def test_a_block_stays_until_every_tier_removed_it() -> None:
    index = KvPrefixIndex()
    index.apply("a", [stored(HASHES[:2]), stored(HASHES[:2], Tier.HOST)])
    index.apply("a", [BlockRemoved(Tier.DEVICE, tuple(HASHES[:2]))])
    assert index.match_lengths(HASHES, ["a"]) == {"a": 2}
    assert index.tiers_of("a", HASHES[0]) == {Tier.HOST}
    index.apply("a", [BlockRemoved(Tier.HOST, (HASHES[1],))])
    assert index.match_lengths(HASHES, ["a"]) == {"a": 1}
    assert index.num_blocks("a") == 1
    assert index.tiers_of("a", HASHES[1]) == frozenset()


def test_a_match_can_count_only_some_tiers() -> None:
    index = KvPrefixIndex()
    index.apply("a", [stored(HASHES[:1]), stored(HASHES[1:3], Tier.HOST)])
    index.apply("a", [stored(HASHES[3:], Tier.DISK)])
    index.apply("b", [stored(HASHES, Tier.DISK), stored(HASHES[:1], Tier.HOST)])
    near = {Tier.DEVICE, Tier.HOST}
    assert index.match_lengths(HASHES, ["a", "b"]) == {"a": 4, "b": 4}
    assert index.match_lengths(HASHES, ["a", "b"], near) == {"a": 3, "b": 1}
    assert index.match_lengths(HASHES, ["a", "b"], {Tier.DISK}) == {"a": 0, "b": 4}


def test_all_cleared_and_clear_worker_forget_only_that_worker() -> None:
    index = KvPrefixIndex()
    index.apply("a", [stored(HASHES), stored(HASHES, Tier.DISK)])
    index.apply("b", [stored(HASHES[:1])])
    index.apply("a", [AllCleared(Tier.HOST)])
    assert index.match_lengths(HASHES, ["a", "b"]) == {"a": 0, "b": 1}
    index.clear_worker("b")
    assert index.num_blocks("b") == 0
    assert index._hash_to_workers == {}  # nothing left behind
