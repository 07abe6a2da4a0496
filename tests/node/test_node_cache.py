"""The node cache in this process (its server thread, real shared memory, a manual clock so the
test decides when leases end): store and load, the lease state machine, eviction, attach checks,
and the segment's lifetime."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from node_harness import SPEC, ManualClock, node_config, shm_exists
from node_peer import exact, filled_storage, layout

from fabric.errors import (
    FabricError,
    InvalidInput,
    LayoutMismatch,
    StorageError,
    TransferError,
)
from fabric.kvbm import KvGeometry, LayoutKind, SequenceHash, host_storage
from fabric.node import (
    NodeCacheClient,
    NodeCacheService,
    StoreResult,
    attach_node_cache,
    build_node_cache,
    service,
)
from fabric.node.link import NodeLink, fixed_endpoint
from fabric.signal.errors import IncompatiblePeer

Hashes = list[SequenceHash]


def hashes(*values: int) -> Hashes:
    return [SequenceHash(v) for v in values]


def store(client: NodeCacheClient, hs: Hashes) -> StoreResult:
    return client.store(hs, filled_storage(SPEC, list(hs)), list(range(len(hs))))


def load(client: NodeCacheClient, hs: Hashes) -> tuple[int, bool]:
    dst = host_storage(layout(SPEC, len(hs)), pin=False)
    n = client.load(hs, dst, list(range(len(hs))))
    return n, exact(dst, list(hs), n)


def test_store_then_load_byte_exact_and_prefix_only(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    writer, reader = make_client(service, "w"), make_client(service, "r")
    assert store(writer, hashes(11, 12, 13)) == StoreResult(3, 0, 0)
    assert store(writer, hashes(11, 12, 13, 14)) == StoreResult(1, 3, 0)  # held: not copied
    assert load(reader, hashes(11, 12, 13, 14, 15)) == (4, True)
    assert load(reader, hashes(99, 12)) == (0, True)  # a prefix stops at the first miss
    stats = reader.stats()
    assert stats["live_pins"] == 0 and stats["committed_blocks"] == 4
    service.cache.check_invariants()


def test_uncommitted_slots_never_match_and_expire(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    clock: ManualClock,
) -> None:
    service = make_service(lease_s=2.0, clock=clock)
    writer, reader = make_client(service, "w"), make_client(service, "r")
    reserved = writer.reserve(hashes(1, 2, 3))
    assert reserved.lease_id is not None and len(reserved.slot_ids) == 3
    assert reader.lookup(hashes(1, 2, 3)).lease_id is None  # reserved is not matchable
    assert reader.stats()["reserved_slots"] == 3
    clock.now += 2.0
    assert service.cache.sweep() == 1
    stats = reader.stats()
    assert stats["reserved_slots"] == 0 and stats["expired_reservations"] == 1
    # A writer stalled past its lease may still be copying: its slots go to no one yet.
    assert stats["quarantined_slots"] == 3 and stats["num_free"] == 5
    later = writer.reserve(hashes(4, 5, 6, 7, 8, 9))
    assert later.lease_id is not None and len(later.slot_ids) == 5
    service.cache.check_invariants()
    writer.release(later.lease_id)
    with pytest.raises(InvalidInput, match="not live"):
        writer.commit(reserved.lease_id, hashes(1, 2, 3))
    assert reader.lookup(hashes(1)).lease_id is None
    clock.now += 2.0  # one more lease time: the quarantine ends
    service.cache.sweep()
    assert reader.stats()["quarantined_slots"] == 0
    service.cache.check_invariants()


def test_pins_expire_then_blocks_are_evictable_and_renewal_keeps_them(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    clock: ManualClock,
) -> None:
    service = make_service(lease_s=2.0, clock=clock)
    client = make_client(service)
    assert store(client, hashes(*range(1, 9))).num_stored == 8  # the pool is full
    kept = client.lookup(hashes(1, 2))
    dropped = client.lookup(hashes(3, 4))
    assert kept.lease_id is not None and dropped.lease_id is not None
    clock.now += 1.5
    assert client.renew(kept.lease_id).lease_ms == 2000
    clock.now += 1.0  # dropped's deadline passed, kept's not (renewed)
    result = store(client, hashes(*range(101, 107)))  # 6 new: only the 6 unpinned can go
    assert result == StoreResult(6, 0, 0)
    assert client.stats()["expired_pins"] == 1
    assert load(client, hashes(1, 2)) == (2, True)
    assert load(client, hashes(3)) == (0, True)  # its pin expired: it was evicted
    assert client.release(kept.lease_id).num_blocks == 2
    with pytest.raises(InvalidInput, match="not live"):
        client.release(dropped.lease_id)
    service.cache.check_invariants()


def test_a_full_pool_stores_fewer_and_says_so(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    client = make_client(service)
    assert store(client, hashes(*range(1, 7))).num_stored == 6
    pin = client.lookup(hashes(*range(1, 7)))  # 6 of 8 pinned
    assert store(client, hashes(50, 51, 52, 53)) == StoreResult(2, 0, 2)
    assert load(client, hashes(50, 51, 52)) == (2, True)
    assert pin.lease_id is not None
    client.release(pin.lease_id)
    assert store(client, hashes(52, 53)) == StoreResult(2, 0, 0)  # room again: LRU evicted
    assert client.stats()["evictions"] == 2
    service.cache.check_invariants()


def test_abort_returns_slots_and_a_failed_copy_aborts(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    client = make_client(service)
    reserved = client.reserve(hashes(7, 8))
    assert reserved.lease_id is not None
    assert client.release(reserved.lease_id).num_blocks == 2
    wrong = host_storage(KvGeometry(2, 1, 16).layout(LayoutKind.FULLY_CONTIGUOUS, 2, 4), pin=False)
    with pytest.raises(LayoutMismatch):
        client.store(hashes(7, 8), wrong, [0, 1])
    stats = client.stats()
    assert stats["aborted"] == 2 and stats["num_free"] == 8 and stats["registered"] == 0
    with pytest.raises(InvalidInput, match="2 sequence hashes but 1 block ids"):
        client.store(hashes(7, 8), filled_storage(SPEC, [7, 8]), [0])


def test_a_lease_ended_before_commit_is_a_failed_store(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    clock: ManualClock,
) -> None:
    service = make_service(lease_s=2.0, clock=clock)
    client = make_client(service)
    src = filled_storage(SPEC, [5])
    original = client.commit

    def late_commit(lease_id: int, hs: Hashes) -> object:
        clock.now += 5.0  # the writer stalled past its lease
        return original(lease_id, hs)

    client.commit = late_commit  # type: ignore[method-assign]
    with pytest.raises(TransferError, match="nothing was stored"):
        client.store(hashes(5), src, [0])
    assert load(client, hashes(5)) == (0, True)


def test_attach_refuses_another_geometry(
    make_service: Callable[..., NodeCacheService],
) -> None:
    service = make_service()
    compat = service.cache.geometry.compat_hash
    with pytest.raises(IncompatiblePeer, match="compatibility hash"):
        attach_node_cache(
            service.endpoint, identity="x", compat_hash=compat ^ 1, layout=layout(SPEC, 1)
        )
    other = KvGeometry(2, 1, 16).layout(LayoutKind.FULLY_CONTIGUOUS, 1, 4)
    with pytest.raises(LayoutMismatch, match="inner_dim"):
        attach_node_cache(service.endpoint, identity="y", compat_hash=compat, layout=other)


def test_attaching_again_ends_the_old_leases(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    service = make_service()
    first = make_client(service, "w")
    store(first, hashes(1))
    assert first.lookup(hashes(1)).lease_id is not None
    assert first.reserve(hashes(2)).lease_id is not None
    second = make_client(service, "w")  # the same identity: a restarted process
    stats = second.stats()
    assert stats["live_pins"] == 0 and stats["live_reservations"] == 0
    service.cache.check_invariants()


def test_close_unlinks_the_segment_and_clients_keep_their_mapping(
    namespace: str,
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
) -> None:
    service = make_service()
    client = make_client(service)
    store(client, hashes(1))
    assert shm_exists(namespace)
    assert Path("/dev/shm", service.segment).stat().st_size >= 8 * 256
    service.close()
    assert not shm_exists(namespace)
    assert client.storage.tensors[0].numel() > 0  # still mapped, still readable


def test_a_segment_larger_than_dev_shm_is_refused_at_start(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unknown(path: str) -> os.statvfs_result:
        raise OSError(f"no statvfs of {path} here")

    with monkeypatch.context() as patched:
        patched.setattr(service.os, "statvfs", unknown)  # room unknown: built
        build_node_cache(node_config(namespace, lease_s=5.0)).close()
    shm = os.statvfs("/dev/shm")
    block_bytes = node_config(namespace, lease_s=5.0).block_bytes
    too_many = shm.f_bavail * shm.f_frsize // block_bytes + 1
    with pytest.raises(StorageError, match="shared memory"):
        build_node_cache(node_config(namespace, num_blocks=too_many, lease_s=5.0))
    assert not shm_exists(namespace)


def test_a_client_of_a_restarted_service_is_told_to_attach_again_and_its_link_does(
    make_service: Callable[..., NodeCacheService], make_client: Callable[..., NodeCacheClient]
) -> None:
    first = make_service()
    client = make_client(first)
    link = NodeLink(
        fixed_endpoint(first.endpoint),
        identity="linked",
        compat_hash=first.cache.geometry.compat_hash,
        layout=layout(SPEC, 1),
        retry_s=0.0,
    )
    src = filled_storage(SPEC, [1, 2])
    assert link.store(hashes(1, 2), src, [0, 1]) == 2
    endpoint = first.endpoint
    first.close()
    second = make_service(endpoint=endpoint)  # same endpoint, a new (empty) segment
    with pytest.raises(FabricError, match="attach again"):
        client.stats()
    assert second.cache.stats()["refused_unattached"] == 1
    assert link.store(hashes(1, 2), src, [0, 1]) == 0  # refused: a miss, the link detaches
    assert not link.attached
    assert link.store(hashes(1, 2), src, [0, 1]) == 2  # attached again, into the new segment
    assert link.num_attaches == 2
    dst = host_storage(layout(SPEC, 2), pin=False)
    assert link.load(hashes(1, 2), dst, lambda n: list(range(n))) == 2 and exact(dst, [1, 2], 2)
    link.close()


def test_a_load_unpins_one_way_and_one_that_outlasts_its_pin_is_not_trusted(
    make_service: Callable[..., NodeCacheService],
    make_client: Callable[..., NodeCacheClient],
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    from fabric.node import client as client_module

    service = make_service(lease_s=2.0, clock=clock)
    client = make_client(service, optimistic=False)  # full hits through lookup + pin
    store(client, hashes(1, 2))
    for _ in range(5):  # the unpins go one-way; their answers never pile up
        assert load(client, hashes(1, 2)) == (2, True)
    assert client.stats()["live_pins"] == 0 and client.stats()["unpinned"] == 5
    assert client._signal.num_pending_pushes <= 1

    now = [100.0]  # this process's clock, moved by the copy below
    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    def slow_allocate(num_blocks: int) -> list[int]:
        clock.now += 3.0  # the copy outlasts the 2 s pin, on both clocks
        now[0] += 3.0
        return list(range(num_blocks))

    dst = host_storage(layout(SPEC, 2), pin=False)
    with pytest.raises(TransferError, match="treat the blocks as not loaded"):
        client.load_into(hashes(1, 2), dst, slow_allocate)
    assert client.stats()["expired_pins"] == 1
