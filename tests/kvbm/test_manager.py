"""KvBlockManager: tier moves that verify bytes, cross-tier matching, dedup, filter, failures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from fabric.errors import ConfigError, InvalidInput, StorageError, TransferError
from fabric.kvbm import SequenceBlocks, load_kvbm_config
from fabric.kvbm import manager as manager_module
from fabric.kvbm.build import build_kvbm
from fabric.kvbm.core.events import BlockStored, NullSink, RecordingSink
from fabric.kvbm.core.layout import KvGeometry, LayoutKind
from fabric.kvbm.core.types import Tier
from fabric.kvbm.manager import KvBlockManager
from fabric.kvbm.stream import publisher_for
from fabric.kvbm.stream.publisher import ZmqEventPublisher
from fabric.kvbm.stream.wire import decode_event_batch
from fabric.kvbm.tiers.storage import TensorStorage

GEOMETRY = KvGeometry(num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float32)
BS = 4


@pytest.fixture(params=list(LayoutKind), ids=lambda k: k.value)
def kvbm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KvBlockManager]:
    config = load_kvbm_config(
        block_size=BS,
        device_blocks=8,
        cpu_cache_blocks=8,
        disk_cache_blocks=16,
        disk_cache_dir=tmp_path,
        layout=request.param,
        disk_admit_after=1,
    )
    manager = build_kvbm(config, GEOMETRY, events=RecordingSink())
    yield manager
    manager.close()


def fill_device(kvbm: KvBlockManager, tokens: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Run a fake prefill: allocate, write random KV into every chunk, register; release."""
    hashed = kvbm.hash_tokens(tokens)
    kvbm.release_match(kvbm.match(hashed.sequence_hashes))  # a request looks up first
    blocks = kvbm.allocate(hashed.num_blocks)
    assert blocks is not None
    storage = kvbm.storage(Tier.DEVICE)
    assert isinstance(storage, TensorStorage)
    contents = []
    for block_id in blocks:
        data = torch.randn(GEOMETRY.num_layers, 2, BS, 16)
        for layer in range(GEOMETRY.num_layers):
            for outer in range(2):
                storage.block_view(block_id, layer, outer).copy_(data[layer, outer])
        contents.append(data)
    blocks.advance(blocks.capacity)
    imm = kvbm.register(blocks, hashed.sequence_hashes, token_ids=tokens)
    kvbm.release(imm)
    return hashed.sequence_hashes, contents


def read_device(kvbm: KvBlockManager, block_ids: list[int]) -> list[torch.Tensor]:
    storage = kvbm.storage(Tier.DEVICE)
    assert isinstance(storage, TensorStorage)
    out = []
    for block_id in block_ids:
        data = torch.empty(GEOMETRY.num_layers, 2, BS, 16)
        for layer in range(GEOMETRY.num_layers):
            for outer in range(2):
                data[layer, outer] = storage.block_view(block_id, layer, outer)
        out.append(data)
    return out


def evict_device(kvbm: KvBlockManager) -> None:
    """Allocate the whole device pool once, evicting every cached block."""
    pool = kvbm.pool(Tier.DEVICE)
    blocks = pool.allocate(pool.num_blocks)
    assert blocks is not None
    pool.release(blocks)
    assert pool.stats().num_cached == 0


def test_offload_to_host_and_disk_then_onboard_verifies_bytes(kvbm: KvBlockManager) -> None:
    torch.manual_seed(0)
    hashes, contents = fill_device(kvbm, list(range(3 * BS)))
    with kvbm.pool(Tier.DEVICE).match(hashes) as on_device:
        assert kvbm.offload(on_device, Tier.HOST) == 3
        assert kvbm.offload(on_device, Tier.HOST) == 0  # dedup: the host holds them already
    with kvbm.pool(Tier.HOST).match(hashes) as on_host:
        assert kvbm.offload(on_host, Tier.DISK) == 3
    evict_device(kvbm)

    onboarded = kvbm.match_and_onboard(hashes)  # host hit
    assert onboarded.tier is Tier.DEVICE and len(onboarded) == 3
    for got, want in zip(read_device(kvbm, onboarded.block_ids), contents, strict=True):
        assert torch.equal(got, want)
    kvbm.release(onboarded)

    evict_device(kvbm)
    host = kvbm.pool(Tier.HOST)
    host_blocks = host.allocate(host.num_blocks)  # evict the host copies too
    assert host_blocks is not None
    host.release(host_blocks)
    found = kvbm.match(hashes)
    assert found.count(Tier.DISK) == 3 and found.count(Tier.HOST) == 0
    kvbm.release_match(found)

    onboarded = kvbm.match_and_onboard(hashes)  # disk hit
    for got, want in zip(read_device(kvbm, onboarded.block_ids), contents, strict=True):
        assert torch.equal(got, want)
    kvbm.release(onboarded)
    for tier in kvbm.tiers:
        kvbm.pool(tier).check_invariants()


def test_match_splits_prefix_across_tiers(kvbm: KvBlockManager) -> None:
    hashes, _ = fill_device(kvbm, list(range(4 * BS)))
    with kvbm.pool(Tier.DEVICE).match(hashes) as on_device:
        kvbm.offload(on_device, Tier.HOST)
    # Drop the last two blocks from the device only: device holds 0-1, host 0-3.
    device = kvbm.pool(Tier.DEVICE)
    keep = device.match(hashes[:2])
    evict_device_but = device.allocate(device.num_free)
    assert evict_device_but is not None
    found = kvbm.match(hashes)
    assert (found.count(Tier.DEVICE), found.count(Tier.HOST)) == (2, 2)
    kvbm.release_match(found)
    device.release(evict_device_but)
    device.release(keep)
    prefix = kvbm.onboard_prefix(hashes)
    onboarded = prefix.blocks
    assert onboarded.sequence_hashes == hashes
    assert prefix.sources == ((Tier.DEVICE, 2), (Tier.HOST, 2))  # what a KV trace shows
    kvbm.release(onboarded)
    for tier in kvbm.tiers:
        kvbm.pool(tier).check_invariants()


def test_disk_offload_respects_the_frequency_filter(tmp_path: Path) -> None:
    config = load_kvbm_config(
        block_size=BS,
        device_blocks=8,
        cpu_cache_blocks=8,
        disk_cache_blocks=8,
        disk_cache_dir=tmp_path,
        disk_admit_after=3,
    )
    kvbm = build_kvbm(config, GEOMETRY)
    try:
        hashes, _ = fill_device(kvbm, list(range(2 * BS)))  # one request: each block used once
        assert kvbm.disk_filter.count(hashes[1]) == 1  # registering is not a second use
        kvbm.release_match(kvbm.match(hashes[:1]))  # first block used twice more
        kvbm.release_match(kvbm.match(hashes[:1]))
        with kvbm.pool(Tier.DEVICE).match(hashes) as on_device:
            kvbm.offload(on_device, Tier.HOST)
        with kvbm.pool(Tier.HOST).match(hashes) as on_host:
            assert kvbm.offload(on_host, Tier.DISK) == 1
        assert kvbm.pool(Tier.DISK).contains(hashes[0])
        assert not kvbm.pool(Tier.DISK).contains(hashes[1])
        for tier in kvbm.tiers:
            kvbm.pool(tier).check_invariants()
    finally:
        kvbm.close()


def test_onboard_with_full_device_is_cut_not_leaked(kvbm: KvBlockManager) -> None:
    hashes, _ = fill_device(kvbm, list(range(3 * BS)))
    with kvbm.pool(Tier.DEVICE).match(hashes) as on_device:
        kvbm.offload(on_device, Tier.HOST)
    evict_device(kvbm)
    device = kvbm.pool(Tier.DEVICE)
    hog = device.allocate(device.num_blocks)  # nothing free on the device
    assert hog is not None
    onboarded = kvbm.match_and_onboard(hashes)
    assert len(onboarded) == 0
    kvbm.release(onboarded)
    device.release(hog)
    for tier in kvbm.tiers:
        kvbm.pool(tier).check_invariants()
        assert kvbm.pool(tier).stats().num_in_use == 0


def test_failed_copy_returns_blocks_and_raises(
    kvbm: KvBlockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes, _ = fill_device(kvbm, list(range(2 * BS)))

    def broken(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(manager_module, "copy_blocks", broken)
    with kvbm.pool(Tier.DEVICE).match(hashes) as on_device, pytest.raises(TransferError):
        kvbm.offload(on_device, Tier.HOST)
    for tier in kvbm.tiers:
        kvbm.pool(tier).check_invariants()
        assert kvbm.pool(tier).stats().num_in_use == 0
    assert not kvbm.pool(Tier.HOST).contains(hashes[0])


def test_failed_onboard_releases_every_tier_it_matched(
    kvbm: KvBlockManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes, _ = fill_device(kvbm, list(range(4 * BS)))
    with kvbm.pool().match_present(hashes) as on_device:
        kvbm.offload(on_device, Tier.HOST)
    evict_device(kvbm)

    def broken(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(manager_module, "copy_blocks", broken)
    with pytest.raises(TransferError):
        kvbm.match_and_onboard(hashes)  # HOST -> DEVICE fails
    for tier in kvbm.tiers:
        kvbm.pool(tier).check_invariants()
        assert kvbm.pool(tier).stats().num_in_use == 0, tier  # the host handle too


def test_moves_are_validated_and_missing_tiers_named(tmp_path: Path) -> None:
    kvbm = build_kvbm(load_kvbm_config(block_size=BS, device_blocks=4), GEOMETRY)
    try:
        assert kvbm.tiers == (Tier.DEVICE,)
        hashes, _ = fill_device(kvbm, list(range(BS)))
        with kvbm.pool().match(hashes) as on_device:
            with pytest.raises(ConfigError, match="HOST tier is not configured"):
                kvbm.offload(on_device, Tier.HOST)
            with pytest.raises(InvalidInput, match="no move from DEVICE to DEVICE"):
                kvbm.move(on_device, Tier.DEVICE)
    finally:
        kvbm.close()


def test_salt_changes_hashes_and_events_carry_tiers(kvbm: KvBlockManager) -> None:
    other = build_kvbm(
        load_kvbm_config(block_size=BS, device_blocks=4),
        KvGeometry(num_layers=3, num_kv_heads=2, head_size=8, dtype=torch.float32),
    )
    try:
        tokens = list(range(BS))
        assert kvbm.hash_tokens(tokens).sequence_hashes != other.hash_tokens(tokens).sequence_hashes
    finally:
        other.close()
    hashes, _ = fill_device(kvbm, list(range(2 * BS)))
    with kvbm.pool().match(hashes) as on_device:
        kvbm.offload(on_device, Tier.HOST)
    sink = kvbm.events
    assert isinstance(sink, RecordingSink)
    stored = [(e.tier, e.sequence_hashes) for e in sink.events if isinstance(e, BlockStored)]
    assert stored == [(Tier.DEVICE, tuple(hashes)), (Tier.HOST, tuple(hashes))]


def test_metrics_count_moves_and_read_pools(kvbm: KvBlockManager) -> None:
    hashes, _ = fill_device(kvbm, list(range(2 * BS)))
    with kvbm.pool().match(hashes) as on_device:
        kvbm.offload(on_device, Tier.HOST)
    text = kvbm.metrics.render().decode()
    assert 'fabric_kvbm_offloads_total{source="G1",target="G2"} 2.0' in text
    assert 'fabric_kvbm_hits_total{tier="G1"} 2.0' in text  # the offload's own match
    assert 'fabric_kvbm_registered_total{tier="G2"} 2.0' in text
    assert 'fabric_kvbm_blocks_cached{tier="G2"} 2.0' in text


def test_events_endpoint_in_config_publishes_on_zmq(tmp_path: Path) -> None:
    """The builder of a manager injects the publisher that ``publisher_for`` makes from the
    config; without one the manager publishes nowhere."""
    assert isinstance(build_kvbm(load_kvbm_config(device_blocks=4), GEOMETRY).events, NullSink)
    assert isinstance(publisher_for(load_kvbm_config()), NullSink)
    config = load_kvbm_config(
        block_size=BS,
        device_blocks=4,
        events_endpoint="tcp://127.0.0.1:0",
        events_replay_endpoint="tcp://127.0.0.1:0",
    )
    kvbm = build_kvbm(config, GEOMETRY, events=publisher_for(config))
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        publisher = kvbm.events
        assert isinstance(publisher, ZmqEventPublisher) and publisher.replay_endpoint
        hashes, _ = fill_device(kvbm, list(range(2 * BS)))
        dealer.connect(publisher.replay_endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        assert dealer.poll(5000), "no replay within 5 s"
        _, seq, payload = dealer.recv_multipart()
        assert int.from_bytes(seq, "big") == 0
        (event,) = decode_event_batch(payload).events
        assert isinstance(event, BlockStored) and list(event.sequence_hashes) == hashes
        assert event.token_ids == tuple(range(2 * BS))
    finally:
        dealer.close(linger=0)
        ctx.term()
        kvbm.close()


def test_missing_disk_directory_is_a_clear_error(tmp_path: Path) -> None:
    config = load_kvbm_config(
        block_size=BS, device_blocks=4, disk_cache_blocks=4, disk_cache_dir=tmp_path / "nope"
    )
    with pytest.raises(StorageError, match="does not exist"):
        build_kvbm(config, GEOMETRY)


def test_sequence_keeps_where_its_cached_blocks_came_from(kvbm: KvBlockManager) -> None:
    tokens = list(range(4 * BS))
    hashes, _ = fill_device(kvbm, tokens)
    with kvbm.pool(Tier.DEVICE).match(hashes) as on_device:
        kvbm.offload(on_device, Tier.HOST)
    device = kvbm.pool(Tier.DEVICE)
    keep = device.match(hashes[:1])
    evict = device.allocate(device.num_free)  # device keeps block 0, the host holds all four
    assert evict is not None
    device.release(evict)
    device.release(keep)
    with SequenceBlocks.open(kvbm, [*tokens, 7]) as seq:
        assert seq.cached_sources == ((Tier.DEVICE, 1), (Tier.HOST, 3))
    # The whole block-aligned prompt cached: its last block is recomputed, not counted as cached.
    with SequenceBlocks.open(kvbm, tokens) as seq:
        assert seq.num_cached_tokens == 3 * BS
        assert seq.cached_sources == ((Tier.DEVICE, 3),)
