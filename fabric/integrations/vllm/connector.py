"""``FabricConnector``: the ``KVConnectorBase_V1`` vLLM loads through ``kv_connector_module_path``.

A facade: vLLM builds one instance per role, and each delegates to one object, a
``FabricScheduler`` (scheduler role) or a ``FabricWorker`` (worker role), built from one
``ConnectorConfig`` and one ``PageGeometry`` by ``build_scheduler`` / ``build_worker``. Every
method of the other role is a no-op or an error, as vLLM never calls it.

Use::

    --kv-transfer-config '{"kv_connector": "FabricConnector",
                           "kv_connector_module_path": "fabric.integrations.vllm.connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"disk_path": "/mnt/kv"}}'

(docs/vllm.md has the configurations for offload, prefix sharing and P/D.)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from fabric.errors import ConfigError
from fabric.integrations.vllm.config import ConnectorConfig
from fabric.integrations.vllm.metadata import FabricMetadata, FabricWorkerMeta
from fabric.integrations.vllm.node import attach_node_tier, check_node_supported, node_layout
from fabric.integrations.vllm.pages import PageGeometry
from fabric.integrations.vllm.scheduler import FabricScheduler
from fabric.integrations.vllm.telemetry import FabricPromMetrics, FabricTransferStats
from fabric.integrations.vllm.tiers import EventBuffer, TierLedger
from fabric.integrations.vllm.worker import FabricWorker
from fabric.kvbm import (
    AllCleared,
    BlockRemoved,
    FanoutSink,
    KvEvent,
    SharedBlockStore,
    Tier,
    load_mac_key,
    publisher_for,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def open_store(
    config: ConnectorConfig, geometry: PageGeometry, rank: int = 0, world_size: int = 1
) -> SharedBlockStore | None:
    """The G4 store of tensor-parallel ``rank``'s shards (a directory of its own), or None when
    ``disk_path`` is not set."""
    if config.disk_path is None:
        return None
    key_file = config.kvbm_config(geometry.block_size).shared_disk_key_file
    return SharedBlockStore(
        config.disk_path,
        compat_hash=geometry.shard_compat(rank, world_size),
        block_bytes=geometry.block_bytes,
        capacity_blocks=config.disk_capacity_blocks,
        fsync=config.disk_fsync,
        key=None if key_file is None else load_mac_key(key_file),
    )


def served_model_name(vllm_config: VllmConfig) -> str:
    """vLLM's ``--served-model-name`` (its first name), else the model."""
    model_config = vllm_config.model_config
    name = getattr(model_config, "served_model_name", None) or model_config.model
    if isinstance(name, list | tuple):
        name = name[0] if name else model_config.model
    return str(name)


def build_scheduler(
    config: ConnectorConfig, geometry: PageGeometry, world_size: int = 1
) -> FabricScheduler:
    """The scheduler side: the G4 store (rank 0's directory answers lookups: a shard another
    rank lacks is a load error there, recomputed), the tiers' ledger, counting a job done
    once every rank reported it, whose events go to vLLM's own stream (``take_events``) and to
    the fabric's publisher when ``events_endpoint`` is set, and the node tier's link (lookups
    only) when ``node_cache`` is set."""
    check_node_supported(config, world_size)
    kvbm = config.kvbm_config(geometry.block_size)
    store = open_store(config, geometry, 0, world_size)
    buffer = EventBuffer()
    events = FanoutSink([buffer, publisher_for(kvbm)])
    try:
        ledger = TierLedger.build(
            kvbm, geometry.block_bytes, events, shared=store is not None, world_size=world_size
        )
        node = (
            attach_node_tier(config, geometry, side="scheduler", layout=node_layout(geometry, 1))
            if kvbm.node_cache is not None
            else None
        )
    except BaseException:
        events.close()
        if store is not None:
            store.close()
        raise
    return FabricScheduler(config, geometry, store, ledger, events=(events, buffer), node=node)


def build_worker(
    config: ConnectorConfig,
    geometry: PageGeometry,
    layer_names: list[str],
    rank: int = 0,
    world_size: int = 1,
) -> FabricWorker:
    """The worker side of tensor-parallel ``rank``: its own shard in every tier (its node link
    is attached once vLLM registers its pages)."""
    check_node_supported(config, world_size)
    store = open_store(config, geometry, rank, world_size)
    return FabricWorker(config, geometry, layer_names, store, rank)


def _tensor_parallel_rank() -> int:
    """This worker's tensor-parallel rank (vLLM's distributed state is set up by now)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


_HIT_SOURCES = {Tier.HOST: CacheHitSource.HOST, Tier.NODE: CacheHitSource.HOST}
"""vLLM's ``prompt_tokens_by_source`` of our tiers: host memory (G2, the node tier) is
``host``; the others (G3, G4) are ``disk``."""


def to_vllm_event(event: KvEvent) -> KVCacheEvent:
    """One of our events as vLLM's (its wire format, with our tier's ``medium``)."""
    from vllm.distributed import kv_events

    if isinstance(event, AllCleared):
        return kv_events.AllBlocksCleared()
    if isinstance(event, BlockRemoved):
        return kv_events.BlockRemoved(
            block_hashes=list(event.sequence_hashes), medium=event.tier.medium
        )
    return kv_events.BlockStored(
        block_hashes=list(event.sequence_hashes),
        parent_block_hash=event.parent_hash,
        token_ids=list(event.token_ids or ()),
        block_size=event.block_size,
        lora_id=None,
        medium=event.tier.medium,
        lora_name=None,
    )


class FabricConnector(KVConnectorBase_V1):
    """KV Fabric under vLLM: disk-tier offload and prefix hits, P/D through the fabric."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if kv_cache_config is None:
            raise ConfigError("FabricConnector needs vLLM's KVCacheConfig (vLLM 0.32 or newer)")
        parallel = vllm_config.parallel_config
        world_size = int(parallel.tensor_parallel_size)
        if parallel.pipeline_parallel_size > 1:
            raise ConfigError(
                "FabricConnector does not support pipeline parallelism, got "
                f"PP={parallel.pipeline_parallel_size}"
            )
        config = ConnectorConfig.from_vllm(self._kv_transfer_config)
        if config.served_model_name is None:
            config = dataclasses.replace(config, served_model_name=served_model_name(vllm_config))
        self.config = config
        self.geometry = PageGeometry.from_vllm(
            vllm_config, kv_cache_config, model_id=self.config.model_id
        )
        policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute")
        if policy != "recompute":
            logger.warning(
                "kv_load_failure_policy=%r: a failed fabric load fails its request; set "
                '"kv_load_failure_policy": "recompute" to recompute the blocks instead',
                policy,
            )
        self._scheduler: FabricScheduler | None = None
        self._worker: FabricWorker | None = None
        if role is KVConnectorRole.SCHEDULER:
            self._scheduler = build_scheduler(self.config, self.geometry, world_size)
        else:
            layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
            rank = _tensor_parallel_rank() if world_size > 1 else 0
            self._worker = build_worker(self.config, self.geometry, layer_names, rank, world_size)
        logger.info(
            "fabric connector (%s, %s): tiers %s, G4 %s, node tier %s, P/D %s, compat %016x, "
            "%d-byte blocks",
            role.name.lower(),
            self.config.kv_role.value,
            dict(self.config.tier_settings) or "from the environment",
            self.config.disk_path or "off",
            self.config.kvbm_config(self.geometry.block_size).node_cache or "off",
            self.config.etcd_endpoints or "off",
            self.geometry.compat_hash,
            self.geometry.block_bytes,
        )

    @property
    def scheduler(self) -> FabricScheduler:
        if self._scheduler is None:
            raise ConfigError("this FabricConnector is the worker-side instance")
        return self._scheduler

    @property
    def worker(self) -> FabricWorker:
        if self._worker is None:
            raise ConfigError("this FabricConnector is the scheduler-side instance")
        return self._worker

    def stats(self) -> dict[str, int | float]:
        """This side's counters (``SchedulerStats``, or ``WorkerStats`` and the producer's
        ``HoldCounts``) as a dict."""
        if self._scheduler is not None:
            return dict(self._scheduler.stats_dict())
        return self.worker.stats_dict()

    @property
    def requires_kv_delivery(self) -> bool:
        return self.config.pd_enabled and self.config.kv_role.produces

    # ---- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.progress()  # loads complete inside start_load_kv; a held read moves here

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: Any,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        self.worker.progress()  # whole blocks (every layer) are saved in wait_for_save

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, receiving = self.worker.get_finished(finished_req_ids)
        return sending or None, receiving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """The worker's NIXL transfers since the last step (``telemetry``); None on the
        scheduler side and when there were none."""
        if self._worker is None:
            return None
        rows = self._worker.transfers.take()
        return FabricTransferStats(data={"nixl": rows}) if rows else None

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return FabricTransferStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics | None:
        """The fabric's NIXL series in vLLM's ``/metrics`` (``telemetry``)."""
        return FabricPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.build_worker_meta()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    def _meta(self) -> FabricMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, FabricMetadata), f"unexpected metadata {type(meta).__name__}"
        return meta

    # ---- scheduler side ----------------------------------------------------------------------

    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        return

    def has_pending_push_work(self) -> bool:
        """Keep vLLM stepping while prefills held in the host tier wait for their consumers:
        vLLM freed those requests, and the worker polls its agent only when called."""
        return self.scheduler.has_host_holds

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.bind_kv_cache_manager(kv_cache_manager)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        (block_ids,) = blocks.get_block_ids()
        self.scheduler.update_state_after_alloc(request, block_ids, num_external_tokens)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        params = request.kv_transfer_params or {}
        if "remote_request_id" in params and self.config.kv_role.consumes:
            return {CacheHitSource.P2P: num_external_tokens}
        sources: dict[CacheHitSource, int] = {}
        for tier, tokens in self.scheduler.hit_sources(request.request_id).items():
            source = _HIT_SOURCES.get(tier, CacheHitSource.DISK)
            sources[source] = sources.get(source, 0) + tokens
        return sources or {CacheHitSource.DISK: num_external_tokens}

    def take_events(self) -> list[KVCacheEvent]:
        """The host and disk tiers' KV events since the last call, as vLLM's events."""
        return [to_vllm_event(e) for e in self.scheduler.take_events()]

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        self.scheduler.update_connector_output(
            set(connector_output.invalid_block_ids or ()),
            meta.report if isinstance(meta, FabricWorkerMeta) else None,
        )

    def request_finished(
        self, request: Request, block_ids: Any
    ) -> tuple[bool, dict[str, Any] | None]:
        if block_ids and isinstance(block_ids[0], list | tuple):
            (block_ids,) = block_ids
        return self.scheduler.request_finished(request, list(block_ids))
