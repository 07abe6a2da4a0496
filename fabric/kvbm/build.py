"""``build_kvbm``: a ``KvBlockManager`` wired from a ``KvbmConfig`` and the model's geometry.

The factory is the one place that turns settings into pools, storages, eviction policies, the
disk admission filter, the G4 store and the hash seed; the manager's constructor only takes what
was built. Everything that makes KV incompatible (block size, layers, KV heads, head size, dtype,
K/V split, the user's salt) goes into the seed, so blocks of two incompatible models never match.
A failure closes every storage already built and the event sink before it propagates.
"""

from __future__ import annotations

import logging

import torch

from fabric.errors import ConfigError
from fabric.kvbm.config import KvbmConfig
from fabric.kvbm.core.events import EventSink, NullSink
from fabric.kvbm.core.eviction import FrequencyFilter, build_policy
from fabric.kvbm.core.hashing import seed_for_salt
from fabric.kvbm.core.layout import KvGeometry, LayoutKind, LayoutSpec
from fabric.kvbm.core.pool import BlockPool
from fabric.kvbm.core.types import Tier
from fabric.kvbm.manager import SPEED_ORDER, KvBlockManager, TierSlot
from fabric.kvbm.metrics import KvbmMetrics
from fabric.kvbm.shared.format import load_mac_key
from fabric.kvbm.shared.store import SharedBlockStore
from fabric.kvbm.tiers import kernels
from fabric.kvbm.tiers.storage import DiskStorage, Storage, device_storage, host_storage

logger = logging.getLogger(__name__)


def build_kvbm(
    config: KvbmConfig,
    geometry: KvGeometry,
    *,
    events: EventSink | None = None,
    device: torch.device | str | None = None,
    metrics: KvbmMetrics | None = None,
) -> KvBlockManager:
    """Wire a KvBlockManager from the config: pools, storages, policies, events, metrics.

    Events go to ``events`` when given (a worker passes its ZeroMQ publisher, built with
    ``fabric.kvbm.stream.publisher_for``), else nowhere. The manager owns the sink: ``close``
    closes it, and so does a failure here, after closing every storage already built.
    """
    if events is None:
        events = NullSink()
    block_bytes = geometry.layout(LayoutKind.FULLY_CONTIGUOUS, 1, config.block_size).block_bytes
    tiers: dict[Tier, TierSlot] = {}
    try:
        for tier in SPEED_ORDER:
            num_blocks = config.tier_blocks(tier, block_bytes)
            if num_blocks == 0:
                continue
            kind = LayoutKind.FULLY_CONTIGUOUS if tier is Tier.DISK else config.layout
            layout = geometry.layout(kind, num_blocks, config.block_size)
            storage = tier_storage(config, tier, layout, device)
            tiers[tier] = TierSlot(build_pool(config, tier, num_blocks, events), storage)
            logger.info(
                "%s tier: %d blocks of %d tokens (%.1f MiB)",
                tier.name,
                num_blocks,
                config.block_size,
                num_blocks * block_bytes / 2**20,
            )
        seed = seed_for_salt(compat_salt(config, geometry))
        shared = shared_store(config, seed, block_bytes)
    except BaseException:
        for slot in tiers.values():
            slot.storage.close()
        events.close()
        raise
    return KvBlockManager(
        tiers,
        shared=shared,
        block_size=config.block_size,
        seed=seed,
        disk_filter=FrequencyFilter(config.disk_admit_after),
        metrics=metrics if metrics is not None else KvbmMetrics(),
        events=events,
    )


def build_pool(config: KvbmConfig, tier: Tier, num_blocks: int, events: EventSink) -> BlockPool:
    """The pool of ``tier``: ``num_blocks`` blocks under the configured eviction policy."""
    return BlockPool(
        num_blocks, config.block_size, tier, policy=build_policy(config.eviction), events=events
    )


def tier_storage(
    config: KvbmConfig, tier: Tier, layout: LayoutSpec, device: torch.device | str | None = None
) -> Storage:
    """The storage of ``tier`` for ``layout``: device tensors, host memory (shared memory when
    ``host_shared_name`` is set; pinned where CUDA is present) or one file on the disk tier's
    directory."""
    if tier is Tier.DEVICE:
        return device_storage(layout, device)
    if tier is Tier.HOST:
        # Load (or start building) the copy kernels now, not on the first offload's path.
        kernels.native_available()
        return host_storage(layout, shared_name=config.host_shared_name)
    if tier is Tier.DISK:
        return DiskStorage(
            layout,
            config.resolved_disk_dir(),
            o_direct=config.disk_o_direct,
            zerofill_fallback=config.disk_zerofill_fallback,
        )
    raise ConfigError(f"the {tier.name} tier has no storage of its own (G4 is a file store)")


def shared_store(config: KvbmConfig, seed: int, block_bytes: int) -> SharedBlockStore | None:
    """The G4 store when ``shared_disk_dir`` is set (its size must be too), else None."""
    num_blocks = config.tier_blocks(Tier.SHARED, block_bytes)
    if config.shared_disk_dir is None:
        if num_blocks:
            raise ConfigError(
                "FABRIC_SHARED_DISK_GB / FABRIC_SHARED_DISK_BLOCKS is set but "
                "FABRIC_SHARED_DISK_DIR is not: name the shared directory"
            )
        return None
    if num_blocks == 0:
        raise ConfigError(
            f"FABRIC_SHARED_DISK_DIR={config.shared_disk_dir} needs a size: set "
            "FABRIC_SHARED_DISK_GB or FABRIC_SHARED_DISK_BLOCKS"
        )
    store = SharedBlockStore(
        config.shared_disk_dir,
        compat_hash=seed,
        block_bytes=block_bytes,
        capacity_blocks=num_blocks,
        fsync=config.shared_disk_fsync,
        key=None if (key_file := config.shared_disk_key_file) is None else load_mac_key(key_file),
    )
    logger.info(
        "SHARED tier: %d blocks (%.1f MiB) in %s, %d found there",
        num_blocks,
        num_blocks * block_bytes / 2**20,
        config.shared_disk_dir,
        len(store),
    )
    return store


def compat_salt(config: KvbmConfig, geometry: KvGeometry) -> str:
    """Everything that makes KV incompatible goes into the hash seed (plus the user's salt)."""
    parts = [
        f"block_size={config.block_size}",
        f"layers={geometry.num_layers}",
        f"kv_heads={geometry.num_kv_heads}",
        f"head={geometry.head_size}",
        f"dtype={str(geometry.dtype).removeprefix('torch.')}",
        f"kv_split={geometry.kv_split}",
    ]
    if config.salt:
        parts.append(f"salt={config.salt}")
    return "|".join(parts)
