"""The configuration of one fabric process: its block manager's settings and its serving ones.

``FabricConfig`` composes ``KvbmConfig`` (``fabric.kvbm.config``: tiers, eviction, events,
offload) and ``ServeConfig`` (below: where etcd is, which model, how many threads and which CPUs,
what a decode does when its prefill worker fails, the timeouts of the prefill -> decode handoff).
Each reads ``FABRIC_<FIELD>`` (and the seeds' ``DYN_KVBM_*`` names for the tiers); ``load_config``
takes overrides by field name and routes each to the section that owns it. A bad value raises
``ConfigError`` naming the variable and what is allowed; nothing is read lazily later.

Packages below this one never import it: each owns its settings, and this module only composes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from fabric.errors import ConfigError
from fabric.kvbm import KvbmConfig
from fabric.settings import SETTINGS_CONFIG, env, load_settings


class PrefillFallback(Enum):
    """What a decode worker does when the prefill worker it was sent to fails."""

    RECOMPUTE = "recompute"
    """Compute the prompt locally and answer anyway (slower, still correct)."""
    FAIL = "fail"
    """Answer the request with an error chunk."""


class KvHandoff(Enum):
    """How a prompt's KV crosses from a prefill worker to a decode worker (both must agree:
    the decode asks in its ``PrefillRequest``, the prefill answers as it is set)."""

    LAYERWISE = "layerwise"
    """Readable layer by layer while the prompt is computed; the decode reads as it goes."""
    WHOLE = "whole"
    """Offered once the whole prompt is computed; the decode reads it all then."""


class ServeConfig(BaseSettings):
    """Settings of one worker process (``fabric serve``) beyond its block manager."""

    model_config = SETTINGS_CONFIG

    etcd_endpoint: str = Field(
        "http://127.0.0.1:2379", validation_alias=env("etcd_endpoint", "FABRIC_ETCD")
    )
    """etcd client URL(s), comma-separated; workers register there and find their peers."""

    bind_host: str = Field("127.0.0.1", min_length=1, validation_alias=env("bind_host"))
    """Interface the worker's servers listen on; ``0.0.0.0`` for every one (other hosts)."""

    advertise_host: str | None = Field(None, validation_alias=env("advertise_host"))
    """Address peers are told (``fabric.discovery.addresses``); default: the bind address, or
    with a wildcard bind the local address of the route to etcd."""

    namespace: str = Field("kv-fabric", min_length=1, validation_alias=env("namespace"))
    """Discovery namespace: workers of one deployment share it (keys ``/<namespace>/workers/``)."""

    model: str = Field("tiny", min_length=1, validation_alias=env("model"))
    """``tiny`` or ``small`` (embedded presets, made offline on first use) or a model directory."""

    worker_id: str | None = Field(None, validation_alias=env("worker_id"))
    """Unique id in the namespace; default ``<role>-<8 hex digits>``."""

    threads: int = Field(1, ge=1, validation_alias=env("threads"))
    """torch compute threads of the worker (keep workers x threads <= cores)."""

    cpus: str | None = Field(
        None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$", validation_alias=env("cpus")
    )
    """Pin the worker to these CPUs (``os.sched_setaffinity``), e.g. ``1`` or ``0,2-3``."""

    prefill_fallback: PrefillFallback = Field(
        PrefillFallback.RECOMPUTE, validation_alias=env("prefill_fallback")
    )
    """Decode workers: recompute the prompt locally when the prefill worker fails, or fail."""

    kv_handoff: KvHandoff = Field(KvHandoff.LAYERWISE, validation_alias=env("kv_handoff"))
    """Decode workers ask for (prefill workers grant) a layer-wise handoff, or not: ``whole``
    on either side keeps the whole-prompt offer. A decode with a node cache (``node_cache``)
    asks for the whole offer: its prompt blocks come from the host's node tier."""

    max_waiting: int = Field(64, ge=0, validation_alias=env("max_waiting"))
    """Requests that may wait for device blocks; beyond this they are refused with an error."""

    max_num_batched_tokens: int = Field(256, ge=0, validation_alias=env("max_num_batched_tokens"))
    """Decode and aggregated workers: new tokens one engine step computes (chunked prefill, as
    vLLM's ``max_num_batched_tokens``: every running decode first, prompt chunks fill the rest,
    so a long prompt is prefilled over several steps while decodes keep streaming); 0 computes
    each prompt whole in one step, stalling running decodes for it. Prefill workers compute each
    prompt whole: no decode runs there, and chunks would only slow a lone prefill."""

    prefill_timeout_s: float = Field(60.0, gt=0, validation_alias=env("prefill_timeout_s"))
    """Decode workers: the longest wait for a prefill worker's blocks (queueing + compute)."""

    transfer_timeout_s: float = Field(10.0, gt=0, validation_alias=env("transfer_timeout_s"))
    """Decode workers: the longest NIXL read of one request's blocks."""

    hold_timeout_s: float = Field(30.0, gt=0, validation_alias=env("hold_timeout_s"))
    """Prefill workers: release offered blocks a decode has not acknowledged within this."""

    drain_timeout_s: float = Field(30.0, ge=0, validation_alias=env("drain_timeout_s"))
    """How long a worker's drain on SIGTERM may take: it stops taking new requests and finishes
    those it holds (prefill: until its holds are read); past this, what is left ends with an
    error. 0: no drain, SIGTERM stops at once. Keep it below the orchestrator's grace period
    (Kubernetes' ``terminationGracePeriodSeconds``) minus about 20 s for the shutdown steps."""

    registration_ttl_s: float = Field(5.0, gt=0, validation_alias=env("registration_ttl_s"))
    """Lease TTL of the worker's etcd record: a killed worker disappears within about this."""

    metrics_port: int = Field(0, ge=0, le=65535, validation_alias=env("metrics_port"))
    """Port of the worker's metrics and health HTTP endpoint (``/metrics``, ``/health/live``,
    ``/health/ready``) on ``bind_host``; 0: an ephemeral one. Fixed where Prometheus and
    probes need to know it (Kubernetes)."""

    @field_validator("prefill_fallback", "kv_handoff", mode="before")
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


@dataclass(frozen=True, slots=True)
class FabricConfig:
    """One process's settings: ``kvbm`` for its block manager, ``serve`` for the rest."""

    kvbm: KvbmConfig
    serve: ServeConfig


def load_config(**overrides: Any) -> FabricConfig:
    """The process's configuration from the environment, with ``overrides`` on top; each
    override is a field name of ``KvbmConfig`` or ``ServeConfig``.

    Raises:
        ConfigError: a value is malformed or out of range, or an override is not a setting;
            the message names each setting.
    """
    kvbm_fields, serve_fields = KvbmConfig.model_fields, ServeConfig.model_fields
    unknown = sorted(set(overrides) - set(kvbm_fields) - set(serve_fields))
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}")
    problems: list[str] = []
    sections: list[Any] = []
    for cls, fields in ((KvbmConfig, kvbm_fields), (ServeConfig, serve_fields)):
        try:
            sections.append(load_settings(cls, {k: v for k, v in overrides.items() if k in fields}))
        except ConfigError as exc:
            problems.append(str(exc).removeprefix("invalid configuration: "))
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return FabricConfig(kvbm=sections[0], serve=sections[1])


def setting_field(name: str) -> FieldInfo:
    """The field ``name`` of whichever section owns it (its default, environment names, help).

    Raises:
        ConfigError: no section has a field of that name.
    """
    for cls in (KvbmConfig, ServeConfig):
        info = cls.model_fields.get(name)
        if info is not None:
            return info
    raise ConfigError(f"unknown setting {name!r}")
