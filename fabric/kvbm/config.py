"""``KvbmConfig``: the settings of one KV block manager, read from the environment or given in code.

Every field reads ``FABRIC_<FIELD>``; the tier settings also accept the KVBM names of the seeds
(``DYN_KVBM_CPU_CACHE_GB``, ``DYN_KVBM_DISK_CACHE_DIR``, ...) so existing deployments carry over.
When both are set, the ``FABRIC_*`` name wins. A bad value raises ``ConfigError`` naming the
variable and what is allowed; nothing is read lazily later.

Tier sizes are given in GB (like the seeds) or as block counts (the count wins); they are turned
into blocks by ``tier_blocks`` once the model's block size in bytes is known. The offload section
configures the asynchronous tier moves (``fabric.kvbm.offload``): write-through or write-back, the
bound on copies in flight and on queued blocks, the batch size of one copy.

This module knows nothing of processes or serving: ``fabric.config.FabricConfig`` composes it with
the serving settings, and whatever builds a manager passes it ``KvbmConfig`` (``build_kvbm``).
"""

from __future__ import annotations

import tempfile
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from fabric.kvbm.core.eviction import EvictionKind
from fabric.kvbm.core.layout import LayoutKind
from fabric.kvbm.core.types import Tier
from fabric.settings import SETTINGS_CONFIG, env, load_settings

_GIB = 1 << 30


class OffloadMode(Enum):
    """When device (and host) blocks are copied to the next tier (``fabric.kvbm.offload``)."""

    WRITE_THROUGH = "write_through"
    """Copy every block to the next tier as soon as it is registered (or lands there)."""
    WRITE_BACK = "write_back"
    """Mark blocks dirty; copy the oldest when their tier runs low on free blocks."""


class KvbmConfig(BaseSettings):
    """Settings of one KV block manager: block size, tiers, eviction, events, offload."""

    model_config = SETTINGS_CONFIG

    block_size: int = Field(16, gt=0, validation_alias=env("block_size"))
    """Tokens per KV block."""

    device_blocks: int = Field(1024, gt=0, validation_alias=env("device_blocks"))
    """Blocks in the G1 (device) pool."""

    layout: LayoutKind = Field(LayoutKind.FULLY_CONTIGUOUS, validation_alias=env("layout"))
    """Layout of the device and host pools: fully_contiguous or layer_separate."""

    cpu_cache_gb: float = Field(
        0.0, ge=0, validation_alias=env("cpu_cache_gb", "DYN_KVBM_CPU_CACHE_GB")
    )
    cpu_cache_blocks: int | None = Field(
        None,
        ge=0,
        validation_alias=env("cpu_cache_blocks", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"),
    )
    host_shared_name: str | None = Field(None, validation_alias=env("host_shared_name"))
    """Back the host pool with this POSIX shared-memory segment so other processes can map it."""

    node_cache: str | None = Field(None, validation_alias=env("node_cache"))
    """Attach to this host's node KV cache (``fabric serve node-cache``) as a tier below the
    host tier: its signal endpoint (``tcp://...``), or ``etcd`` to find the one registered for
    ``node_name`` in discovery. Unset: no node tier."""
    node_name: str | None = Field(None, min_length=1, validation_alias=env("node_name"))
    """This host's name as node caches and records know it. Unset: the hostname."""

    disk_cache_gb: float = Field(
        0.0, ge=0, validation_alias=env("disk_cache_gb", "DYN_KVBM_DISK_CACHE_GB")
    )
    disk_cache_blocks: int | None = Field(
        None,
        ge=0,
        validation_alias=env("disk_cache_blocks", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"),
    )
    disk_cache_dir: Path | None = Field(
        None, validation_alias=env("disk_cache_dir", "DYN_KVBM_DISK_CACHE_DIR")
    )
    """Directory of the disk tier; it must exist. Unset: ``<tmp>/kv-fabric``, created on use."""
    disk_zerofill_fallback: bool = Field(
        True, validation_alias=env("disk_zerofill_fallback", "DYN_KVBM_DISK_ZEROFILL_FALLBACK")
    )
    """Zero-fill the disk file where the filesystem has no fallocate (else fail)."""

    disk_o_direct: bool = Field(True, validation_alias=env("disk_o_direct"))
    """Use O_DIRECT for the disk tier where the filesystem allows it."""

    shared_disk_dir: Path | None = Field(None, validation_alias=env("shared_disk_dir"))
    """Directory of the G4 shared disk store (``fabric.kvbm.shared.store``): blocks stored by
    sequence hash, shared by every instance pointing at it (also across hosts, on a network
    filesystem), kept across restarts. Unset: no G4 tier."""
    shared_disk_gb: float = Field(0.0, ge=0, validation_alias=env("shared_disk_gb"))
    shared_disk_blocks: int | None = Field(None, ge=0, validation_alias=env("shared_disk_blocks"))
    """Blocks this instance keeps indexed in the shared store (overrides ``shared_disk_gb``);
    instances sharing a directory should use the same size."""
    shared_disk_fsync: bool = Field(False, validation_alias=env("shared_disk_fsync"))
    """fsync each block file before it becomes visible (survives power loss, slower writes)."""
    shared_disk_key_file: Path | None = Field(None, validation_alias=env("shared_disk_key_file"))
    """A file holding the G4 MAC key (at least 32 bytes; the same on every instance sharing the
    directory): blocks are written with a keyed MAC and served only with a valid one. Unset:
    the directory must be trusted (anyone who can write it can inject KV)."""

    disk_admit_after: int = Field(2, ge=1, validation_alias=env("disk_admit_after"))
    """Frequency filter: offload a block to disk once its hash was seen this many times."""

    eviction: EvictionKind = Field(EvictionKind.PRIORITY_LRU, validation_alias=env("eviction"))
    """Eviction policy of every pool: priority_lru, lru or lfu."""

    salt: str | None = Field(None, validation_alias=env("salt"))
    """Extra salt mixed into every sequence hash (e.g. a LoRA or tenant id)."""

    events_endpoint: str | None = Field(None, validation_alias=env("events_endpoint"))
    """ZeroMQ endpoint to publish KV events on (vLLM's wire format), e.g. tcp://127.0.0.1:5557."""

    events_replay_endpoint: str | None = Field(None, validation_alias=env("events_replay_endpoint"))

    # -- offload: asynchronous tier moves (``fabric.kvbm.offload``) ------------------------------

    offload_mode: OffloadMode = Field(
        OffloadMode.WRITE_THROUGH, validation_alias=env("offload_mode")
    )
    """write_through (copy on registration) or write_back (copy under eviction pressure)."""

    offload_max_in_flight: int = Field(4, ge=1, validation_alias=env("offload_max_in_flight"))
    """Copy batches handed to the copy thread and not yet collected."""

    offload_max_queued_blocks: int = Field(
        4096, ge=1, validation_alias=env("offload_max_queued_blocks")
    )
    """Blocks waiting in the offload queues; a submission beyond this is refused (BUSY)."""

    offload_batch_blocks: int = Field(64, ge=1, validation_alias=env("offload_batch_blocks"))
    """Blocks of one path coalesced into one copy."""

    offload_writeback_free: float = Field(
        0.1, ge=0, le=1, validation_alias=env("offload_writeback_free")
    )
    """write_back: a tier with fewer free blocks than this fraction of it writes back dirty ones."""

    offload_close_timeout_s: float = Field(
        5.0, gt=0, validation_alias=env("offload_close_timeout_s")
    )
    """Bound on draining queued and in-flight copies when the worker closes."""

    @field_validator("layout", "eviction", "offload_mode", mode="before")
    @classmethod
    def _enum_by_name(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def resolved_disk_dir(self) -> Path:
        """The disk tier's directory: the configured one, or the default temp one (created)."""
        if self.disk_cache_dir is not None:
            return self.disk_cache_dir
        default = Path(tempfile.gettempdir()) / "kv-fabric"
        default.mkdir(exist_ok=True)
        return default

    def tier_blocks(self, tier: Tier, block_bytes: int) -> int:
        """Blocks of ``tier`` for blocks of ``block_bytes`` (0 means the tier is off)."""
        if tier is Tier.DEVICE:
            return self.device_blocks
        if tier is Tier.HOST:
            override, gb = self.cpu_cache_blocks, self.cpu_cache_gb
        elif tier is Tier.DISK:
            override, gb = self.disk_cache_blocks, self.disk_cache_gb
        else:
            override, gb = self.shared_disk_blocks, self.shared_disk_gb
        if override is not None:
            return override
        return int(gb * _GIB) // block_bytes


def load_kvbm_config(**overrides: Any) -> KvbmConfig:
    """The block manager's settings from the environment, with ``overrides`` (field names) on top.

    Raises:
        ConfigError: a value is malformed or out of range, or an override is not a setting.
    """
    return load_settings(KvbmConfig, overrides)
