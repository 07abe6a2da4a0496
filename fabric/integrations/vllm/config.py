"""The connector's settings, read once from vLLM's ``kv_connector_extra_config``.

``ConnectorConfig.from_vllm(kv_transfer_config)`` turns the free-form dict vLLM passes through
into one frozen, validated record; an unknown key or a value of the wrong type raises
``ConfigError`` naming the key (a typo must not silently disable a tier). Nothing is read
lazily later.

Which features are on follows from the settings, not from a mode string:

* the host tier (G2) when ``cpu_cache_gb`` or ``cpu_cache_blocks`` is set (or
  ``DYN_KVBM_CPU_CACHE_GB`` / ``FABRIC_CPU_CACHE_GB`` ...), and below it the local disk tier
  (G3) when ``disk_cache_gb`` or ``disk_cache_blocks`` is: the block manager's pools, under
  vLLM's own G1 (``tiers``, ``mover``);
* the shared disk tier (G4: offload and prefix hits across processes and restarts) when
  ``disk_path`` is set;
* the host's node cache as a tier (after G2 / G3, before G4) when ``node_cache`` is set (or
  ``FABRIC_NODE_CACHE``);
* prefill -> decode transfer when ``etcd_endpoints`` is set: a ``kv_producer`` (or ``kv_both``)
  holds finished prefills for a decode instance, a ``kv_consumer`` (or ``kv_both``) reads them.

Keys (all optional)::

    disk_path              str    shared directory of the disk tier (SharedBlockStore root)
    disk_capacity_blocks   int    blocks this instance indexes before LRU eviction (4096)
    disk_fsync             bool   fsync each block file (False)
    save_blocks            bool   offload computed full blocks to the disk tier (True)
    load_blocks            bool   look up and load prefix hits from the disk tier (True)
    etcd_endpoints         str    etcd URL(s), comma-separated: enables P/D
    namespace              str    discovery namespace ("kv-fabric")
    worker_id              str    this instance's id in etcd (default "vllm-<engine_id>")
    signal_host            str    interface the ZeroMQ signal server binds ("127.0.0.1";
                                  "0.0.0.0" for peers on other hosts)
    advertise_host         str    address the etcd record gives peers for the signal
                                  endpoint, for event endpoints and an ``http_url`` bound
                                  to 0.0.0.0, and the NIXL agent's UCX device (default:
                                  signal_host, or with a wildcard the route to etcd;
                                  ``fabric.discovery.addresses``)
    hold_timeout_s         float  producer frees unread prefill blocks after this (30)
    read_timeout_s         float  consumer's bound on one NIXL read (10)
    peer_timeout_s         float  consumer's bound on finding the producer and its answer (10)
    registration_ttl_s     float  lease TTL of the etcd record (5)
    model_id               str    model name in the compatibility hash (default: vLLM's model)
    http_url               str    this instance's OpenAI server (``http://host:port``): with
                                  ``etcd_endpoints``, the etcd record carries it as the
                                  ``http`` endpoint, so the fabric's frontend can route to it
    served_model_name      str    the model name the frontend matches and sends (default:
                                  vLLM's ``--served-model-name``)
    debug_fail_loads       bool   testing only: report every load as failed (False)

Tier keys, the block manager's own settings (``fabric.kvbm.KvbmConfig``; each also read from
its ``FABRIC_*`` variable and, where it has one, its ``DYN_KVBM_*`` name; a key given here
wins)::

    cpu_cache_gb, cpu_cache_blocks      the host tier's size (GiB, or blocks)
    disk_cache_gb, disk_cache_blocks    the local disk tier's size
    disk_cache_dir                      its directory (must exist)
    disk_admit_after                    write a block to disk once its hash was seen this often
    eviction                            priority_lru, lru or lfu
    events_endpoint                     publish the tiers' KV events here (ZeroMQ, vLLM's wire
    events_replay_endpoint              format with ``medium``), and its replay ROUTER; with
                                        ``etcd_endpoints`` the instance's record advertises
                                        them, so the fabric's frontend indexes its prefixes.
                                        Give a port: the worker side advertises what the
                                        scheduler side binds.
    shared_disk_key_file                the G4 MAC key (``disk_path``'s files carry a keyed MAC;
                                        docs/security.md)
    node_cache                          this host's node KV cache (``fabric serve node-cache``)
                                        as a tier after G2 / G3, before G4: its signal endpoint
                                        (``tcp://host:port`` or ``ipc://path``), or ``etcd``
                                        (needs ``etcd_endpoints``) for the one registered for
                                        ``node_name`` in ``namespace`` (``integrations.vllm.node``)
    node_name                           this host's name as node caches know it (the hostname)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from fabric.errors import ConfigError
from fabric.kvbm import KvbmConfig, load_kvbm_config

TIER_KEYS = frozenset(
    {
        "cpu_cache_gb",
        "cpu_cache_blocks",
        "disk_cache_gb",
        "disk_cache_blocks",
        "disk_cache_dir",
        "disk_admit_after",
        "eviction",
        "events_endpoint",
        "events_replay_endpoint",
        "shared_disk_key_file",
        "node_cache",
        "node_name",
    }
)
"""``kv_connector_extra_config`` keys passed to the block manager's settings."""


class KvRole(Enum):
    """vLLM's ``kv_role``: which side of a prefill -> decode transfer this instance plays."""

    PRODUCER = "kv_producer"
    CONSUMER = "kv_consumer"
    BOTH = "kv_both"

    @property
    def produces(self) -> bool:
        return self in (KvRole.PRODUCER, KvRole.BOTH)

    @property
    def consumes(self) -> bool:
        return self in (KvRole.CONSUMER, KvRole.BOTH)


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """The connector's settings (see the module docstring for the keys)."""

    kv_role: KvRole = KvRole.BOTH
    engine_id: str = "vllm"
    disk_path: Path | None = None
    disk_capacity_blocks: int = 4096
    disk_fsync: bool = False
    save_blocks: bool = True
    load_blocks: bool = True
    etcd_endpoints: str | None = None
    namespace: str = "kv-fabric"
    worker_id: str | None = None
    signal_host: str = "127.0.0.1"
    advertise_host: str | None = None
    hold_timeout_s: float = 30.0
    read_timeout_s: float = 10.0
    peer_timeout_s: float = 10.0
    registration_ttl_s: float = 5.0
    model_id: str | None = None
    http_url: str | None = None
    served_model_name: str | None = None
    debug_fail_loads: bool = False
    tier_settings: tuple[tuple[str, Any], ...] = ()
    """The tier keys given in ``kv_connector_extra_config`` (``TIER_KEYS``), as pairs."""

    def __post_init__(self) -> None:
        if self.disk_capacity_blocks < 1:
            raise ConfigError(
                f"disk_capacity_blocks={self.disk_capacity_blocks} must be at least 1"
            )
        for name in ("hold_timeout_s", "read_timeout_s", "peer_timeout_s", "registration_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive (seconds)")
        if self.worker_id is not None and (not self.worker_id or "/" in self.worker_id):
            raise ConfigError(f"worker_id={self.worker_id!r} must be non-empty without '/'")
        if self.http_url is not None and not self.http_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"http_url={self.http_url!r} must be this instance's server URL, e.g. "
                "http://127.0.0.1:8100"
            )

    def kvbm_config(self, block_size: int) -> KvbmConfig:
        """The block manager's settings of the tiers: the environment, then the tier keys.

        Raises:
            ConfigError: a tier setting is malformed or out of range.
        """
        return load_kvbm_config(block_size=block_size, **dict(self.tier_settings))

    @property
    def disk_enabled(self) -> bool:
        return self.disk_path is not None

    @property
    def pd_enabled(self) -> bool:
        return self.etcd_endpoints is not None

    @property
    def fabric_worker_id(self) -> str:
        """The id this instance registers in etcd and names in ``kv_transfer_params``."""
        return self.worker_id or f"vllm-{self.engine_id}"

    @classmethod
    def from_extra(
        cls, extra: dict[str, Any] | None, *, kv_role: str | None, engine_id: str | None
    ) -> ConnectorConfig:
        """Validate ``kv_connector_extra_config`` (plus vLLM's role and engine id).

        Raises:
            ConfigError: an unknown key, a value of the wrong type, or an unknown ``kv_role``.
        """
        extra = dict(extra or {})
        tiers = tuple(sorted((k, extra.pop(k)) for k in TIER_KEYS & set(extra)))
        known = {f.name: f for f in fields(cls)}
        known.pop("kv_role")
        known.pop("engine_id")
        known.pop("tier_settings")
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(
                f"kv_connector_extra_config has unknown keys {unknown}; the fabric connector "
                f"takes {sorted(set(known) | TIER_KEYS)} (docs/vllm.md)"
            )
        try:
            role = KvRole(kv_role or KvRole.BOTH.value)
        except ValueError as e:
            raise ConfigError(
                f"kv_role={kv_role!r} is not one of {[r.value for r in KvRole]}"
            ) from e
        values: dict[str, Any] = {}
        for key, value in extra.items():
            values[key] = _coerce(key, value, cls.__dataclass_fields__[key].default)
        config = cls(kv_role=role, engine_id=engine_id or "vllm", tier_settings=tiers, **values)
        try:  # refuse a bad tier setting now, naming it
            kvbm = config.kvbm_config(block_size=16)
        except ConfigError as e:
            given = sorted(k for k, _ in tiers)
            raise ConfigError(
                f"tier settings (extra config keys {given} or environment): {e}"
            ) from e
        _check_node_cache(kvbm.node_cache, config)
        for endpoint in (kvbm.events_endpoint, kvbm.events_replay_endpoint):
            if endpoint is not None and endpoint.rsplit(":", 1)[-1] in ("0", "*"):
                raise ConfigError(
                    f"events endpoint {endpoint!r} needs a fixed port: the worker side "
                    "advertises the endpoint the scheduler side binds"
                )
        return config

    @classmethod
    def from_vllm(cls, kv_transfer_config: Any) -> ConnectorConfig:
        """From vLLM's ``KVTransferConfig`` (its role, engine id and extra config)."""
        return cls.from_extra(
            kv_transfer_config.kv_connector_extra_config,
            kv_role=kv_transfer_config.kv_role,
            engine_id=kv_transfer_config.engine_id,
        )


NODE_CACHE_SCHEMES = ("tcp://", "ipc://")


def _check_node_cache(node_cache: str | None, config: ConnectorConfig) -> None:
    """``node_cache`` (key or ``FABRIC_NODE_CACHE``) is ``etcd`` with ``etcd_endpoints``, or an
    endpoint; ConfigError otherwise."""
    if node_cache is None:
        return
    if node_cache == "etcd":
        if config.etcd_endpoints is None:
            raise ConfigError(
                "node_cache='etcd' finds this host's node cache in discovery: set "
                "etcd_endpoints (and namespace, node_name as the node cache's), or give its "
                "endpoint, e.g. tcp://127.0.0.1:7300"
            )
        return
    if not node_cache.startswith(NODE_CACHE_SCHEMES) or node_cache.endswith(("://", ":0", ":*")):
        raise ConfigError(
            f"node_cache={node_cache!r} must be 'etcd' or the node cache's signal endpoint "
            "(tcp://host:port or ipc://path, as fabric serve node-cache prints it)"
        )


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the field whose default is ``default``, else ConfigError."""
    if key == "disk_path":
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{key} must be a non-empty path string, got {value!r}")
        return Path(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number (seconds), got {value!r}")
        return float(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    return value
