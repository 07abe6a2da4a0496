"""The connector's worker side: moves KV bytes between vLLM's pages and the fabric.

Runs where vLLM's model runner runs, on its thread. Per step (``FabricMetadata``):

* ``start_load_kv``: disk loads (``SharedBlockStore.read_many`` then one scatter into the allocated
  blocks; blocks past the first miss or corrupt file become load errors), new holds, and P/D
  reads (``PeerReader``; any failure makes all of that request's blocks load errors);
* ``wait_for_save``: offload (one gather of the step's newly full blocks, then ``write`` each;
  blocks another instance wrote first are skipped by the store);
* ``get_finished``: P/D reads done this step (``finished_recving``) and holds released or expired
  (``finished_sending``, only for requests vLLM has already reported finished);
* ``take_load_errors``: the block ids that failed since the last call.

A producer polls its NIXL agent (``fabric.pd.HoldProgress``, at most once a millisecond) at
every connector call while it holds blocks for a consumer: over TCP a consumer's read moves only
while the producer's agent is polled. vLLM steps while holds exist (a request whose blocks are
held stays in its scheduler; for holds kept in the host tier the scheduler side reports
``has_pending_push_work``), calling ``start_load_kv`` / ``wait_for_save`` / ``get_finished``
every step (about every millisecond when nothing else runs) and ``progress`` around every
attention layer of a forward pass (``FabricConnector.wait_for_layer_load`` /
``save_kv_layer``), so a read waits at most one layer's compute between polls.

With a host tier, a ``TierMover`` holds this rank's G2 / G3 bytes: tier loads run in
``start_load_kv``, the copy-out of newly full blocks in ``wait_for_save`` (the model thread's
only share of an offload), write-downs to G3 / G4 on the mover's copy thread; finished jobs go
back to the scheduler in ``build_connector_worker_meta``.

With ``node_cache``, this rank's own ``NodeLink`` (``node``) loads node-tier hits in
``start_load_kv`` (after the G2 / G3 loads, before G4's; blocks the node no longer holds are
load errors) and stores each step's newly full blocks in ``wait_for_save``, straight from
vLLM's pages (one copy into the shared segment each way).

Loads and reads are synchronous: they complete inside ``start_load_kv`` (vLLM calls it before
the forward pass for disk hits and after it for P/D reads), so a load error is always reported in
the step that detected it and before vLLM could use the block. P/D pieces (NIXL agent, etcd
registry, producer endpoint, peer reader) are built in ``register_kv_caches`` once the pages are
known; the disk store is opened at construction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import torch

from fabric.discovery.addresses import resolve_addresses, ucx_net_devices
from fabric.discovery.registration import WorkerRegistration
from fabric.errors import FabricError, StorageError
from fabric.integrations.vllm.config import ConnectorConfig
from fabric.integrations.vllm.consumer import PeerReader
from fabric.integrations.vllm.discovery import instance_record, rank_worker_id
from fabric.integrations.vllm.jobs import NodeLoad, NodeSave, TierLoad, TierSave
from fabric.integrations.vllm.metadata import (
    DiskLoad,
    DiskSave,
    FabricMetadata,
    FabricWorkerMeta,
    PeerHold,
    PeerRead,
)
from fabric.integrations.vllm.mover import TierMover
from fabric.integrations.vllm.node import NodeAttachment, attach_node_tier, node_storage
from fabric.integrations.vllm.pages import KvPages, PageGeometry
from fabric.integrations.vllm.producer import ProducerEndpoint, hold_table
from fabric.integrations.vllm.stats import WorkerStats
from fabric.integrations.vllm.telemetry import TransferTally
from fabric.kvbm import SharedBlockStore, Storage, Tier
from fabric.pd import HoldProgress

logger = logging.getLogger(__name__)

_LOAD_BATCH_BLOCKS = 64  # bounds the staging buffer of one disk load (64 * block_bytes)


class FabricWorker:
    """Worker-side logic of ``FabricConnector`` (module docstring)."""

    def __init__(
        self,
        config: ConnectorConfig,
        geometry: PageGeometry,
        layer_names: Sequence[str],
        store: SharedBlockStore | None,
        rank: int = 0,
    ) -> None:
        self.config = config
        self.rank = rank
        """This worker's tensor-parallel rank: P/D goes rank to rank (``rank_worker_id``)."""
        self.geometry = geometry
        self.stats = WorkerStats()
        self._layer_names = list(layer_names)
        self._store = store
        self._mover: TierMover | None = None
        self._node: NodeAttachment | None = None
        self._node_pages: Storage | None = None
        self._pages: KvPages | None = None
        self._stack = ExitStack()
        self._holds = hold_table(read_timeout_s=config.read_timeout_s)
        self._producer: ProducerEndpoint | None = None
        self._progress: HoldProgress | None = None
        self._reader: PeerReader | None = None
        self._load_errors: set[int] = set()
        self.transfers = TransferTally()
        """The NIXL agent's transfers since vLLM last took them (``telemetry``)."""
        self._received: set[str] = set()
        self._finished_ids: set[str] = set()
        self._freed: list[str] = []

    # ---- setup -------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Adopt vLLM's KV tensors; with ``node_cache``, present them to the node tier (refused
        with the reason for a layout it cannot hold); with P/D on, register them with NIXL and
        join etcd."""
        self._pages = KvPages.from_kv_caches(self.geometry, kv_caches, self._layer_names)
        if self.config.kvbm_config(self.geometry.block_size).node_cache is not None:
            node_pages = node_storage(self._pages)
            self._node = attach_node_tier(
                self.config, self.geometry, side=f"rank{self.rank}", layout=node_pages.layout
            )
            self._node_pages = node_pages
        kvbm_config = self.config.kvbm_config(self.geometry.block_size)
        if kvbm_config.tier_blocks(Tier.HOST, self.geometry.block_bytes):
            self._mover = TierMover.build(kvbm_config, self._pages.layout_spec(), self._store)
            if self._mover is not None:
                self._mover.attach(self._pages.storage())
        if self.config.pd_enabled:
            try:
                self._start_pd(self._pages)
            except BaseException:
                self._stack.close()
                raise

    def _start_pd(self, pages: KvPages) -> None:
        from fabric.discovery.etcd import EtcdRegistry
        from fabric.transfer.nixl_agent import NixlAgent

        config = self.config
        addresses = resolve_addresses(
            config.signal_host, config.advertise_host, config.etcd_endpoints or ""
        )
        if config.http_url is not None:  # a server on 0.0.0.0: its record names the host
            config = dataclasses.replace(config, http_url=addresses.published(config.http_url))
        kvbm = config.kvbm_config(self.geometry.block_size)
        stream, replay = kvbm.events_endpoint, kvbm.events_replay_endpoint
        events = (
            addresses.published(stream) if stream is not None else None,
            addresses.published(replay) if replay is not None else None,
        )
        if self.rank:  # a rank's own record: not routable (no http), no events (the scheduler's)
            worker_id = rank_worker_id(config.fabric_worker_id, self.rank)
            config = dataclasses.replace(config, worker_id=worker_id, http_url=None)
            events = (None, None)
        worker_id = config.fabric_worker_id
        devices = ucx_net_devices(addresses.host)
        if devices is not None:  # the agent's UCX address: the interface peers reach
            os.environ.setdefault("UCX_NET_DEVICES", devices)
        storage = pages.storage()
        self.transfers.start()
        self._stack.callback(self.transfers.stop)  # after the agent closed (LIFO)
        agent = NixlAgent(f"{worker_id}-{os.getpid()}")
        self._stack.callback(agent.close)
        agent.register(storage.buffers())
        storages: dict[Tier, Storage] = {Tier.DEVICE: storage}
        if self._mover is not None and config.kv_role.produces:  # holds served from the host
            storages[Tier.HOST] = self._mover.storage(Tier.HOST)
            agent.register(storages[Tier.HOST].buffers())
        registry = EtcdRegistry(config.etcd_endpoints or "", timeout_s=config.peer_timeout_s)
        self._stack.callback(registry.close)
        if config.kv_role.produces:
            self._producer = ProducerEndpoint(
                worker_id=worker_id,
                compat_hash=self.geometry.compat_hash,
                agent=agent,
                storages=storages,
                holds=self._holds,
                signal_host=config.signal_host,
            )
            self._stack.callback(self._producer.close)
            self._progress = HoldProgress(agent, self._holds)
        if config.kv_role.consumes:
            self._reader = PeerReader(
                worker_id=worker_id,
                compat_hash=self.geometry.compat_hash,
                agent=agent,
                storage=storage,
                registry=registry,
                namespace=config.namespace,
                peer_timeout_s=config.peer_timeout_s,
                read_timeout_s=config.read_timeout_s,
                rank=self.rank,
            )
            self._stack.callback(self._reader.close)
        record = instance_record(
            config,
            self.geometry,
            signal_endpoint=(
                addresses.advertise(self._producer.endpoint) if self._producer is not None else None
            ),
            agent_name=agent.name,
            started_at=time.time(),
            events=events,
        )
        if record is not None:
            # Closed first (LIFO): the record leaves etcd before the endpoints stop.
            registration = WorkerRegistration(
                registry, record, ttl_s=config.registration_ttl_s, namespace=config.namespace
            ).start()
            self._stack.callback(registration.close)
            logger.info(
                "registered %s as %s in %r (endpoints %s)",
                record.worker_id,
                record.role.value,
                config.namespace,
                record.endpoints.to_json(),
            )

    @property
    def pages(self) -> KvPages:
        if self._pages is None:
            raise FabricError("vLLM has not registered its KV caches with the connector yet")
        return self._pages

    def stats_dict(self) -> dict[str, int | float]:
        """``WorkerStats``, the hold table's counts and the producer's agent polls."""
        polls = self._progress.num_polls if self._progress is not None else 0
        return {**self.stats.as_dict(), **self._holds.counts.as_dict(), "num_hold_polls": polls}

    def progress(self) -> None:
        """Poll the NIXL agent if blocks are held for a consumer (model thread only; paced)."""
        if self._progress is not None:
            self._progress.maybe_progress()

    @property
    def num_holds(self) -> int:
        """Prefills this producer still holds for a consumer (not released nor expired; their
        blocks are freed at the instance's next step)."""
        return self._holds.num_active

    # ---- loads -------------------------------------------------------------------------------

    def start_load_kv(self, meta: FabricMetadata) -> None:
        self.progress()
        began = time.perf_counter()
        for hold in meta.holds:
            self._hold(hold)
        for tier_load in meta.tier_loads:
            self._load_from_tier(tier_load)
        for node_load in meta.node_loads:
            self._load_from_node(node_load)
        for load in meta.loads:
            self._load_from_disk(load)
        self.stats.load_ms_model_thread += (time.perf_counter() - began) * 1000
        for read in meta.reads:
            self._read_from_peer(read)

    def _hold(self, hold: PeerHold) -> None:
        """Hold a finished prefill for a consumer: in the host tier when the scheduler gave host
        blocks (copied here, before this step's forward pass can reuse vLLM's; vLLM may then
        free its blocks), else in vLLM's blocks."""
        if hold.host_ids:
            if self._mover is None or self._producer is None:
                logger.warning("request %s: a host hold without a host tier", hold.request_id)
                if self._mover is not None:
                    self._mover.mark_done(hold.job_id)
                hold = dataclasses.replace(hold, host_ids=())
            else:
                self._mover.save(TierSave(hold.block_ids, hold.host_ids))
                self._freed.append(hold.request_id)  # vLLM's blocks are no longer needed
        self._holds.hold(
            hold.request_id,
            hold,
            num_blocks=len(hold.block_ids),
            deadline=time.monotonic() + hold.timeout_s,
        )

    def _load_from_tier(self, load: TierLoad) -> None:
        if self._mover is None:
            logger.warning("request %s: a tier load without a host tier", load.request_id)
            ok = False
        else:
            ok = not self.config.debug_fail_loads and self._mover.load(load)
        if ok:
            self.stats.num_tier_loaded_blocks += len(load.block_ids)
            return
        self._load_errors.update(load.block_ids)
        self.stats.num_load_errors += len(load.block_ids)

    def _load_from_node(self, load: NodeLoad) -> None:
        """Copy the node tier's prefix into the planned blocks; the rest are load errors (the
        node evicted them since the lookup, or it cannot serve now)."""
        num = 0
        if self._node is not None and self._node_pages is not None:
            if not self.config.debug_fail_loads:
                num = self._node.link.load(
                    load.hashes, self._node_pages, lambda m: load.block_ids[:m]
                )
        else:
            logger.warning("request %s: a node load without a node tier", load.request_id)
        self.stats.num_node_loaded_blocks += num
        self._fail_loads(load.request_id, load.block_ids, num, "node-tier")

    def _save_to_node(self, save: NodeSave) -> None:
        if self._node is None or self._node_pages is None:
            return
        began = time.perf_counter()
        self.stats.num_node_stored_blocks += self._node.link.store(
            save.hashes, self._node_pages, save.block_ids, parent_hash=save.parent
        )
        self.stats.node_ms_model_thread += (time.perf_counter() - began) * 1000

    def _load_from_disk(self, load: DiskLoad) -> None:
        assert self._store is not None, "the scheduler planned a disk load without a disk tier"
        pages = self.pages
        bb = self.geometry.block_bytes
        num_ok = 0
        staging = np.empty((min(len(load.block_ids), _LOAD_BATCH_BLOCKS), bb), dtype=np.uint8)
        for start in range(0, len(load.block_ids), _LOAD_BATCH_BLOCKS):
            ids = load.block_ids[start : start + _LOAD_BATCH_BLOCKS]
            hashes = load.hashes[start : start + len(ids)]
            got = 0 if self.config.debug_fail_loads else self._store.read_many(hashes, staging)
            if got:
                pages.scatter(ids[:got], staging)
            num_ok += got
            if got < len(ids):
                break
        self.stats.num_loaded_blocks += num_ok
        self._fail_loads(load.request_id, load.block_ids, num_ok, "disk-tier")

    def _fail_loads(
        self, request_id: str, block_ids: tuple[int, ...], num_loaded: int, source: str
    ) -> None:
        """Report ``block_ids`` past the first ``num_loaded`` as load errors (recomputed)."""
        failed = block_ids[num_loaded:]
        if not failed:
            return
        self._load_errors.update(failed)
        self.stats.num_load_errors += len(failed)
        logger.warning(
            "request %s: %d of %d %s blocks could not be loaded; vLLM recomputes them",
            request_id,
            len(failed),
            len(block_ids),
            source,
        )

    def _read_from_peer(self, read: PeerRead) -> None:
        if self._reader is None:
            logger.warning("request %s: P/D read planned without a consumer", read.request_id)
            self._fail_read(read)
            return
        try:
            if self.config.debug_fail_loads and read.block_ids:
                raise FabricError("debug_fail_loads is set")
            num = self._reader.read(read)
        except FabricError as e:
            logger.warning(
                "request %s: reading its prefill from %s failed (%s); vLLM recomputes it",
                read.request_id,
                read.remote_worker_id,
                e,
            )
            self._fail_read(read)
            return
        self.stats.num_peer_read_blocks += num
        if read.report:
            self._received.add(read.request_id)

    def _fail_read(self, read: PeerRead) -> None:
        if not read.report:
            return
        self.stats.num_peer_read_failures += 1
        self._load_errors.update(read.block_ids)
        self.stats.num_load_errors += len(read.block_ids)
        self._received.add(read.request_id)  # failed receives are still reported received

    # ---- saves -------------------------------------------------------------------------------

    def wait_for_save(self, meta: FabricMetadata) -> None:
        self.progress()
        began = time.perf_counter()
        if self._mover is not None:
            for tier_save in meta.tier_saves:
                self._mover.save(tier_save)
                self.stats.num_tier_saved_blocks += len(tier_save.block_ids)
            for write in meta.tier_writes:
                self._mover.write(write)
                self.stats.num_tier_writes += 1
        for save in meta.saves:
            self._save_to_disk(save)
        for node_save in meta.node_saves:
            self._save_to_node(node_save)
        self.stats.save_ms_model_thread += (time.perf_counter() - began) * 1000

    def build_worker_meta(self) -> FabricWorkerMeta | None:
        """The tier jobs finished since the last step (None when there are none)."""
        if self._mover is None:
            return None
        report = self._mover.report()
        return FabricWorkerMeta(report) if report else None

    def _save_to_disk(self, save: DiskSave) -> None:
        if self._store is None:
            return
        data = self.pages.gather(save.block_ids)
        try:
            for row, h in zip(data, save.hashes, strict=True):
                self.stats.num_saved_blocks += self._store.write(h, row)
        except StorageError as e:  # a full or read-only disk costs hits, never the request
            self.stats.num_save_failures += 1
            logger.warning("offloading %d blocks failed: %s", len(save.block_ids), e)

    # ---- completions -------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """``(finished_sending, finished_recving)`` for vLLM (see the module docstring)."""
        self.progress()
        freed = set(self._freed)
        self._finished_ids |= {r for r in finished_req_ids if r in self._holds or r in freed}
        for released in self._holds.collect(time.monotonic()):
            if released.item.host_ids:  # vLLM freed its blocks already: free the host copies
                assert self._mover is not None
                self._mover.mark_done(released.item.job_id)
            else:
                self._freed.append(released.request_id)
        sending = {r for r in self._freed if r in self._finished_ids}
        if sending:
            self._freed = [r for r in self._freed if r not in sending]
            self._finished_ids -= sending
        received, self._received = self._received, set()
        return sending, received

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Free every hold, leave etcd, close NIXL, the tiers, the node link and the disk store;
        idempotent."""
        logger.info("fabric worker stats: %s", json.dumps(self.stats_dict()))  # bench vllm-offload
        self._holds.expire_all()
        self._stack.close()
        if self._node is not None:
            self._node.close()
            self._node = None
        if self._mover is not None:
            self._mover.close()
            self._mover = None
        if self._store is not None:
            self._store.close()
            self._store = None
