"""One typed configuration for a worker's fabric, read from the environment or given in code.

Every field reads ``FABRIC_<FIELD>``; the tier settings also accept the KVBM names of the seeds
(``DYN_KVBM_CPU_CACHE_GB``, ``DYN_KVBM_DISK_CACHE_DIR``, ...) so existing deployments carry over.
When both are set, the ``FABRIC_*`` name wins. A bad value raises ``ConfigError`` naming the
variable and what is allowed; nothing is read lazily later.

Tier sizes are given in GB (like the seeds) or as block counts (the count wins); they are turned
into blocks by ``tier_blocks`` once the model's block size in bytes is known.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fabric.errors import ConfigError
from fabric.kvbm.eviction import EvictionKind
from fabric.kvbm.layout import LayoutKind
from fabric.kvbm.types import Tier

_GIB = 1 << 30


def _env(name: str, *aliases: str) -> AliasChoices:
    return AliasChoices(f"FABRIC_{name.upper()}", *aliases)


class FabricConfig(BaseSettings):
    """Settings of one worker's KV block manager (later sections add transfer and serving)."""

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

    @field_validator("layout", "eviction", mode="before")
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
            raise ConfigError(f"tier {tier.name} has no local pool size")
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
