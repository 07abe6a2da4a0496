"""The routing policy's choices over records, loads and a KV index (pure, no sockets)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

from frontend_fakes import BLOCK_SIZE, COMPAT, stored
from frontend_fakes import worker_record as record
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.discovery.records import Endpoints, FabricLayout, WorkerRecord
from fabric.discovery.registry import Role
from fabric.frontend.holders import HeldPrefixes
from fabric.frontend.kv_index import HashChunk, KvPrefixIndex
from fabric.frontend.policy import (
    HASH_CHUNK_BLOCKS,
    HASH_CHUNK_GROWTH,
    ROUTABLE_TIERS,
    Prefix,
    Route,
    RouteKind,
    cached_prefixes,
    choose_among_tied,
    choose_serving,
    choose_source,
    make_route,
)
from fabric.frontend.roster import Roster
from fabric.frontend.router import _source_candidates as source_candidates
from fabric.kvbm import Tier, sequence_hashes

PROMPT = list(range(100, 100 + 4 * BLOCK_SIZE + 3))  # 4 full blocks and a partial one
HASHES = sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT)


def route(
    workers: list[WorkerRecord],
    index: KvPrefixIndex,
    load: dict[str, int] | None = None,
) -> Route:
    """What the router does without a pin: serving worker, then KV source."""
    load = load or {}
    prefixes = cached_prefixes(workers, PROMPT, index)
    serving_pool = [w for w in workers if w.role is not Role.PREFILL]
    serving = choose_serving(serving_pool, load, prefixes)
    assert serving is not None
    return make_route(serving, choose_source(serving, workers, load, prefixes), prefixes)


def summary(chosen: Route) -> tuple[str, str, str, int, int]:
    source = chosen.source.worker_id if chosen.source is not None else ""
    return (
        chosen.serving.worker_id,
        source,
        chosen.kind.value,
        chosen.source_blocks,
        chosen.local_blocks,
    )


# Prefixes
# ---------------------------------------------------------------------------------------------


def test_prefixes_follow_each_worker_seed_and_block_size_and_skip_the_disk() -> None:
    index = KvPrefixIndex()
    big = record("big", Role.PREFILL, block_size=2 * BLOCK_SIZE)
    index.apply("big", [stored(sequence_hashes(PROMPT, 2 * BLOCK_SIZE, seed=COMPAT))])
    index.apply("host", [stored(HASHES[:1]), stored(HASHES[1:3], Tier.HOST)])
    index.apply("disk", [stored(HASHES, Tier.DISK)])  # every worker finds disk hits itself
    other = record("other", Role.PREFILL, compat=COMPAT + 1)
    index.apply("other", [stored(HASHES)])  # another seed: never this prompt's hashes
    no_geometry = WorkerRecord("p0", Role.PREFILL, Endpoints(), None, FabricLayout(), COMPAT, 0.0)
    workers = [big, record("host", Role.AGGREGATED), record("disk", Role.DECODE), other]
    assert cached_prefixes([*workers, no_geometry], PROMPT, index) == {
        "big": Prefix(2, 2),
        "host": Prefix(3, 4),
        "disk": Prefix(0, 4),
        "other": Prefix(0, 4),
        "p0": Prefix(0, 0),
    }


# Serving worker
# ---------------------------------------------------------------------------------------------


def test_serving_by_load_then_an_aggregated_prefix_then_the_id() -> None:
    workers = [record("d1", Role.DECODE), record("d2", Role.AGGREGATED)]
    assert choose_serving([], {}) is None
    assert choose_serving(workers, {}) == workers[0]
    assert choose_serving(workers, {"d1": 2, "d2": 1}) == workers[1]
    aggs = [record("a1", Role.AGGREGATED), record("a2", Role.AGGREGATED)]
    prefixes = {"a1": Prefix(1, 4), "a2": Prefix(3, 4)}
    assert choose_serving(aggs, {}, prefixes) == aggs[1]  # tie on load: the longer prefix
    assert choose_serving(aggs, {"a2": 1}, prefixes) == aggs[0]  # load first
    decodes = [record("d1", Role.DECODE), record("d2", Role.DECODE)]
    decode_prefixes = {"d1": Prefix(0, 4), "d2": Prefix(4, 4)}
    assert choose_serving(decodes, {}, decode_prefixes) == decodes[0]  # a decode prefix: no


# KV source: disaggregated (decode + prefill workers), as before
# ---------------------------------------------------------------------------------------------


def test_decode_reads_the_prefill_worker_with_the_longest_prefix_then_load() -> None:
    index = KvPrefixIndex()
    workers = [
        record("d", Role.DECODE),
        record("p1", Role.PREFILL),
        record("p2", Role.PREFILL),
        record("p3", Role.PREFILL),
    ]
    index.apply("p2", [stored(HASHES[:1])])
    index.apply("p3", [stored(HASHES[:1])])
    assert summary(route(workers, index, {"p2": 1})) == ("d", "p3", "prefill", 1, 0)
    index.apply("p1", [stored(HASHES[:2])])
    assert summary(route(workers, index, {"p1": 5}))[1] == "p1"  # prefix beats load
    index.apply("d", [stored(HASHES)])  # the decode worker's own cache does not skip prefill
    assert summary(route(workers, index, {"p1": 5})) == ("d", "p1", "prefill", 2, 4)
    for worker_id in ("p1", "p2", "p3"):
        index.clear_worker(worker_id)
    load = {"p1": 2, "p2": 1, "p3": 1}
    assert summary(route(workers, index, load))[1] == "p2"  # tie on load: smallest id


def test_decode_reads_an_aggregated_holder_but_never_another_geometry() -> None:
    index = KvPrefixIndex()
    workers = [
        record("d", Role.DECODE),
        record("agg", Role.AGGREGATED),
        record("p-other", Role.PREFILL, compat=COMPAT + 1),
        record("p-big", Role.PREFILL, block_size=2 * BLOCK_SIZE),
    ]
    index.apply("agg", [stored(HASHES)])
    index.apply("p-big", [stored(sequence_hashes(PROMPT, 2 * BLOCK_SIZE, seed=COMPAT))])
    index.apply("p-other", [stored(sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT + 1))])
    # neither prefill worker can exchange KV with d (another compat hash, another block size)
    prefixes = cached_prefixes(workers, PROMPT, index)
    compatible = [w for w in workers if w.worker_id != "agg"]
    assert choose_source(workers[0], compatible, {}, prefixes) is None
    # the aggregated worker holds the whole prompt: d reads it there (a peer's cache)
    assert choose_source(workers[0], workers, {}, prefixes) == workers[1]
    workers.append(record("p", Role.PREFILL))  # a compatible prefill worker that holds nothing
    assert summary(route(workers, index, {"agg": 1}))[:2] == ("d", "agg")
    index.clear_worker("agg")
    assert summary(route(workers, index, {"agg": 1})) == ("d", "p", "prefill", 0, 0)


# KV source: peer hits (aggregated serving workers)
# ---------------------------------------------------------------------------------------------


def test_peer_hit_when_the_serving_worker_lacks_the_prefix() -> None:
    index = KvPrefixIndex()
    workers = [record("a1", Role.AGGREGATED), record("a2", Role.AGGREGATED)]
    index.apply("a2", [stored(HASHES[:3], Tier.HOST)])  # the host tier counts
    # a2 is busy, so a1 serves and reads the 3 blocks a2 holds instead of computing them.
    assert summary(route(workers, index, {"a2": 1})) == ("a1", "a2", "peer_hit", 3, 0)
    # Both idle: a2 serves itself (it holds the longer prefix), computing locally.
    assert summary(route(workers, index)) == ("a2", "", "local", 3, 3)


def test_no_peer_hit_when_the_serving_worker_holds_as_much() -> None:
    index = KvPrefixIndex()
    workers = [record("a1", Role.AGGREGATED), record("a2", Role.AGGREGATED)]
    index.apply("a1", [stored(HASHES[:2])])
    index.apply("a2", [stored(HASHES[:2])])
    assert summary(route(workers, index, {"a1": 1})) == ("a2", "", "local", 2, 2)
    index.apply("a1", [stored(HASHES[2:3])])  # one full block more: worth reading
    assert summary(route(workers, index, {"a1": 1})) == ("a2", "a1", "peer_hit", 3, 2)
    prefixes = cached_prefixes(workers, PROMPT, index)
    assert choose_source(workers[1], workers, {}, prefixes, min_gain_blocks=2) is None


def test_no_peer_hit_across_compat_hashes_or_block_sizes() -> None:
    index = KvPrefixIndex()
    serving = record("a1", Role.AGGREGATED)
    other_compat = record("a2", Role.AGGREGATED, compat=COMPAT + 1)
    other_size = record("a3", Role.AGGREGATED, block_size=2 * BLOCK_SIZE)
    index.apply("a2", [stored(sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT + 1))])
    index.apply("a3", [stored(sequence_hashes(PROMPT, 2 * BLOCK_SIZE, seed=COMPAT))])
    workers = [serving, other_compat, other_size]
    prefixes = cached_prefixes(workers, PROMPT, index)
    assert prefixes["a2"].matched == 4 and prefixes["a3"].matched == 2
    assert choose_source(serving, workers, {}, prefixes) is None
    assert make_route(serving, None, prefixes).kind is RouteKind.LOCAL


def test_peer_hit_prefers_the_longest_prefix_then_a_prefill_worker_then_load() -> None:
    index = KvPrefixIndex()
    workers = [
        record("a0", Role.AGGREGATED),
        record("a1", Role.AGGREGATED),
        record("a2", Role.AGGREGATED),
        record("p1", Role.PREFILL),
        record("p2", Role.PREFILL),
    ]
    load = {"a1": 1, "a2": 1}  # a0 serves
    index.apply("p1", [stored(HASHES[:1])])
    index.apply("p2", [stored(HASHES[:2])])
    assert summary(route(workers, index, load)) == ("a0", "p2", "peer_hit", 2, 0)
    index.apply("a1", [stored(HASHES[:3])])
    index.apply("a2", [stored(HASHES[:3])])
    assert summary(route(workers, index, {**load, "a1": 2}))[1] == "a2"  # tie: load
    index.apply("p1", [stored(HASHES[:3])])
    assert summary(route(workers, index, {**load, "p1": 3}))[1] == "p1"  # tie: prefill first
    index.clear_worker("p2")
    index.clear_worker("p1")
    index.clear_worker("a1")
    index.clear_worker("a2")
    # Nobody holds anything: an aggregated worker never hands its compute to a prefill worker.
    assert summary(route(workers, index, load)) == ("a0", "", "local", 0, 0)


def test_route_kinds() -> None:
    decode, agg = record("d", Role.DECODE), record("a", Role.AGGREGATED)
    prefill, other = record("p", Role.PREFILL), record("b", Role.AGGREGATED)
    prefixes = {"d": Prefix(1, 4), "a": Prefix(2, 4), "p": Prefix(3, 4)}
    assert make_route(decode, prefill, prefixes).kind is RouteKind.PREFILL
    assert make_route(agg, prefill, prefixes).kind is RouteKind.PEER_HIT
    assert make_route(agg, other, prefixes, pinned=True).kind is RouteKind.PEER_HIT
    local = make_route(agg, None, prefixes)
    assert (local.kind, local.source_blocks, local.local_blocks, local.num_blocks) == (
        RouteKind.LOCAL,
        2,
        2,
        4,
    )


def test_prefixes_of_an_empty_index_count_the_full_blocks_without_hashing() -> None:
    workers = [record("a", Role.AGGREGATED), record("big", Role.PREFILL, block_size=3 * BLOCK_SIZE)]
    assert cached_prefixes(workers, PROMPT, KvPrefixIndex()) == {
        "a": Prefix(0, 4),
        "big": Prefix(0, 1),
    }


class ChunkCountingIndex(KvPrefixIndex):
    """Records the length of every chunk of hashes the policy hands over."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[int] = []

    def held_prefixes(
        self,
        chunks: Iterable[HashChunk],
        workers: Collection[str],
        tiers: Collection[Tier] | None = None,
    ) -> HeldPrefixes:
        def counted() -> Iterator[HashChunk]:
            for chunk in chunks:
                self.read.append(len(chunk))
                yield chunk

        return super().held_prefixes(counted(), workers, tiers)


def test_a_prompt_is_hashed_only_a_chunk_past_its_longest_cached_prefix() -> None:
    """No holder: nothing hashed; a holder of 20 blocks: the first two chunks, not the rest."""
    tokens = [(7 * i) % 50_000 for i in range(1000 * BLOCK_SIZE)]
    hashes = sequence_hashes(tokens, BLOCK_SIZE, seed=COMPAT)
    index = ChunkCountingIndex()
    assert cached_prefixes([record("a", Role.AGGREGATED)], tokens, index) == {"a": Prefix(0, 1000)}
    assert index.read == []
    index.apply("a", [stored(hashes[:20])])
    assert cached_prefixes([record("a", Role.AGGREGATED)], tokens, index) == {"a": Prefix(20, 1000)}
    assert index.read == [HASH_CHUNK_BLOCKS, HASH_CHUNK_BLOCKS * HASH_CHUNK_GROWTH]


# The lazy prefix map against plain dicts
# ---------------------------------------------------------------------------------------------

holdings = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 4), st.sampled_from([Tier.DEVICE, Tier.DISK])),
    max_size=12,
)
roles = st.lists(st.sampled_from(list(Role)[:3]), min_size=8, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    holdings,
    roles,
    st.lists(st.integers(0, 2), min_size=8, max_size=8),
    st.lists(st.sampled_from([None, "n1", "n2"]), min_size=8, max_size=8),
    st.integers(0, 4),
)
def test_choices_over_the_lazy_prefixes_equal_those_over_a_dict(
    held: list[tuple[int, int, Tier]],
    worker_roles: list[Role],
    loads: list[int],
    nodes: list[str | None],
    node_held: int,
) -> None:
    """``Prefixes`` (read on demand, the router's O(holders) passes, node tiers included) and
    the same prefixes as a plain dict (the straightforward passes over every worker) give the
    same route; so does the least-loaded bucket of a ``Roster`` (the router's path)."""
    workers = [
        record(f"w{i}", role, node=node)
        for i, (role, node) in enumerate(zip(worker_roles, nodes, strict=True))
    ]
    workers.append(record("other-geometry", Role.AGGREGATED, block_size=2 * BLOCK_SIZE))
    index = KvPrefixIndex()
    for w, length, tier in held:
        if length:
            index.apply(f"w{w}", [stored(HASHES[:length], tier)])
    cache = record("node-cache-n1", Role.NODE_CACHE, node="n1")
    if node_held:
        index.apply(cache.worker_id, [stored(HASHES[:node_held], Tier.NODE)])
    load = {f"w{i}": n for i, n in enumerate(loads)}
    lazy = cached_prefixes(workers, PROMPT, index, {"n1": cache})
    plain = dict(lazy)

    def expected(worker: WorkerRecord) -> Prefix:
        own = index.match_lengths(HASHES, [worker.worker_id], ROUTABLE_TIERS)[worker.worker_id]
        node = node_held if worker.node == "n1" else 0
        return Prefix(max(own, node), 4, node > own)

    assert plain == {w.worker_id: expected(w) for w in workers[:-1]} | {
        "other-geometry": Prefix(0, 2)
    }
    pool = [w for w in workers if w.role is not Role.PREFILL]
    if not pool:
        return
    serving = choose_serving(pool, load, lazy)
    assert serving is not None
    assert serving == choose_serving(pool, load, plain)
    _, tied = Roster.of(workers, load).least_loaded()
    assert choose_among_tied(tied, lazy) == serving
    by_id = {w.worker_id: w for w in workers}
    source = choose_source(serving, source_candidates(serving, by_id, lazy), load, lazy)
    assert source == choose_source(serving, workers, load, plain)
