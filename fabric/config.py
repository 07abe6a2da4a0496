"""One typed configuration for a worker's fabric, read from the environment or given in code.

Every field reads ``FABRIC_<FIELD>``; the tier settings also accept the KVBM names of the seeds
(``DYN_KVBM_CPU_CACHE_GB``, ``DYN_KVBM_DISK_CACHE_DIR``, ...) so existing deployments carry over.
When both are set, the ``FABRIC_*`` name wins. A bad value raises ``ConfigError`` naming the
variable and what is allowed; nothing is read lazily later.

Tier sizes are given in GB (like the seeds) or as block counts (the count wins); they are turned
into blocks by ``tier_blocks`` once the model's block size in bytes is known.

The serving section configures one worker process (``fabric serve``): where etcd is, which model,
how many threads and which CPUs, what a decode does when its prefill worker fails, and the
timeouts of the prefill -> decode handoff.

The offload section configures the asynchronous tier moves (``fabric.kvbm.offload``): write-through
or write-back, the bound on copies in flight and on queued blocks, the batch size of one copy.
"""

from __future__ import annotations

import tempfile
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fabric.errors import ConfigError
from fabric.kvbm.eviction import EvictionKind
from fabric.kvbm.layout import LayoutKind
from fabric.kvbm.types import Tier

_GIB = 1 << 30


class PrefillFallback(Enum):
    """What a decode worker does when the prefill worker it was sent to fails."""

    RECOMPUTE = "recompute"
    """Compute the prompt locally and answer anyway (slower, still correct)."""
    FAIL = "fail"
    """Answer the request with an error chunk."""


class OffloadMode(Enum):
    """When device (and host) blocks are copied to the next tier (``fabric.kvbm.offload``)."""

    WRITE_THROUGH = "write_through"
    """Copy every block to the next tier as soon as it is registered (or lands there)."""
    WRITE_BACK = "write_back"
    """Mark blocks dirty; copy the oldest when their tier runs low on free blocks."""


def _env(name: str, *aliases: str) -> AliasChoices:
    return AliasChoices(f"FABRIC_{name.upper()}", *aliases)


class FabricConfig(BaseSettings):
    """Settings of one worker: its KV block manager, then its serving process."""

    model_config = SettingsConfigDict(
        env_prefix="FABRIC_",
        case_sensitive=False,
        frozen=True,
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
    )

    block_size: int = Field(16, gt=0, validation_alias=_env("block_size"))
    """Tokens per KV block."""

    device_blocks: int = Field(1024, gt=0, validation_alias=_env("device_blocks"))
    """Blocks in the G1 (device) pool."""

    layout: LayoutKind = Field(LayoutKind.FULLY_CONTIGUOUS, validation_alias=_env("layout"))
    """Layout of the device and host pools: fully_contiguous or layer_separate."""

    cpu_cache_gb: float = Field(
        0.0, ge=0, validation_alias=_env("cpu_cache_gb", "DYN_KVBM_CPU_CACHE_GB")
    )
    cpu_cache_blocks: int | None = Field(
        None,
        ge=0,
        validation_alias=_env("cpu_cache_blocks", "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"),
    )
    host_shared_name: str | None = Field(None, validation_alias=_env("host_shared_name"))
    """Back the host pool with this POSIX shared-memory segment so other processes can map it."""

    disk_cache_gb: float = Field(
        0.0, ge=0, validation_alias=_env("disk_cache_gb", "DYN_KVBM_DISK_CACHE_GB")
    )
    disk_cache_blocks: int | None = Field(
        None,
        ge=0,
        validation_alias=_env("disk_cache_blocks", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"),
    )
    disk_cache_dir: Path | None = Field(
        None, validation_alias=_env("disk_cache_dir", "DYN_KVBM_DISK_CACHE_DIR")
    )
    """Directory of the disk tier; it must exist. Unset: ``<tmp>/kv-fabric``, created on use."""
    disk_zerofill_fallback: bool = Field(
        True, validation_alias=_env("disk_zerofill_fallback", "DYN_KVBM_DISK_ZEROFILL_FALLBACK")
    )
    """Zero-fill the disk file where the filesystem has no fallocate (else fail)."""

    disk_o_direct: bool = Field(True, validation_alias=_env("disk_o_direct"))
    """Use O_DIRECT for the disk tier where the filesystem allows it."""

    shared_disk_dir: Path | None = Field(None, validation_alias=_env("shared_disk_dir"))
    """Directory of the G4 shared disk store (``fabric.kvbm.disk_store``): blocks stored by
    sequence hash, shared by every instance pointing at it (also across hosts, on a network
    filesystem), kept across restarts. Unset: no G4 tier."""
    shared_disk_gb: float = Field(0.0, ge=0, validation_alias=_env("shared_disk_gb"))
    shared_disk_blocks: int | None = Field(None, ge=0, validation_alias=_env("shared_disk_blocks"))
    """Blocks this instance keeps indexed in the shared store (overrides ``shared_disk_gb``);
    instances sharing a directory should use the same size."""
    shared_disk_fsync: bool = Field(False, validation_alias=_env("shared_disk_fsync"))
    """fsync each block file before it becomes visible (survives power loss, slower writes)."""

    disk_admit_after: int = Field(2, ge=1, validation_alias=_env("disk_admit_after"))
    """Frequency filter: offload a block to disk once its hash was seen this many times."""

    eviction: EvictionKind = Field(EvictionKind.PRIORITY_LRU, validation_alias=_env("eviction"))
    """Eviction policy of every pool: priority_lru, lru or lfu."""

    salt: str | None = Field(None, validation_alias=_env("salt"))
    """Extra salt mixed into every sequence hash (e.g. a LoRA or tenant id)."""

    events_endpoint: str | None = Field(None, validation_alias=_env("events_endpoint"))
    """ZeroMQ endpoint to publish KV events on (vLLM's wire format), e.g. tcp://127.0.0.1:5557."""

    events_replay_endpoint: str | None = Field(
        None, validation_alias=_env("events_replay_endpoint")
    )

    # -- offload: asynchronous tier moves (``fabric.kvbm.offload``) -----------------------------

    offload_mode: OffloadMode = Field(
        OffloadMode.WRITE_THROUGH, validation_alias=_env("offload_mode")
    )
    """write_through (copy on registration) or write_back (copy under eviction pressure)."""

    offload_max_in_flight: int = Field(4, ge=1, validation_alias=_env("offload_max_in_flight"))
    """Copy batches handed to the copy thread and not yet collected."""

    offload_max_queued_blocks: int = Field(
        4096, ge=1, validation_alias=_env("offload_max_queued_blocks")
    )
    """Blocks waiting in the offload queues; a submission beyond this is refused (BUSY)."""

    offload_batch_blocks: int = Field(64, ge=1, validation_alias=_env("offload_batch_blocks"))
    """Blocks of one path coalesced into one copy."""

    offload_writeback_free: float = Field(
        0.1, ge=0, le=1, validation_alias=_env("offload_writeback_free")
    )
    """write_back: a tier with fewer free blocks than this fraction of it writes back dirty ones."""

    offload_close_timeout_s: float = Field(
        5.0, gt=0, validation_alias=_env("offload_close_timeout_s")
    )
    """Bound on draining queued and in-flight copies when the worker closes."""

    # -- serving: one worker process (``fabric serve``) -------------------------------------------

    etcd_endpoint: str = Field(
        "http://127.0.0.1:2379", validation_alias=_env("etcd_endpoint", "FABRIC_ETCD")
    )
    """etcd client URL(s), comma-separated; workers register there and find their peers."""

    namespace: str = Field("kv-fabric", min_length=1, validation_alias=_env("namespace"))
    """Discovery namespace: workers of one deployment share it (keys ``/<namespace>/workers/``)."""

    model: str = Field("tiny", min_length=1, validation_alias=_env("model"))
    """``tiny`` or ``small`` (embedded presets, made offline on first use) or a model directory."""

    worker_id: str | None = Field(None, validation_alias=_env("worker_id"))
    """Unique id in the namespace; default ``<role>-<8 hex digits>``."""

    threads: int = Field(1, ge=1, validation_alias=_env("threads"))
    """torch compute threads of the worker (keep workers x threads <= cores)."""

    cpus: str | None = Field(
        None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$", validation_alias=_env("cpus")
    )
    """Pin the worker to these CPUs (``os.sched_setaffinity``), e.g. ``1`` or ``0,2-3``."""

    prefill_fallback: PrefillFallback = Field(
        PrefillFallback.RECOMPUTE, validation_alias=_env("prefill_fallback")
    )
    """Decode workers: recompute the prompt locally when the prefill worker fails, or fail."""

    max_waiting: int = Field(64, ge=0, validation_alias=_env("max_waiting"))
    """Requests that may wait for device blocks; beyond this they are refused with an error."""

    prefill_timeout_s: float = Field(60.0, gt=0, validation_alias=_env("prefill_timeout_s"))
    """Decode workers: the longest wait for a prefill worker's blocks (queueing + compute)."""

    transfer_timeout_s: float = Field(10.0, gt=0, validation_alias=_env("transfer_timeout_s"))
    """Decode workers: the longest NIXL read of one request's blocks."""

    hold_timeout_s: float = Field(30.0, gt=0, validation_alias=_env("hold_timeout_s"))
    """Prefill workers: release offered blocks a decode has not acknowledged within this."""

    registration_ttl_s: float = Field(5.0, gt=0, validation_alias=_env("registration_ttl_s"))
    """Lease TTL of the worker's etcd record: a killed worker disappears within about this."""

    @field_validator("layout", "eviction", "prefill_fallback", "offload_mode", mode="before")
    @classmethod
    def _enum_by_name(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def cpu_set(self) -> set[int] | None:
        """The CPUs of ``cpus`` (``"0,2-3"`` -> ``{0, 2, 3}``), or None when unset."""
        if self.cpus is None:
            return None
        cpus: set[int] = set()
        for part in self.cpus.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        return cpus

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


def load_config(**overrides: Any) -> FabricConfig:
    """The configuration from the environment, with ``overrides`` (field names) on top.

    Raises:
        ConfigError: a value is malformed or out of range; the message names each setting.
    """
    try:
        return FabricConfig(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{_setting_names(where)}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def _setting_names(where: str) -> str:
    """Every environment name of the field that ``where`` (a field name or alias) refers to."""
    for name, info in FabricConfig.model_fields.items():
        alias = info.validation_alias
        choices = [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else []
        if where.lower() in (name, *(c.lower() for c in choices)):
            return " / ".join(choices) or name
    return where
