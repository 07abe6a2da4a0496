"""Routing on node tiers: a node cache's KV events count for every worker of its node.

Policy tests over a ``KvPrefixIndex`` fed directly (the node cache's location is its record's id),
then the fleet over fake event streams: a node-cache record with a real ``ZmqEventPublisher``
(with replay) and fake aggregated workers whose records name their node.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from frontend_fakes import (
    BLOCK_SIZE,
    COMPAT,
    MODEL,
    WAIT_S,
    FakeWorker,
    RunningFrontend,
    register,
    stored,
    wait_until,
)
from frontend_fakes import worker_record as record

from fabric.discovery.records import Endpoints, WorkerRecord
from fabric.discovery.registration import WorkerRegistration
from fabric.discovery.registry import Registry, Role
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.frontend.policy import (
    Prefix,
    Route,
    RouteKind,
    cached_prefixes,
    choose_serving,
    choose_source,
    make_route,
)
from fabric.frontend.router import _source_candidates as source_candidates
from fabric.kvbm import (
    AllCleared,
    Tier,
    ZmqEventPublisher,
    sequence_hashes,
)

MakeWorker = Callable[..., FakeWorker]
StartFrontend = Callable[..., RunningFrontend]
PROMPT = list(range(300, 300 + 4 * BLOCK_SIZE + 3))  # 4 full blocks and a partial one
HASHES = sequence_hashes(PROMPT, BLOCK_SIZE, seed=COMPAT)


def node_cache(node: str, *, compat: int = COMPAT) -> WorkerRecord:
    return record(f"node-cache-{node}", Role.NODE_CACHE, node=node, compat=compat)


def route(
    workers: list[WorkerRecord],
    index: KvPrefixIndex,
    caches: list[WorkerRecord],
    load: dict[str, int] | None = None,
) -> Route:
    """What the router does without a pin, node tiers included."""
    load = load or {}
    by_node = {cache.node: cache for cache in caches if cache.node is not None}
    prefixes = cached_prefixes(workers, PROMPT, index, by_node)
    serving = choose_serving([w for w in workers if w.role is not Role.PREFILL], load, prefixes)
    assert serving is not None
    by_id = {w.worker_id: w for w in workers}
    candidates = source_candidates(serving, by_id, prefixes)
    return make_route(serving, choose_source(serving, candidates, load, prefixes), prefixes)


# Policy
# ---------------------------------------------------------------------------------------------


def test_a_worker_counts_its_nodes_tier_when_it_holds_more_than_its_own_pools() -> None:
    index = KvPrefixIndex()
    cache = node_cache("n1")
    index.apply(cache.worker_id, [stored(HASHES[:3], Tier.NODE)])
    index.apply("own", [stored(HASHES, Tier.DEVICE)])
    workers = [
        record("empty", node="n1"),
        record("own", node="n1"),  # its own pools hold more: not from the node
        record("elsewhere", node="n2"),
        record("nameless"),  # no node in its record
        record("seeded", node="n1", compat=COMPAT + 1),  # another geometry than the cache's
        record("detached", node="n1", attached=False),  # on n1, not attached to its cache
    ]
    prefixes = cached_prefixes(workers, PROMPT, index, {"n1": cache})
    assert dict(prefixes) == {
        "empty": Prefix(3, 4, from_node=True),
        "own": Prefix(4, 4),
        "elsewhere": Prefix(0, 4),
        "nameless": Prefix(0, 4),
        "seeded": Prefix(0, 4),
        "detached": Prefix(0, 4),
    }
    assert cache.worker_id not in prefixes  # a location, not a worker
    # Without the node caches' view (or with one of another geometry) nothing is credited.
    assert cached_prefixes(workers, PROMPT, index)["empty"] == Prefix(0, 4)
    other = node_cache("n1", compat=COMPAT + 1)
    assert cached_prefixes(workers, PROMPT, index, {"n1": other})["empty"] == Prefix(0, 4)
    assert cached_prefixes(workers, PROMPT, index, {"n1": other})["seeded"] == Prefix(0, 4)


def test_a_prefix_in_a_nodes_tier_routes_to_the_least_loaded_instance_of_that_node() -> None:
    index = KvPrefixIndex()
    cache = node_cache("n1")
    workers = [record("a", node="n1"), record("b", node="n1"), record("c", node="n2")]
    # Worker a computed the prefix: its device and, through its node tier, n1's cache.
    index.apply("a", [stored(HASHES[:3], Tier.DEVICE)])
    index.apply(cache.worker_id, [stored(HASHES[:3], Tier.NODE)])
    summary = route(workers, index, [cache])
    assert (summary.serving.worker_id, summary.kind) == ("a", RouteKind.LOCAL)
    # a busy: b (same node) reads n1's tier itself, where it used to read a's device (peer).
    summary = route(workers, index, [cache], {"a": 1})
    assert (summary.serving.worker_id, summary.source, summary.kind) == ("b", None, RouteKind.NODE)
    assert (summary.source_blocks, summary.local_blocks, summary.num_blocks) == (3, 3, 4)
    # a gone (its entries cleared), b busy too: c, on another node, has the least load; it reads
    # the prefix from a holder of n1 (b: its node tier) as a peer hit.
    index.clear_worker("a")
    workers = workers[1:]
    summary = route(workers, index, [cache], {"b": 1})
    assert summary.serving.worker_id == "c" and summary.kind is RouteKind.PEER_HIT
    assert summary.source is not None and summary.source.worker_id == "b"
    assert summary.source_blocks == 3
    # Equal loads: the tie goes to the node that holds the prefix, whichever ids sort first.
    workers = [record("a0", node="n2"), record("z9", node="n1")]
    summary = route(workers, index, [cache])
    assert (summary.serving.worker_id, summary.kind) == ("z9", RouteKind.NODE)


def test_node_and_own_prefixes_tie_and_the_longer_wins() -> None:
    index = KvPrefixIndex()
    cache = node_cache("n1")
    index.apply(cache.worker_id, [stored(HASHES[:2], Tier.NODE)])
    index.apply("own", [stored(HASHES[:2], Tier.HOST)])
    workers = [record("own", node="n2"), record("via-node", node="n1")]
    by_node = {"n1": cache}
    prefixes = cached_prefixes(workers, PROMPT, index, by_node)
    both = {"own", "via-node"}
    assert prefixes.longest(both, lambda _: True) == both  # weighed alike
    index.apply(cache.worker_id, [stored(HASHES[2:3], Tier.NODE)])
    prefixes = cached_prefixes(workers, PROMPT, index, by_node)
    assert prefixes.longest(both, lambda _: True) == {"via-node"}
    assert set(prefixes.holders(3)) == {"via-node"}
    index.apply(cache.worker_id, [AllCleared(Tier.NODE)])
    assert cached_prefixes(workers, PROMPT, index, by_node)["via-node"] == Prefix(0, 4)


# The fleet, over fake event streams
# ---------------------------------------------------------------------------------------------


class NodeCaches:
    """Node-cache records whose KV events come from real publishers (with replay)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._publishers: list[ZmqEventPublisher] = []
        self._registrations: dict[str, WorkerRegistration] = {}

    def add(self, node: str) -> ZmqEventPublisher:
        publisher = ZmqEventPublisher("tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0")
        self._publishers.append(publisher)
        endpoints = Endpoints(events=publisher.endpoint, events_replay=publisher.replay_endpoint)
        self._registrations[node] = register(
            self._registry, f"node-cache-{node}", Role.NODE_CACHE, endpoints, node=node
        )
        return publisher

    def leave(self, node: str) -> None:
        self._registrations.pop(node).close()

    def close(self) -> None:
        for registration in self._registrations.values():
            registration.close()
        for publisher in self._publishers:
            publisher.close()


@pytest.fixture
def node_caches(registry: Registry) -> Iterator[NodeCaches]:
    caches = NodeCaches(registry)
    yield caches
    caches.close()


def post(running: RunningFrontend, body: dict[str, object]) -> dict[str, object]:
    response = httpx.post(
        f"{running.url}/v1/completions", json={"model": MODEL, **body}, timeout=WAIT_S
    )
    assert response.status_code == 200, response.text
    fabric = response.json()["fabric"]
    assert isinstance(fabric, dict)
    return fabric


def test_the_fleet_follows_node_cache_events_and_routes_to_the_node(
    make_worker: MakeWorker, start_frontend: StartFrontend, node_caches: NodeCaches
) -> None:
    holder = make_worker("agg-a", role=Role.AGGREGATED, events=True, node="n1")
    other = make_worker("agg-b", role=Role.AGGREGATED, node="n1")
    make_worker("agg-0", role=Role.AGGREGATED, node="n2")  # sorts first: a tie goes to it
    publisher = node_caches.add("n1")
    publisher.publish([stored(HASHES[:3], Tier.NODE)])  # before the frontend: learnt by replay
    assert holder.publisher is not None
    holder.publisher.publish([stored(HASHES[:3], Tier.DEVICE)])
    running = start_frontend()
    fleet = running.frontend.router.fleet
    assert wait_until(lambda: fleet.index.num_blocks("node-cache-n1") == 3)
    assert "node-cache-n1" in fleet.node_caches() and "node-cache-n1" not in fleet.workers()
    # Every worker idle: the holder serves (its own 3 blocks beat none and tie with n1's tier).
    fabric = post(running, {"prompt": PROMPT, "max_tokens": 2})
    assert (fabric["worker"], fabric["route"], fabric["routed_prefill_worker"]) == (
        "agg-a",
        "local",
        "",
    )
    # The holder busy: agg-b, on the holder's node, reads n1's tier; no peer transfer.
    holder.gate.clear()
    busy = threading.Thread(
        target=post, args=(running, {"prompt": "x", "max_tokens": 2, "fabric": {"worker": "agg-a"}})
    )
    busy.start()
    try:
        assert wait_until(lambda: fleet.in_flight()["agg-a"][1] == 1)
        fabric = post(running, {"prompt": PROMPT, "max_tokens": 2})
        assert (fabric["worker"], fabric["route"], fabric["routed_prefill_worker"]) == (
            "agg-b",
            "node",
            "",
        )
        assert (fabric["routed_prefix_blocks"], fabric["routed_local_blocks"]) == (3, 3)
        assert other.next_request().prefill_worker == ""
    finally:
        holder.gate.set()
        busy.join(WAIT_S)
    metrics = httpx.get(f"{running.url}/metrics", timeout=WAIT_S).text
    assert 'fabric_frontend_routes_total{kind="node"} 1.0' in metrics
    # The node cache leaves: its entries are forgotten, n1's workers hold nothing through it.
    node_caches.leave("n1")
    assert wait_until(lambda: fleet.index.num_blocks("node-cache-n1") == 0)
    assert fleet.subscriber("node-cache-n1") is None and not fleet.node_caches()
    holder.close()
    assert wait_until(lambda: "agg-a" not in fleet.workers())
    fabric = post(running, {"prompt": PROMPT, "max_tokens": 2})
    assert (fabric["worker"], fabric["route"]) == ("agg-0", "local")
