"""RegionList: construction, coalescing, pairwise coalescing (byte mapping preserved)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fabric.errors import InvalidInput
from fabric.kvbm.tiers import storage as kvbm_storage
from fabric.transfer.memory import (
    BufferInfo,
    MemoryKind,
    RegionList,
    check_pairs,
    pair_coalesce,
)

DRAM = MemoryKind.DRAM


def test_storage_reexports_the_transfer_types() -> None:
    assert kvbm_storage.MemoryKind is MemoryKind
    assert kvbm_storage.BufferInfo is BufferInfo


def test_build_broadcasts_scalars_and_freezes() -> None:
    regions = RegionList.build(DRAM, [100, 200, 300], 50)
    assert len(regions) == 3
    assert regions.nbytes == 150
    assert regions.lengths.tolist() == [50, 50, 50]
    assert regions.device_ids.tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        regions.addresses[0] = 1
    descs = regions.descs()
    assert descs.dtype == np.uint64
    assert descs.tolist() == [[100, 50, 0], [200, 50, 0], [300, 50, 0]]


def test_build_accepts_uint64_and_empty() -> None:
    regions = RegionList.build(DRAM, np.array([1 << 40], dtype=np.uint64), [8], [3])
    assert regions.addresses.tolist() == [1 << 40]
    empty = RegionList.build(DRAM, [], [])
    assert len(empty) == 0
    assert empty.nbytes == 0
    assert len(empty.coalesce()) == 0


@pytest.mark.parametrize(
    ("kind", "addresses", "lengths", "devices", "needle"),
    [
        ("DRAM", [0], [1], 0, "not a MemoryKind"),
        (DRAM, [0, 10], [0, 5], 0, "must be positive"),
        (DRAM, [-8], [8], 0, "non-negative"),
        (DRAM, [8], [8], -1, "non-negative"),
        (DRAM, [0, 1, 2], [1, 2], 0, "another size"),
        (DRAM, [0.5], [1], 0, "flat sequence of ints"),
        (DRAM, [[0, 1]], [1], 0, "flat sequence of ints"),
        (DRAM, np.array([1 << 63], dtype=np.uint64), [1], 0, r"2\*\*63"),
    ],
)
def test_build_rejects(kind, addresses, lengths, devices, needle) -> None:
    with pytest.raises(InvalidInput, match=needle):
        RegionList.build(kind, addresses, lengths, devices)


def test_from_buffers() -> None:
    bufs = [BufferInfo(4096, 100, DRAM, 0, None), BufferInfo(8192, 50, DRAM, 1, None)]
    regions = RegionList.from_buffers(bufs)
    assert regions.descs().tolist() == [[4096, 100, 0], [8192, 50, 1]]
    with pytest.raises(InvalidInput, match="one memory kind"):
        RegionList.from_buffers([bufs[0], BufferInfo(0, 10, MemoryKind.FILE, 3, "/x")])


def test_coalesce_merges_adjacent_runs_only() -> None:
    regions = RegionList.build(
        DRAM,
        [0, 10, 20, 100, 110, 50, 60],
        [10, 10, 5, 10, 10, 10, 10],
        [0, 0, 0, 0, 1, 0, 0],
    )
    merged = regions.coalesce()
    # 0..25 merge; 100 starts a run; 110 is on another device; 50 restarts (descending); 60 joins.
    assert merged.descs().tolist() == [[0, 25, 0], [100, 10, 0], [110, 10, 1], [50, 20, 0]]
    assert merged.nbytes == regions.nbytes
    assert regions.coalesce().coalesce().descs().tolist() == merged.descs().tolist()


def test_coalesce_returns_self_when_nothing_merges() -> None:
    regions = RegionList.build(DRAM, [0, 20, 40], 10)
    assert regions.coalesce() is regions


def test_pair_coalesce_needs_both_sides_adjacent() -> None:
    local = RegionList.build(DRAM, [0, 10, 20, 30], 10)
    remote = RegionList.build(DRAM, [500, 510, 900, 910], 10)
    merged_local, merged_remote = pair_coalesce(local, remote)
    assert merged_local.descs().tolist() == [[0, 20, 0], [20, 20, 0]]
    assert merged_remote.descs().tolist() == [[500, 20, 0], [900, 20, 0]]
    # Local alone would merge into one region; the pairs must not.
    assert len(local.coalesce()) == 1


def test_pair_coalesce_rejects_unpaired_lists() -> None:
    with pytest.raises(InvalidInput, match="pair up"):
        pair_coalesce(RegionList.build(DRAM, [0, 8], 8), RegionList.build(DRAM, [0], 16))
    with pytest.raises(InvalidInput, match="pair 1 differs in length"):
        check_pairs(RegionList.build(DRAM, [0, 8], [8, 8]), RegionList.build(DRAM, [0, 8], [8, 4]))


def _byte_map(local: RegionList, remote: RegionList) -> list[tuple[int, int]]:
    """Every (local byte address, remote byte address) pair the lists move, in order."""
    pairs: list[tuple[int, int]] = []
    for la, ra, n in zip(local.addresses, remote.addresses, local.lengths, strict=True):
        pairs.extend((int(la) + k, int(ra) + k) for k in range(int(n)))
    return pairs


pieces = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(1, 4), st.booleans()),
    max_size=25,
)


@given(pieces)
@example([(0, 0, 2, False), (0, 1, 2, False)])  # both adjacent: one merged pair
@example([(0, 0, 2, False), (0, 3, 2, False)])  # remote gap: two pairs
def test_pair_coalesce_preserves_the_byte_mapping(steps) -> None:
    """Random walks of regions: a gap of 0 makes a side adjacent to the previous region."""
    local_addr, remote_addr, lengths = [], [], []
    la, ra = 1000, 5000
    for local_gap, remote_gap, length, backwards in steps:
        la += local_gap if not backwards else -3 * length
        ra += remote_gap
        local_addr.append(max(la, 0))
        remote_addr.append(ra)
        lengths.append(length)
        la, ra = max(la, 0) + length, ra + length
    local = RegionList.build(DRAM, local_addr, lengths)
    remote = RegionList.build(DRAM, remote_addr, lengths)
    merged_local, merged_remote = pair_coalesce(local, remote)
    assert _byte_map(merged_local, merged_remote) == _byte_map(local, remote)
    assert np.array_equal(merged_local.lengths, merged_remote.lengths)
    # Maximal: no two consecutive merged pairs are adjacent on both sides.
    ends_l = merged_local.addresses[:-1] + merged_local.lengths[:-1]
    ends_r = merged_remote.addresses[:-1] + merged_remote.lengths[:-1]
    both = (merged_local.addresses[1:] == ends_l) & (merged_remote.addresses[1:] == ends_r)
    assert not both.any()
