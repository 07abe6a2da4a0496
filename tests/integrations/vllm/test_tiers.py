"""The connector's host and local disk tiers without vLLM: the scheduler's ledger (pins, saves,
write-downs, reports) and the worker's mover (copies between vLLM-shaped pages and the tiers).

vLLM-CPU's page layout is built here with plain tensors of its shape, per layer
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``; bytes are checked against
``KvPages.gather``, the reference gather.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from page_fixtures import BS, GEOMETRY, VLLM_BLOCKS, vllm_pages

from fabric.errors import ConfigError
from fabric.integrations.vllm.config import ConnectorConfig
from fabric.integrations.vllm.jobs import JobReport, TierWrite
from fabric.integrations.vllm.mover import TierMover
from fabric.integrations.vllm.pages import KvPages
from fabric.integrations.vllm.tiers import EventBuffer, TierLedger
from fabric.kvbm import (
    RecordingSink,
    SequenceHash,
    SharedBlockStore,
    Tier,
    hash_token_blocks,
    load_kvbm_config,
)


def hashes_of(n: int, start: int = 0) -> list[SequenceHash]:
    tokens = list(range(100 + start * BS, 100 + (start + n) * BS))
    return hash_token_blocks(tokens, BS, seed=GEOMETRY.hash_seed).sequence_hashes


def make_ledger(host: int = 8, disk: int = 0, *, admit_after: int = 1, shared: bool = False):
    config = load_kvbm_config(
        block_size=BS, cpu_cache_blocks=host, disk_cache_blocks=disk, disk_admit_after=admit_after
    )
    events = RecordingSink()
    ledger = TierLedger.build(config, GEOMETRY.block_bytes, events, shared=shared)
    assert ledger is not None
    return ledger, events


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    return tmp_path


# -- the ledger -----------------------------------------------------------------------------------


def test_a_save_registers_only_what_the_host_lacks_and_a_match_pins_it() -> None:
    ledger, events = make_ledger(host=4)
    hashes = hashes_of(3)
    save, writes = ledger.plan_save([7, 8, 9], hashes, None)
    assert save is not None and save.block_ids == (7, 8, 9) and len(save.host_ids) == 3
    assert writes == []  # no disk tier, no G4
    again, _ = ledger.plan_save([1, 2, 3], hashes, None)
    assert again is None  # all three are in G2 already
    hit = ledger.match([*hashes, hashes_of(1, 9)[0]])
    assert hit.num_blocks == 3 and list(hit.by_tier) == [Tier.HOST]
    # Pinned: a save that needs every host block cannot evict them.
    assert ledger.plan_save([1, 2, 3, 4], hashes_of(4, 20), None) == (None, [])
    ledger.release_hit(hit)
    save, _ = ledger.plan_save([1, 2, 3, 4], hashes_of(4, 20), None)
    assert save is not None and len(save.block_ids) == 4  # evicted the old three
    stored = [e for e in events.events if type(e).__name__ == "BlockStored"]
    assert stored and all(e.tier is Tier.HOST for e in stored)


def test_loads_take_the_prefix_vllm_agreed_to_and_release_the_rest() -> None:
    ledger, _ = make_ledger(host=4, disk=4)
    hashes = hashes_of(4)
    ledger.plan_save([0, 1], hashes[:2], None)
    host = ledger.pool(Tier.HOST)
    hit = ledger.match(hashes)
    assert hit.num_blocks == 2
    (load,) = ledger.plan_loads("r", hit, [10, 11, 12], 1)  # vLLM took one block only
    assert load.tier is Tier.HOST and load.block_ids == (10,) and len(load.src_ids) == 1
    assert host.stats().num_in_use == 1  # the loaded block stays pinned until reported
    ledger.report(JobReport({load.job_id: 1}))
    assert host.stats().num_in_use == 0 and ledger.num_jobs == 0


def test_a_write_down_registers_on_disk_only_when_reported_done() -> None:
    ledger, _ = make_ledger(host=4, disk=4, admit_after=2)
    hashes = hashes_of(3)
    ledger.match(hashes[:2])  # first sighting of two hashes (a lookup that missed)
    ledger.release_hit(ledger.match(hashes[:2]))  # second: now admitted to disk
    save, writes = ledger.plan_save([0, 1, 2], hashes, None)
    assert save is not None
    (write,) = writes
    assert write.src is Tier.HOST and write.dst is Tier.DISK and len(write.dst_ids) == 2
    disk = ledger.pool(Tier.DISK)
    assert not disk.contains(hashes[0])  # not before the bytes landed
    ledger.report(JobReport({write.job_id: 1}))
    assert disk.contains(hashes[0]) and disk.contains(hashes[1]) and not disk.contains(hashes[2])
    assert ledger.pool(Tier.HOST).stats().num_in_use == 0


def test_a_failed_write_down_registers_nothing_and_leaks_nothing() -> None:
    ledger, _ = make_ledger(host=4, disk=4)
    ledger.match(hashes_of(2))
    _, (write,) = ledger.plan_save([0, 1], hashes_of(2), None)
    ledger.report(JobReport(failed={write.job_id}))
    disk = ledger.pool(Tier.DISK)
    assert not disk.contains(hashes_of(2)[0])
    assert disk.stats().num_free == 4 and ledger.pool(Tier.HOST).stats().num_in_use == 0


def test_tensor_parallel_ranks_must_all_report_a_job() -> None:
    config = load_kvbm_config(block_size=BS, cpu_cache_blocks=4, disk_cache_blocks=4)
    ledger = TierLedger.build(
        config, GEOMETRY.block_bytes, RecordingSink(), shared=False, world_size=2
    )
    assert ledger is not None
    ledger.match(hashes_of(1))
    ledger.match(hashes_of(1))
    _, (write,) = ledger.plan_save([0], hashes_of(1), None)
    ledger.report(JobReport({write.job_id: 1}))
    assert not ledger.pool(Tier.DISK).contains(hashes_of(1)[0])  # one rank of two
    ledger.report(JobReport({write.job_id: 1}))
    assert ledger.pool(Tier.DISK).contains(hashes_of(1)[0])


def test_a_ledger_without_a_host_tier_is_none_and_disk_alone_is_refused() -> None:
    config = load_kvbm_config(block_size=BS)
    assert TierLedger.build(config, GEOMETRY.block_bytes, RecordingSink(), shared=False) is None
    disk_only = load_kvbm_config(block_size=BS, disk_cache_blocks=4)
    with pytest.raises(Exception, match="host tier"):
        TierLedger.build(disk_only, GEOMETRY.block_bytes, RecordingSink(), shared=False)


# -- the mover with the ledger --------------------------------------------------------------------


@pytest.fixture
def mover_pair(disk_dir: Path) -> Iterator[tuple[TierLedger, TierMover, KvPages, SharedBlockStore]]:
    config = load_kvbm_config(
        block_size=BS,
        cpu_cache_blocks=8,
        disk_cache_blocks=8,
        disk_cache_dir=disk_dir,
        disk_admit_after=1,
    )
    store = SharedBlockStore(
        disk_dir / "g4",
        compat_hash=GEOMETRY.compat_hash,
        block_bytes=GEOMETRY.block_bytes,
        capacity_blocks=64,
    )
    ledger = TierLedger.build(config, GEOMETRY.block_bytes, RecordingSink(), shared=True)
    pages = vllm_pages(seed=1)
    mover = TierMover.build(config, pages.layout_spec(), store)
    assert ledger is not None and mover is not None
    mover.attach(pages.storage())
    yield ledger, mover, pages, store
    mover.close()
    store.close()


def _drain(ledger: TierLedger, mover: TierMover) -> None:
    for _ in range(500):
        ledger.report(mover.report())
        if not ledger.num_jobs and not mover.num_writes:
            return
        time.sleep(0.01)
    raise AssertionError("jobs did not finish")


def test_blocks_saved_from_pages_come_back_byte_exact_from_host_disk_and_g4(mover_pair) -> None:
    ledger, mover, pages, store = mover_pair
    hashes = hashes_of(3)
    ledger.match(hashes)
    expected = pages.gather([2, 5, 6])
    save, writes = ledger.plan_save([2, 5, 6], hashes, None)
    assert save is not None and {w.dst for w in writes} == {Tier.DISK, Tier.SHARED}
    mover.save(save)
    for write in writes:
        mover.write(write)
    _drain(ledger, mover)
    # G4 files equal the pages' own bytes (the format a pages-only save writes).
    staged = np.empty((3, GEOMETRY.block_bytes), dtype=np.uint8)
    assert store.read_many(hashes, staged) == 3
    assert np.array_equal(staged, expected)
    # Host, then disk (host evicted by pressure): each loads back into other vLLM blocks.
    for tier in (Tier.HOST, Tier.DISK):
        hit = ledger.match(hashes)
        if tier is Tier.DISK:
            ledger.release_hit(hit)
            ledger.pool(Tier.HOST).allocate(8)  # evict G2: only the disk copies are left
            hit = ledger.match(hashes)
        assert list(hit.by_tier) == [tier]
        loads = ledger.plan_loads("r", hit, [10, 11, 12], 3)
        for load in loads:
            assert mover.load(load)
        assert np.array_equal(pages.gather([10, 11, 12]), expected), tier
        pages.scatter([10, 11, 12], np.zeros_like(expected))
        ledger.report(mover.report())


def test_a_failed_load_is_reported_failed_and_unpinned(mover_pair) -> None:
    ledger, mover, _, _ = mover_pair
    hashes = hashes_of(2)
    save, writes = ledger.plan_save([0, 1], hashes, None)
    assert save is not None
    mover.save(save)
    ledger.report(JobReport(failed={w.job_id for w in writes}))  # not written down: unpinned
    (load,) = ledger.plan_loads("r", ledger.match(hashes), [VLLM_BLOCKS + 5, 3], 2)  # bad id
    assert not mover.load(load)
    report = mover.report()
    assert report.failed == {load.job_id}
    ledger.report(report)
    assert ledger.pool(Tier.HOST).stats().num_in_use == 0


def test_a_write_to_g4_without_a_store_fails_cleanly(mover_pair) -> None:
    _, mover, _, _ = mover_pair
    lone = TierMover({Tier.HOST: mover.storage(Tier.HOST)}, None)
    lone.write(TierWrite(99, Tier.HOST, (0,), Tier.SHARED, (1,)))
    assert lone.report().failed == {99}
    lone._copier.stop(1.0)


# -- events and settings --------------------------------------------------------------------------


def test_the_tiers_publish_stored_and_removed_per_tier() -> None:
    ledger, events = make_ledger(host=2, disk=4)
    first = hashes_of(2)
    ledger.match(first)
    _, (write,) = ledger.plan_save([0, 1], first, None)
    ledger.report(JobReport({write.job_id: 1}))
    ledger.plan_save([2, 3], hashes_of(2, 5), None)  # evicts the first two from G2
    kinds = [(type(e).__name__, e.tier, len(e.sequence_hashes)) for e in events.events]
    assert kinds == [
        ("BlockStored", Tier.HOST, 2),
        ("BlockStored", Tier.DISK, 2),
        ("BlockRemoved", Tier.HOST, 2),
        ("BlockStored", Tier.HOST, 2),
    ]


def test_stored_events_carry_each_block_s_tokens_on_every_tier() -> None:
    """Routers that index vLLM's stream by token ids (it has no room for our hashes) can place
    G2 / G3 blocks: each ``BlockStored`` carries exactly its blocks' tokens, also when a save
    stores only the blocks the host lacks."""
    ledger, events = make_ledger(host=8, disk=8)
    tokens = list(range(100, 100 + 4 * BS))  # the tokens hashes_of(4) hashes
    hashes = hashes_of(4)
    ledger.match(hashes)
    ledger.plan_save([0], hashes[:1], None, tokens=tokens[:BS])
    _, writes = ledger.plan_save([0, 1, 2, 3], hashes, None, tokens=tokens)
    ledger.report(JobReport({w.job_id: 1 for w in writes}))
    stored = [(e.tier, e.sequence_hashes, e.token_ids) for e in events.events]
    assert stored == [
        (Tier.HOST, (hashes[0],), tuple(tokens[:BS])),
        (Tier.HOST, tuple(hashes[1:]), tuple(tokens[BS:])),  # only what the host lacked
        (Tier.DISK, tuple(hashes), tuple(tokens)),
    ]


def test_the_event_buffer_hands_each_event_over_once() -> None:
    buffer = EventBuffer()
    config = load_kvbm_config(block_size=BS, cpu_cache_blocks=4)
    ledger = TierLedger.build(config, GEOMETRY.block_bytes, buffer, shared=False)
    assert ledger is not None
    ledger.plan_save([0], hashes_of(1), None)
    assert len(buffer.take()) == 1
    assert buffer.take() == []


def test_tier_keys_reach_the_block_manager_settings_and_bad_ones_are_refused() -> None:
    config = ConnectorConfig.from_extra(
        {"cpu_cache_blocks": 64, "eviction": "lru", "disk_path": "/tmp/x"},
        kv_role="kv_both",
        engine_id=None,
    )
    kvbm = config.kvbm_config(block_size=32)
    assert kvbm.cpu_cache_blocks == 64 and kvbm.eviction.value == "lru"
    assert kvbm.block_size == 32
    with pytest.raises(ConfigError, match=r"\['cpu_cache_blocks'\].*CPU_CACHE_BLOCKS"):
        ConnectorConfig.from_extra({"cpu_cache_blocks": -1}, kv_role=None, engine_id=None)
    with pytest.raises(ConfigError, match="fixed port"):
        ConnectorConfig.from_extra(
            {"events_endpoint": "tcp://127.0.0.1:0"}, kv_role=None, engine_id=None
        )
    with pytest.raises(ConfigError, match="cpu_cache_gb"):  # the error lists the tier keys too
        ConnectorConfig.from_extra({"cpu_cache_gbs": 1}, kv_role=None, engine_id=None)


def test_a_pd_hold_takes_scratch_host_blocks_until_reported() -> None:
    ledger, events = make_ledger(host=4)
    held = ledger.plan_hold(3)
    assert held is not None
    job_id, host_ids = held
    assert len(host_ids) == 3 and ledger.pool(Tier.HOST).stats().num_in_use == 3
    assert ledger.plan_hold(2) is None  # G2 has one block left: the hold stays in vLLM's
    assert events.events == []  # scratch blocks are never registered, so never published
    assert ledger.is_pending(job_id)  # the scheduler keeps vLLM stepping (has_host_holds)
    ledger.report(JobReport({job_id: 1}))
    assert ledger.pool(Tier.HOST).stats().num_free == 4 and ledger.num_jobs == 0
    assert not ledger.is_pending(job_id)


def test_a_full_host_tier_keeps_the_blocks_of_the_run_it_saves() -> None:
    ledger, _ = make_ledger(host=4)
    hashes = hashes_of(4)
    ledger.plan_save([0, 1, 2], hashes[:3], None)
    save, _ = ledger.plan_save([0, 1, 2, 3], hashes, None)  # one block free, three held already
    assert save is not None and save.block_ids == (3,)  # only the missing block is copied
    host = ledger.pool(Tier.HOST)
    assert all(host.contains(h) for h in hashes)
    assert ledger.match(hashes).num_blocks == 4
