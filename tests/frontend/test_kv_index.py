"""KvPrefixIndex bookkeeping and the routing policy's choices (pure, no sockets)."""

from __future__ import annotations

import time

from frontend_fakes import BLOCK_SIZE, COMPAT

from fabric.discovery.registry import Role, WorkerRecord
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.frontend.policy import choose_decode, choose_prefill
from fabric.kvbm.events import AllCleared, BlockRemoved, BlockStored
from fabric.kvbm.hashing import sequence_hashes
from fabric.kvbm.types import SequenceHash, Tier

PROMPT = list(range(100, 100 + 4 * BLOCK_SIZE + 3))  # 4 full blocks and a partial one
HASHES = sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT)


def stored(hashes: list[SequenceHash], tier: Tier = Tier.DEVICE) -> BlockStored:
    return BlockStored(tier, tuple(hashes), None, None, None, BLOCK_SIZE)


def record(worker_id: str, role: Role = Role.PREFILL, **layout: int | str) -> WorkerRecord:
    return WorkerRecord(
        worker_id, role, {}, None, {"block_size": BLOCK_SIZE, **layout}, COMPAT, time.time()
    )


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
    index.apply("a", [BlockRemoved(Tier.HOST, (HASHES[1],))])
    assert index.match_lengths(HASHES, ["a"]) == {"a": 1}
    assert index.num_blocks("a") == 1


def test_all_cleared_and_clear_worker_forget_only_that_worker() -> None:
    index = KvPrefixIndex()
    index.apply("a", [stored(HASHES), stored(HASHES, Tier.DISK)])
    index.apply("b", [stored(HASHES[:1])])
    index.apply("a", [AllCleared(Tier.HOST)])
    assert index.match_lengths(HASHES, ["a", "b"]) == {"a": 0, "b": 1}
    index.clear_worker("b")
    assert index.num_blocks("b") == 0
    assert index._hash_to_workers == {}  # nothing left behind


def test_prefill_choice_prefers_the_longest_prefix_then_load() -> None:
    index = KvPrefixIndex()
    workers = [record("p1"), record("p2"), record("p3")]
    index.apply("p2", [stored(HASHES[:1])])
    index.apply("p3", [stored(HASHES[:1])])
    choice = choose_prefill(workers, PROMPT, index, {"p2": 1})
    assert choice is not None
    assert (choice.record.worker_id, choice.matched_blocks, choice.num_blocks) == ("p3", 1, 4)
    index.apply("p1", [stored(HASHES[:2])])
    choice = choose_prefill(workers, PROMPT, index, {"p1": 5})
    assert choice is not None and choice.record.worker_id == "p1"  # prefix beats load
    index.clear_worker("p1")
    index.clear_worker("p2")
    index.clear_worker("p3")
    choice = choose_prefill(workers, PROMPT, index, {"p1": 2, "p2": 1, "p3": 1})
    assert choice is not None and choice.record.worker_id == "p2"  # tie on load: smallest id


def test_prefill_hashes_follow_each_worker_seed_and_block_size() -> None:
    index = KvPrefixIndex()
    other_block_size = record("p2", block_size=2 * BLOCK_SIZE)
    index.apply("p2", [stored(sequence_hashes(PROMPT, 2 * BLOCK_SIZE, seed=COMPAT))])
    choice = choose_prefill([record("p1"), other_block_size], PROMPT, index, {})
    assert choice is not None
    assert (choice.record.worker_id, choice.matched_blocks, choice.num_blocks) == ("p2", 2, 2)
    no_geometry = WorkerRecord("p0", Role.PREFILL, {}, None, {}, COMPAT, 0.0)
    choice = choose_prefill([no_geometry], PROMPT, index, {})
    assert choice is not None and choice.matched_blocks == 0


def test_decode_choice_by_load() -> None:
    workers = [record("d1", Role.DECODE), record("d2", Role.AGGREGATED)]
    assert choose_decode([], {}) is None
    assert choose_decode(workers, {}) == workers[0]
    assert choose_decode(workers, {"d1": 2, "d2": 1}) == workers[1]
