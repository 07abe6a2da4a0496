"""``U64Table`` (the KV index's hash table) against a dict, with probing collisions forced,
tombstones, wrap-around at the table's end and rebuilds; and the index over thousands of hashes
(rebuilds and churn under it) against the same plain reference model as ``test_kv_index``."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.frontend.hash_table import (
    FIRST_VALUE,
    MAX_LOAD,
    MIN_CAPACITY,
    TOMBSTONE,
    Keys,
    Positions,
    U64Table,
)
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.kvbm import BlockRemoved, BlockStored, SequenceHash, Tier


class CollidingTable(U64Table):
    """Every key's home is one of the last three slots: long probe runs that wrap around."""

    def _home(self, keys: Keys) -> Positions:
        return (self.capacity - 1 - (keys % np.uint64(3))).astype(np.intp)


def as_keys(values: list[int]) -> Keys:
    return np.array(values, dtype=np.uint64)


def check_against(table: U64Table, reference: dict[int, int], absent: list[int]) -> None:
    assert len(table) == len(reference)
    keys = list(reference)
    positions = table.find(as_keys(keys + absent))
    assert (positions[len(keys) :] == -1).all()
    found = positions[: len(keys)]
    assert (found >= 0).all()
    assert table.values[found].tolist() == [reference[k] for k in keys]
    assert int(np.count_nonzero(table.values >= FIRST_VALUE)) == len(reference)
    assert len(table) + table._tombstones <= MAX_LOAD * table.capacity


operations = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "delete", "set"]),
        st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 40), max_size=60),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(operations, st.booleans())
def test_the_table_agrees_with_a_dict(ops: list[tuple[str, list[int]]], colliding: bool) -> None:
    table = CollidingTable() if colliding else U64Table()
    reference: dict[int, int] = {}
    for n, (kind, values) in enumerate(ops):
        distinct = list(dict.fromkeys(values))
        if kind == "insert":
            new = [k for k in distinct if k not in reference]
            table.insert(as_keys(new), FIRST_VALUE + n)
            reference.update(dict.fromkeys(new, FIRST_VALUE + n))
        else:
            held = [k for k in distinct if k in reference]
            positions = table.find(as_keys(held))
            value = TOMBSTONE if kind == "delete" else FIRST_VALUE + n
            table.assign(positions, np.full(len(held), value, dtype=np.uint32))
            for k in held:
                if kind == "delete":
                    del reference[k]
                else:
                    reference[k] = value
        check_against(table, reference, [k for k in values if k not in reference])


def test_growth_churn_and_shrink_keep_every_entry() -> None:
    rng = np.random.default_rng(7)
    table = U64Table()
    reference: dict[int, int] = {}
    for round_ in range(40):  # grows past several rebuilds, then churns: tombstones pile up
        new = [k for k in dict.fromkeys(rng.integers(0, 2**64 - 1, 500, dtype=np.uint64).tolist())]
        new = [k for k in new if k not in reference]
        table.insert(as_keys(new), FIRST_VALUE + round_)
        reference.update(dict.fromkeys(new, FIRST_VALUE + round_))
        if round_ >= 20:
            gone = list(reference)[:450]
            table.assign(table.find(as_keys(gone)), np.full(len(gone), TOMBSTONE, np.uint32))
            for k in gone:
                del reference[k]
    check_against(table, reference, [1, 2, 3])
    grown = table.capacity
    assert grown > MIN_CAPACITY
    everything = list(reference)
    table.assign(table.find(as_keys(everything)), np.full(len(everything), TOMBSTONE, np.uint32))
    assert len(table) == 0 and table._tombstones == 0
    assert table.capacity == MIN_CAPACITY  # emptied: the memory goes back
    table.insert(as_keys([5, 6]), FIRST_VALUE)
    check_against(table, {5: FIRST_VALUE, 6: FIRST_VALUE}, [7])


def test_the_index_over_thousands_of_hashes_agrees_with_the_reference() -> None:
    """Enough hashes for several table rebuilds, with removals and a clear between them."""
    rng = np.random.default_rng(3)
    chains = [rng.integers(0, 2**64 - 1, 700, dtype=np.uint64).tolist() for _ in range(6)]
    index = KvPrefixIndex()
    held: dict[str, dict[int, set[Tier]]] = {}

    def apply(worker: str, event: BlockStored | BlockRemoved) -> None:
        index.apply(worker, [event])
        blocks = held.setdefault(worker, {})
        for h in event.sequence_hashes:
            if isinstance(event, BlockStored):
                blocks.setdefault(h, set()).add(event.tier)
            elif h in blocks:
                blocks[h].discard(event.tier)
                if not blocks[h]:
                    del blocks[h]

    for i, chain in enumerate(chains):
        hashes = tuple(SequenceHash(h) for h in chain)
        for w in range(4):
            worker = f"w{w}"
            stop = 100 * (w + 1) + 50 * i
            apply(worker, BlockStored(Tier.DEVICE, hashes[:stop], None, None, None, 16))
            apply(worker, BlockStored(Tier.HOST, hashes[: stop // 2], None, None, None, 16))
            if (i + w) % 3 == 0:
                apply(worker, BlockRemoved(Tier.DEVICE, hashes[stop // 4 : stop]))
        if i == 3:
            index.clear_worker("w1")
            held["w1"] = {}
    for chain in chains:
        for tiers in ({Tier.DEVICE}, {Tier.HOST}, set(Tier)):
            expected = {}
            for worker, blocks in held.items():
                length = 0
                for h in chain:
                    if not blocks.get(h, set()) & tiers:
                        break
                    length += 1
                expected[worker] = length
            assert index.match_lengths(chain, list(held), tiers) == expected
    for worker, blocks in held.items():
        assert index.num_blocks(worker) == len(blocks)
    assert index.num_hashes == len({h for blocks in held.values() for h in blocks})
    assert index.num_cached_blocks == sum(len(blocks) for blocks in held.values())


index_ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "store", "remove", "clear"]),
        st.sampled_from(["w0", "w1", "w2"]),
        st.sampled_from([Tier.DEVICE, Tier.HOST]),
        st.integers(0, 39),
        st.integers(1, 40),
    ),
    max_size=40,
)
CHAIN = [SequenceHash(h) for h in range(7, 7 + 40 * 3, 3)]  # keys colliding on purpose below


@settings(max_examples=150, deadline=None)
@given(index_ops)
def test_the_index_over_a_colliding_table_agrees_with_the_reference(
    ops: list[tuple[str, str, Tier, int, int]],
) -> None:
    """Every key homes to one of three slots: the index's stores, removals and clears still
    find each entry through long probe runs that wrap around and through tombstones."""
    index = KvPrefixIndex()
    index._table = CollidingTable()
    held: dict[str, dict[int, set[Tier]]] = {w: {} for w in ("w0", "w1", "w2")}
    for kind, worker, tier, start, length in ops:
        hashes = tuple(CHAIN[start : start + length])
        blocks = held[worker]
        if kind == "store":
            index.apply(worker, [BlockStored(tier, hashes, None, None, None, 16)])
            for h in hashes:
                blocks.setdefault(h, set()).add(tier)
        elif kind == "remove":
            index.apply(worker, [BlockRemoved(tier, hashes)])
            for h in hashes:
                if h in blocks:
                    blocks[h].discard(tier)
                    if not blocks[h]:
                        del blocks[h]
        else:
            index.clear_worker(worker)
            blocks.clear()
        for w, expected in held.items():
            assert index.num_blocks(w) == len(expected)
            length_held = 0
            for h in CHAIN:
                if h not in expected:
                    break
                length_held += 1
            assert index.match_lengths(CHAIN, [w])[w] == length_held
            for h in CHAIN[::7]:
                assert index.tiers_of(w, h) == expected.get(h, set())
    assert index.num_hashes == len({h for blocks in held.values() for h in blocks})
