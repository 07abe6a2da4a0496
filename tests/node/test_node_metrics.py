"""The node cache's metrics (``fabric.node.metrics``) over a real service in this process (its
server thread, real shared memory, a manual clock): each one moves when the cache does what it
counts: stores, loads with their hits and misses, evictions, live and expired reservations and
pins, aborted stores, attached clients; and the table names only keys ``stats()`` has."""

from __future__ import annotations

from collections.abc import Callable

from node_harness import NUM_BLOCKS, ManualClock
from test_node_cache import hashes, load, store

from fabric.frontend.dashboard_cluster import Samples
from fabric.node import NodeCacheClient, NodeCacheService
from fabric.node.metrics import METRICS, PREFIX, node_cache_registry


def scrape(service: NodeCacheService) -> Callable[[str], float]:
    samples = Samples.of(node_cache_registry(service.cache))
    return lambda name: samples.value(PREFIX + name)


def test_every_metric_is_exported_from_a_stats_key(
    make_service: Callable[..., NodeCacheService],
) -> None:
    service = make_service()
    stats = service.cache.stats()
    samples = Samples.of(node_cache_registry(service.cache))
    for name, kind, key, _ in METRICS:
        assert key in stats, key
        exported = PREFIX + name + ("_total" if kind.value == "counter" else "")
        assert samples.has(exported), exported
    assert scrape(service)("blocks_capacity") == NUM_BLOCKS


def test_stores_loads_hits_misses_and_occupancy_move(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    writer, reader = make_client(service, "w"), make_client(service, "r")
    m = scrape(service)
    assert m("attached_clients") == 2
    assert (m("stores_total"), m("blocks_cached"), m("blocks_in_use")) == (0, 0, 0)
    store(writer, hashes(1, 2, 3))
    m = scrape(service)
    assert (m("stores_total"), m("stored_blocks_total"), m("blocks_cached")) == (1, 3, 3)
    assert load(reader, hashes(1, 2, 3, 4)) == (3, True)
    m = scrape(service)
    assert (m("loads_total"), m("hits_total"), m("misses_total")) == (1, 3, 1)
    pinned = reader.lookup(hashes(1, 2))
    assert pinned.lease_id is not None
    m = scrape(service)
    assert (m("live_pins"), m("pinned_blocks"), m("blocks_in_use")) == (1, 2, 2)
    assert m("blocks_cached") == 1
    reader.release(pinned.lease_id)
    m = scrape(service)
    assert (m("live_pins"), m("pinned_blocks"), m("blocks_in_use")) == (0, 0, 0)
    assert load(reader, hashes(9)) == (0, True)  # a miss grants no pin
    m = scrape(service)
    assert (m("loads_total"), m("misses_total")) == (2, 2)


def test_evictions_and_aborted_stores_move(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    client = make_client(service)
    store(client, hashes(*range(1, NUM_BLOCKS + 1)))
    assert scrape(service)("evictions_total") == 0
    store(client, hashes(101, 102))
    assert scrape(service)("evictions_total") == 2
    reserved = client.reserve(hashes(201, 202))
    assert reserved.lease_id is not None
    m = scrape(service)
    assert (m("live_reservations"), m("reserved_slots")) == (1, 2)
    client.release(reserved.lease_id)
    m = scrape(service)
    assert (m("live_reservations"), m("reserved_slots"), m("aborted_stores_total")) == (0, 0, 1)


def test_leases_that_expire_are_counted_as_reclaimed(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    clock: ManualClock,
) -> None:
    service = make_service(lease_s=2.0, clock=clock)
    client = make_client(service)
    store(client, hashes(1, 2))
    assert client.reserve(hashes(5, 6, 7)).lease_id is not None
    assert client.lookup(hashes(1, 2)).lease_id is not None
    m = scrape(service)
    assert (m("live_reservations"), m("live_pins")) == (1, 1)
    clock.now += 2.0
    assert service.cache.sweep() == 2
    m = scrape(service)
    assert (m("live_reservations"), m("live_pins")) == (0, 0)
    assert (m("expired_reservations_total"), m("expired_pins_total")) == (1, 1)
    assert m("quarantined_slots") == 3 and m("blocks_in_use") == 3  # the writer may still copy
    clock.now += 2.0
    service.cache.sweep()
    m = scrape(service)
    assert (m("quarantined_slots"), m("blocks_in_use")) == (0, 0)
