"""The node cache's slot index (``fabric.node.index``): probing against a model under publish /
unpublish with colliding hashes, full hits read with no request, a copy raced by an overwrite
cut where the overwrite began, partial hits and misses sent to the service, recency and counts
from readers' marks, and a closed or replaced index left unused."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from node_harness import NUM_BLOCKS, SPEC
from node_peer import exact, filled_storage, layout

from fabric.errors import FabricError
from fabric.kvbm import SequenceHash, host_storage
from fabric.node import NodeCacheClient, NodeCacheService
from fabric.node.index import OPTIMISTIC_READS, IndexReader, IndexWriter, home_bucket

pytestmark = pytest.mark.skipif(
    not OPTIMISTIC_READS, reason="optimistic reads are built on x86-64 only"
)

Op = tuple[str, int, int]  # ("publish" | "unpublish", slot, hash)
COLLIDING = st.sampled_from(  # two home buckets of 16, one at the end (probes wrap around)
    [h for h in range(4000) if home_bucket(h, 16) in (3, 15)][:16]
)


@pytest.fixture
def index_pair() -> Iterator[Callable[[int], tuple[IndexWriter, IndexReader]]]:
    made: list[tuple[IndexWriter, IndexReader]] = []

    def make(num_slots: int) -> tuple[IndexWriter, IndexReader]:
        segment = f"t{uuid.uuid4().hex[:12]}-unit"
        writer = IndexWriter(segment, num_slots, data_inode=7)
        made.append((writer, IndexReader(segment, num_slots)))
        return made[-1]

    yield make
    for writer, reader in made:
        reader.close()
        writer.close()


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["publish", "unpublish"]),
            st.integers(0, 5),
            st.one_of(COLLIDING, st.integers(0, 2**64 - 1)),
        ),
        max_size=40,
    )
)
@example(ops=[("publish", 0, 3), ("publish", 1, 1 << 40 | 3), ("unpublish", 0, 0)])
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_probe_finds_exactly_the_published_slots(
    index_pair: Callable[[int], tuple[IndexWriter, IndexReader]], ops: list[Op]
) -> None:
    writer, reader = index_pair(6)
    model: dict[int, int] = {}  # slot -> hash
    for op, slot, h in ops:
        if op == "publish" and slot not in model and h not in model.values():
            writer.publish([slot], [h])
            model[slot] = h
        elif op == "unpublish":
            writer.unpublish([slot])
            model.pop(slot, None)
        for s, published in model.items():
            probe = reader.probe([published])
            assert probe.slots.tolist() == [s]
            assert reader.num_unchanged(probe, 1) == 1
    for gone in {op[2] for op in ops} - set(model.values()):
        assert reader.probe([gone]).slots.size == 0
    held = list(model.values())
    writer.unpublish(list(model))
    assert all(reader.probe([was]).slots.size == 0 for was in held)


def test_a_generation_change_after_the_probe_cuts_the_prefix(
    index_pair: Callable[[int], tuple[IndexWriter, IndexReader]],
) -> None:
    writer, reader = index_pair(4)
    writer.publish([0, 1, 2], [10, 11, 12])
    probe = reader.probe([10, 11, 12, 13])
    assert probe.slots.tolist() == [0, 1, 2]
    writer.unpublish([1])  # handed to a writer while the reader copied
    assert reader.num_unchanged(probe, 3) == 1
    writer.publish([1], [11])  # republished: still not the bytes the reader copied
    assert reader.num_unchanged(probe, 3) == 1
    assert reader.current()
    writer.close()
    assert not reader.current()


def hashes(*values: int) -> list[SequenceHash]:
    return [SequenceHash(v) for v in values]


def store(client: NodeCacheClient, hs: list[SequenceHash]) -> None:
    assert client.store(hs, filled_storage(SPEC, list(hs)), list(range(len(hs)))).num_stored


def test_a_full_hit_is_read_with_no_request_and_counted_at_the_next_one(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    writer, reader = make_client(service, "w"), make_client(service, "r")
    assert reader.optimistic
    store(writer, hashes(*range(1, NUM_BLOCKS + 1)))  # full: the next store evicts
    dst = host_storage(layout(SPEC, 2), pin=False)
    assert reader.load(hashes(1, 2), dst, [0, 1]) == 2 and exact(dst, [1, 2], 2)
    assert reader.num_optimistic_loads == 1
    stats = writer.stats()  # a request: the reader's marks are drained first
    assert (stats["pins"], stats["optimistic_hits"], stats["misses"]) == (0, 2, 0)  # no lookup
    assert stats["hits"] == 2  # hits count what the index served too (dashboards' hit rates)
    store(writer, hashes(101, 102))  # evicts the two least recently used: 3 and 4, not 1 and 2
    assert reader.load(hashes(1, 2), dst, [0, 1]) == 2 and exact(dst, [1, 2], 2)
    assert reader.num_optimistic_loads == 2
    assert reader.load(hashes(3), dst, [0]) == 0  # evicted: a miss, asked of the service
    assert reader.num_optimistic_loads == 2


def test_partial_hits_and_misses_go_to_the_service(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    writer, reader = make_client(service, "w"), make_client(service, "r")
    store(writer, hashes(1, 2))
    dst = host_storage(layout(SPEC, 3), pin=False)
    assert reader.load(hashes(1, 2, 3), dst, [0, 1, 2]) == 2 and exact(dst, [1, 2], 2)
    assert reader.load(hashes(9), dst, [0]) == 0
    assert reader.num_optimistic_loads == 0
    stats = reader.stats()
    assert (stats["pins"], stats["hits"], stats["misses"]) == (1, 2, 2)


def test_a_copy_raced_by_an_overwrite_is_cut_where_the_overwrite_began(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    writer, reader = make_client(service, "w"), make_client(service, "r")
    store(writer, hashes(*range(1, NUM_BLOCKS + 1)))

    def allocate_while_evicted(num_blocks: int) -> list[int]:
        # between the probe and the copy: the two least recently used (3 and 4, behind 1 and 2)
        # are evicted and overwritten with other blocks' bytes
        store(writer, hashes(201, 202))
        return list(range(num_blocks))

    dst = host_storage(layout(SPEC, NUM_BLOCKS), pin=False)
    reader.load(hashes(1, 2), dst, [0, 1])  # 1 and 2 most recent
    writer.stats()  # drain the marks
    wanted = hashes(*range(1, NUM_BLOCKS + 1))
    n = reader.load_into(wanted, dst, allocate_while_evicted)
    assert n == 2 and exact(dst, list(wanted), n)
    assert reader.num_optimistic_loads == 2


def test_a_restarted_service_is_not_read_through_the_old_index(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    client = make_client(service)
    store(client, hashes(1, 2))
    service.close()
    dst = host_storage(layout(SPEC, 2), pin=False)
    with pytest.raises(FabricError):  # asked of the service, which is gone
        client.load(hashes(1, 2), dst, [0, 1])
    assert client.num_optimistic_loads == 0
