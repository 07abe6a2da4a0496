"""The G4 shared store inside the KvBlockManager and the offload manager: two managers on one
directory share prefixes byte for byte, restarts keep them, corruption cuts the prefix, and the
async offload path writes every block once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from test_manager import BS, GEOMETRY, evict_device, fill_device, read_device

from fabric.errors import ConfigError
from fabric.kvbm import OffloadMode, load_kvbm_config
from fabric.kvbm.build import build_kvbm
from fabric.kvbm.core.events import RecordingSink
from fabric.kvbm.core.layout import LayoutKind
from fabric.kvbm.core.types import Tier
from fabric.kvbm.manager import KvBlockManager
from fabric.kvbm.offload.manager import MoveState, build_offload_manager
from fabric.kvbm.shared.store import SharedBlockStore

Make = Callable[..., KvBlockManager]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    built: list[KvBlockManager] = []

    def build(**overrides: object) -> KvBlockManager:
        settings: dict[str, object] = {
            "block_size": BS,
            "device_blocks": 8,
            "shared_disk_dir": tmp_path / "shared",
            "shared_disk_blocks": 64,
        }
        settings.update(overrides)
        manager = build_kvbm(load_kvbm_config(**settings), GEOMETRY, events=RecordingSink())
        built.append(manager)
        return manager

    yield build
    for manager in built:
        manager.close()


def onboarded(kvbm: KvBlockManager, hashes: list[int]) -> tuple[int, list[torch.Tensor]]:
    handle = kvbm.match_and_onboard(hashes)
    try:
        return len(handle), read_device(kvbm, list(handle.block_ids))
    finally:
        kvbm.release(handle)


def test_a_second_instance_onboards_the_first_ones_blocks(make: Make) -> None:
    a, b = make(), make(layout=LayoutKind.LAYER_SEPARATE)  # layouts may differ, bytes may not
    assert a.tiers == (Tier.DEVICE, Tier.SHARED) and a.compat_hash == b.compat_hash
    hashes, contents = fill_device(a, list(range(6 * BS)))
    with a.pool().match_present(hashes) as handle:
        assert a.offload(handle, Tier.SHARED) == 6
        assert a.offload(handle, Tier.SHARED) == 0  # dedup by hash
    found = b.match(hashes)
    assert found.count(Tier.SHARED) == 6 and found.count(Tier.DEVICE) == 0
    b.release_match(found)
    num, data = onboarded(b, hashes)
    assert num == 6
    for got, want in zip(data, contents, strict=True):
        assert torch.equal(got, want)
    onboards = b.metrics.registry.get_sample_value(
        "fabric_kvbm_onboards_total", {"source": "G4", "target": "G1"}
    )
    assert onboards == 6
    sample = b.metrics.registry.get_sample_value
    assert sample("fabric_kvbm_shared_hits_total") == 6
    assert sample("fabric_kvbm_shared_adopted_total") == 6  # a wrote them, b adopted them
    assert sample("fabric_kvbm_shared_blocks") == 6
    assert a.metrics.registry.get_sample_value("fabric_kvbm_shared_written_total") == 6
    # now on b's device: a second match is a device hit, nothing read again
    assert b.match(hashes).count(Tier.DEVICE) == 6


def test_restart_keeps_the_store_and_incompatible_managers_never_match(make: Make) -> None:
    first = make()
    hashes, contents = fill_device(first, list(range(4 * BS)))
    with first.pool().match_present(hashes) as handle:
        first.offload(handle, Tier.SHARED)
    first.close()
    restarted = make()
    assert len(restarted.shared_store) == 4
    num, data = onboarded(restarted, hashes)
    assert num == 4 and all(torch.equal(g, w) for g, w in zip(data, contents, strict=True))
    salted = make(salt="another-model")
    assert salted.compat_hash != restarted.compat_hash
    assert salted.match(salted.hash_tokens(list(range(4 * BS))).sequence_hashes).num_blocks == 0


def test_a_corrupt_block_cuts_the_prefix_there(make: Make, tmp_path: Path) -> None:
    a = make()
    hashes, contents = fill_device(a, list(range(5 * BS)))
    with a.pool().match_present(hashes) as handle:
        a.offload(handle, Tier.SHARED)
    evict_device(a)
    victim = next((tmp_path / "shared").rglob(f"{hashes[3]:016x}.kvb"))
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0x40
    victim.write_bytes(bytes(raw))
    num, data = onboarded(a, hashes)
    assert num == 3  # blocks 0..2 served; 3 failed its checksum; 4 is unreachable
    assert all(torch.equal(g, w) for g, w in zip(data, contents, strict=False))
    assert a.shared_store.stats.corrupt == 1 and not victim.exists()
    assert a.pool().stats().num_in_use == 0  # the unread allocation went back


@pytest.mark.parametrize("host", [0, 8], ids=["device-to-shared", "host-to-shared"])
def test_write_through_offloads_every_block_to_the_store_once(make: Make, host: int) -> None:
    kvbm = make(cpu_cache_blocks=host, device_blocks=16)
    config = load_kvbm_config(block_size=BS, offload_mode=OffloadMode.WRITE_THROUGH)
    offload = build_offload_manager(kvbm, config)
    try:
        hashes, _ = fill_device(kvbm, list(range(6 * BS)))
        with kvbm.pool().match_present(hashes) as handle:
            offload.on_registered(handle)
            offload.on_registered(handle)  # queued once: no duplicate write
        assert offload.drain(10.0)
        store = kvbm.shared_store
        assert [store.contains(h) for h in hashes] == [True] * 6
        assert store.stats.written == 6
        assert offload.stats.transfers[MoveState.FAILED] == 0
        assert kvbm.pool().stats().num_in_use == 0  # pins released
    finally:
        offload.close()


def test_shared_tier_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FABRIC_SHARED_DISK_BLOCKS"):
        build_kvbm(load_kvbm_config(shared_disk_dir=tmp_path), GEOMETRY)
    with pytest.raises(ConfigError, match="FABRIC_SHARED_DISK_DIR"):
        build_kvbm(load_kvbm_config(shared_disk_blocks=4), GEOMETRY)
    plain = build_kvbm(load_kvbm_config(device_blocks=4), GEOMETRY)
    try:
        with pytest.raises(ConfigError, match="SHARED"):
            _ = plain.shared_store
    finally:
        plain.close()


def test_store_of_another_compat_hash_is_refused(make: Make, tmp_path: Path) -> None:
    kvbm = make()
    wrong = SharedBlockStore(
        tmp_path / "other",
        compat_hash=kvbm.compat_hash ^ 1,
        block_bytes=kvbm.shared_store.block_bytes,
        capacity_blocks=4,
    )
    with pytest.raises(ConfigError, match="compat hash"):
        KvBlockManager(
            {Tier.DEVICE: kvbm._tiers[Tier.DEVICE]},
            block_size=BS,
            seed=kvbm.seed,
            disk_filter=kvbm.disk_filter,
            metrics=kvbm.metrics,
            events=RecordingSink(),
            shared=wrong,
        )
    wrong.close()
