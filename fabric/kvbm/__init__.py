"""The KV block manager (KVBM): tiered block pools, lifecycle, eviction, events, offload.

This is the package's public face: import from ``fabric.kvbm`` (``from fabric.kvbm import
KvBlockManager, build_kvbm, Tier``); the sub-packages are its mechanism::

    core/      ids, hashing, block handles, one tier's pool, eviction, layouts, event records
    tiers/     storages (device, host, disk) and the block copies between them
    shared/    G4: the checksummed block-file store on a shared directory
    offload/   the asynchronous offload / onboard manager (a table of tier paths, one copy thread)
    stream/    the KV event stream (vLLM's wire format over ZeroMQ)
    config     KvbmConfig (FABRIC_* and DYN_KVBM_* names)
    manager    KvBlockManager, the facade a worker talks to; build: its factory
    node_tier  NodeTier, the verbs of a host tier another process owns (the node cache)
    sequence   SequenceBlocks, one request's block table from prefix match to release
    remote     RemoteBlockSet: blocks offered to a peer as regions for NIXL reads
    metrics    Prometheus metrics of one manager

Imports point down: core <- tiers <- shared <- manager <- build, offload, sequence, remote;
``kvbm`` imports ``fabric.errors``, ``fabric.settings`` and ``fabric.transfer`` (regions and
agents) and nothing else of the fabric; it never imports NIXL or CUDA itself. Names resolve
lazily, so importing one light module (hashing, events) does not load torch-heavy ones.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fabric.kvbm.build import build_kvbm, build_pool, tier_storage
    from fabric.kvbm.config import KvbmConfig, OffloadMode, load_kvbm_config
    from fabric.kvbm.core.block import BlockState, ImmutableBlocks, MutableBlocks
    from fabric.kvbm.core.events import (
        AllCleared,
        BlockRemoved,
        BlockStored,
        EventSink,
        FanoutSink,
        KvEvent,
        NullSink,
        RecordingSink,
    )
    from fabric.kvbm.core.eviction import EvictionKind, EvictionPolicy, FrequencyFilter
    from fabric.kvbm.core.hashing import (
        HashedBlocks,
        as_token_array,
        hash_token_blocks,
        seed_for_salt,
        sequence_hashes,
    )
    from fabric.kvbm.core.layout import (
        KvGeometry,
        LayoutKind,
        LayoutSpec,
        dtype_name,
        layout_record,
    )
    from fabric.kvbm.core.pool import BlockPool, register_positions
    from fabric.kvbm.core.types import BlockHash, BlockId, SequenceHash, Tier
    from fabric.kvbm.manager import KvBlockManager, PrefixMatch
    from fabric.kvbm.metrics import KvbmMetrics
    from fabric.kvbm.node_tier import NodeTier
    from fabric.kvbm.offload.copier import CopyJob, CopyThread
    from fabric.kvbm.offload.manager import OffloadManager, Onboarding, build_offload_manager
    from fabric.kvbm.offload.moves import OffloadPath
    from fabric.kvbm.remote import RemoteBlockSet, export_block_set, plan_read
    from fabric.kvbm.sequence import SequenceBlocks
    from fabric.kvbm.shared.format import load_mac_key
    from fabric.kvbm.shared.store import SharedBlockStore
    from fabric.kvbm.stream import publisher_for
    from fabric.kvbm.stream.publisher import ZmqEventPublisher
    from fabric.kvbm.stream.wire import decode_event_batch, encode_event_batch
    from fabric.kvbm.tiers.block_copy import copy_blocks
    from fabric.kvbm.tiers.storage import (
        DiskStorage,
        Storage,
        TensorStorage,
        adopt_tensors,
        device_storage,
        host_storage,
    )

_NAME_TO_MODULE: dict[str, str] = {
    "CopyJob": "fabric.kvbm.offload.copier",
    "CopyThread": "fabric.kvbm.offload.copier",
    "OffloadPath": "fabric.kvbm.offload.moves",
    "copy_blocks": "fabric.kvbm.tiers.block_copy",
    "KvbmConfig": "fabric.kvbm.config",
    "OffloadMode": "fabric.kvbm.config",
    "load_kvbm_config": "fabric.kvbm.config",
    "BlockHash": "fabric.kvbm.core.types",
    "BlockId": "fabric.kvbm.core.types",
    "SequenceHash": "fabric.kvbm.core.types",
    "Tier": "fabric.kvbm.core.types",
    "BlockState": "fabric.kvbm.core.block",
    "ImmutableBlocks": "fabric.kvbm.core.block",
    "MutableBlocks": "fabric.kvbm.core.block",
    "HashedBlocks": "fabric.kvbm.core.hashing",
    "as_token_array": "fabric.kvbm.core.hashing",
    "hash_token_blocks": "fabric.kvbm.core.hashing",
    "seed_for_salt": "fabric.kvbm.core.hashing",
    "sequence_hashes": "fabric.kvbm.core.hashing",
    "KvGeometry": "fabric.kvbm.core.layout",
    "LayoutKind": "fabric.kvbm.core.layout",
    "LayoutSpec": "fabric.kvbm.core.layout",
    "dtype_name": "fabric.kvbm.core.layout",
    "layout_record": "fabric.kvbm.core.layout",
    "AllCleared": "fabric.kvbm.core.events",
    "BlockRemoved": "fabric.kvbm.core.events",
    "BlockStored": "fabric.kvbm.core.events",
    "EventSink": "fabric.kvbm.core.events",
    "KvEvent": "fabric.kvbm.core.events",
    "NullSink": "fabric.kvbm.core.events",
    "FanoutSink": "fabric.kvbm.core.events",
    "RecordingSink": "fabric.kvbm.core.events",
    "EvictionKind": "fabric.kvbm.core.eviction",
    "EvictionPolicy": "fabric.kvbm.core.eviction",
    "BlockPool": "fabric.kvbm.core.pool",
    "register_positions": "fabric.kvbm.core.pool",
    "FrequencyFilter": "fabric.kvbm.core.eviction",
    "KvBlockManager": "fabric.kvbm.manager",
    "NodeTier": "fabric.kvbm.node_tier",
    "PrefixMatch": "fabric.kvbm.manager",
    "build_kvbm": "fabric.kvbm.build",
    "build_pool": "fabric.kvbm.build",
    "tier_storage": "fabric.kvbm.build",
    "SequenceBlocks": "fabric.kvbm.sequence",
    "KvbmMetrics": "fabric.kvbm.metrics",
    "DiskStorage": "fabric.kvbm.tiers.storage",
    "Storage": "fabric.kvbm.tiers.storage",
    "TensorStorage": "fabric.kvbm.tiers.storage",
    "adopt_tensors": "fabric.kvbm.tiers.storage",
    "device_storage": "fabric.kvbm.tiers.storage",
    "host_storage": "fabric.kvbm.tiers.storage",
    "SharedBlockStore": "fabric.kvbm.shared.store",
    "load_mac_key": "fabric.kvbm.shared.format",
    "OffloadManager": "fabric.kvbm.offload.manager",
    "Onboarding": "fabric.kvbm.offload.manager",
    "build_offload_manager": "fabric.kvbm.offload.manager",
    "publisher_for": "fabric.kvbm.stream",
    "ZmqEventPublisher": "fabric.kvbm.stream.publisher",
    "decode_event_batch": "fabric.kvbm.stream.wire",
    "encode_event_batch": "fabric.kvbm.stream.wire",
    "RemoteBlockSet": "fabric.kvbm.remote",
    "export_block_set": "fabric.kvbm.remote",
    "plan_read": "fabric.kvbm.remote",
}

__all__ = [
    "AllCleared",
    "BlockHash",
    "BlockId",
    "BlockPool",
    "BlockRemoved",
    "BlockState",
    "BlockStored",
    "CopyJob",
    "CopyThread",
    "DiskStorage",
    "EventSink",
    "FanoutSink",
    "EvictionKind",
    "EvictionPolicy",
    "FrequencyFilter",
    "HashedBlocks",
    "ImmutableBlocks",
    "KvBlockManager",
    "NodeTier",
    "KvEvent",
    "KvGeometry",
    "KvbmConfig",
    "KvbmMetrics",
    "LayoutKind",
    "LayoutSpec",
    "MutableBlocks",
    "NullSink",
    "OffloadManager",
    "OffloadMode",
    "OffloadPath",
    "Onboarding",
    "PrefixMatch",
    "RecordingSink",
    "RemoteBlockSet",
    "SequenceBlocks",
    "SequenceHash",
    "SharedBlockStore",
    "layout_record",
    "load_mac_key",
    "Storage",
    "TensorStorage",
    "Tier",
    "ZmqEventPublisher",
    "adopt_tensors",
    "as_token_array",
    "build_kvbm",
    "build_offload_manager",
    "build_pool",
    "copy_blocks",
    "decode_event_batch",
    "device_storage",
    "dtype_name",
    "encode_event_batch",
    "export_block_set",
    "hash_token_blocks",
    "host_storage",
    "load_kvbm_config",
    "plan_read",
    "publisher_for",
    "register_positions",
    "seed_for_salt",
    "sequence_hashes",
    "tier_storage",
]


if not TYPE_CHECKING:  # the type checker sees the imports above: an unknown name is an error

    def __getattr__(name: str) -> Any:
        module = _NAME_TO_MODULE.get(name)
        if module is None:
            raise AttributeError(f"module 'fabric.kvbm' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return __all__
