"""KvPrefixIndex bookkeeping (pure, no sockets), and the index against a plain reference model."""

from __future__ import annotations

from collections.abc import Iterator

from frontend_fakes import BLOCK_SIZE, COMPAT, stored
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fabric.frontend.kv_index import KvPrefixIndex
from fabric.kvbm import AllCleared, BlockRemoved, SequenceHash, Tier, sequence_hashes

PROMPT = list(range(100, 100 + 4 * BLOCK_SIZE + 3))  # 4 full blocks and a partial one
HASHES = sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT)


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
    assert index.num_hashes == 0  # nothing left behind


def test_a_freed_slot_carries_nothing_to_its_next_worker() -> None:
    index = KvPrefixIndex()
    index.apply("a", [stored(HASHES[:3])])
    index.apply("b", [stored(HASHES[:1])])
    index.clear_worker("a")  # a's slot is free; c takes it
    index.apply("c", [stored(HASHES[2:])])
    assert index.match_lengths(HASHES, ["a", "b", "c"]) == {"a": 0, "b": 1, "c": 0}
    assert index.tiers_of("c", HASHES[1]) == frozenset()
    assert index.tiers_of("c", HASHES[2]) == {Tier.DEVICE}
    assert index.num_cached_blocks == 1 + 2
    assert index.num_hashes == 3  # HASHES[0] (b), HASHES[2:] (c)


def test_a_worker_whose_blocks_are_all_removed_holds_nothing() -> None:
    index = KvPrefixIndex()
    index.apply("a", [stored(HASHES), BlockRemoved(Tier.DEVICE, tuple(HASHES))])
    index.apply("a", [BlockRemoved(Tier.HOST, tuple(HASHES))])  # nothing there: a no-op
    assert index.num_blocks("a") == 0
    assert index.num_hashes == 0
    assert index.match_lengths(HASHES, ["a"]) == {"a": 0}


def test_a_match_consumes_hashes_only_up_to_the_first_miss() -> None:
    index = KvPrefixIndex()
    index.apply("a", [stored(HASHES[:2])])
    consumed: list[SequenceHash] = []

    def lazily() -> Iterator[SequenceHash]:
        for sequence_hash in HASHES:
            consumed.append(sequence_hash)
            yield sequence_hash

    assert index.match_lengths(lazily(), ["a"]) == {"a": 2}
    assert consumed == HASHES[:3]
    consumed.clear()
    assert index.match_lengths(lazily(), ["nobody"]) == {"nobody": 0}
    assert consumed == []


def test_a_long_churning_worker_keeps_its_clear_exact() -> None:
    """Stores and removals past the log's compaction point; a clear still forgets everything."""
    index = KvPrefixIndex()
    many = [SequenceHash(h) for h in range(1, 5001)]
    for start in range(0, len(many), 50):
        run = tuple(many[start : start + 50])
        index.apply("a", [stored(list(run)), stored(list(run), Tier.HOST)])
        index.apply("a", [BlockRemoved(Tier.DEVICE, run)])
        if start % 200:
            index.apply("a", [BlockRemoved(Tier.HOST, run)])
    index.apply("b", [stored(many[:10])])
    kept = index.num_blocks("a")
    assert kept == 50 * len(range(0, len(many), 200))
    assert index.tiers_of("a", many[0]) == {Tier.HOST}
    index.apply("a", [AllCleared(Tier.DEVICE)])
    assert index.num_blocks("a") == 0
    assert index.num_hashes == 10
    assert index.match_lengths(many, ["a", "b"]) == {"a": 0, "b": 10}


ALL_TIERS = list(Tier)
WORKERS = ["w0", "w1", "w2", "w3"]
Op = tuple[str, str, Tier, list[int]]


class ReferenceIndex:
    """The index's meaning, as plainly as it can be written: worker -> hash -> tiers."""

    def __init__(self) -> None:
        self.held: dict[str, dict[int, set[Tier]]] = {}

    def apply(self, kind: str, worker: str, tier: Tier, positions: list[int]) -> None:
        blocks = self.held.setdefault(worker, {})
        for position in positions:
            if kind == "store":
                blocks.setdefault(HASHES[position], set()).add(tier)
            elif kind == "remove" and HASHES[position] in blocks:
                blocks[HASHES[position]].discard(tier)
                if not blocks[HASHES[position]]:
                    del blocks[HASHES[position]]
        if kind == "clear":
            blocks.clear()

    def match(self, worker: str, tiers: set[Tier]) -> int:
        blocks = self.held.get(worker, {})
        length = 0
        for sequence_hash in HASHES:
            if not blocks.get(sequence_hash, set()) & tiers:
                break
            length += 1
        return length


ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "store", "remove", "clear", "leave"]),
        st.sampled_from(WORKERS),
        st.sampled_from(ALL_TIERS),
        st.lists(st.integers(0, len(HASHES) - 1), max_size=4),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@example(
    [
        ("store", "w0", Tier.HOST, [0, 1]),
        ("store", "w1", Tier.DEVICE, [0]),
        ("leave", "w0", Tier.DEVICE, []),
    ]
)
@given(ops)
def test_the_index_agrees_with_the_reference(operations: list[Op]) -> None:
    index = KvPrefixIndex()
    reference = ReferenceIndex()
    for kind, worker, tier, positions in operations:
        hashes = tuple(HASHES[p] for p in positions)
        if kind == "store":
            index.apply(worker, [stored(list(hashes), tier)])
        elif kind == "remove":
            index.apply(worker, [BlockRemoved(tier, hashes)])
        elif kind == "clear":
            index.apply(worker, [AllCleared(tier)])
        else:
            index.clear_worker(worker)
        reference.apply("clear" if kind == "leave" else kind, worker, tier, positions)
        for tiers in ({tier}, {Tier.DEVICE, Tier.HOST}, set(Tier)):
            expected = {w: reference.match(w, tiers) for w in WORKERS}
            assert index.match_lengths(HASHES, WORKERS, tiers) == expected
        for w in WORKERS:
            held = reference.held.get(w, {})
            assert index.num_blocks(w) == len(held)
            for sequence_hash in HASHES:
                assert index.tiers_of(w, sequence_hash) == held.get(sequence_hash, set())
    held_anywhere = {h for blocks in reference.held.values() for h in blocks}
    assert index.num_hashes == len(held_anywhere)
    assert index.num_cached_blocks == sum(len(b) for b in reference.held.values())
    assert len(index._states) <= index.num_hashes  # unreferenced holder states are freed
