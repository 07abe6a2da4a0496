"""The connector's scheduler side: prefix lookups, load plans, offload plans, P/D holds.

Runs in vLLM's scheduler (engine core) process. It never touches KV bytes: it decides, per
request and per step, what the worker side must load, save, read or hold, and hands that over
as ``FabricMetadata`` (``build_connector_meta``). With a host tier configured it owns the
connector's ``TierLedger`` (the G2 / G3 pools) and applies the worker's job reports
(``update_connector_output``). State per request::

    get_num_new_matched_tokens ──▶ lookup (local hit, external tokens: G2, G3, the node tier,
        │                          G4, in that order, or a peer; G2 / G3 blocks pinned)
        │ (vLLM allocates)
    update_state_after_alloc ──▶ tracked (+ TierLoads, NodeLoad, DiskLoad or PeerRead for the
        │                                 next meta)
        │ every step: blocks that became full ──▶ TierSave to G2 (+ TierWrites down to G3 / G4),
        │                                         or, without G2, DiskSave to G4; and NodeSave
        │                                         to the node tier
    request_finished ──▶ untracked (+ PeerHold queued when a decode instance will read it);
                         its KV trace (``traces``) returned as ``fabric_stats`` and logged

vLLM's rules kept here: hits are whole blocks; a synchronous (disk) hit never covers the last
prompt token, which must be computed to sample the next one; an asynchronous (peer) load may
cover the whole prompt, vLLM then recomputes the last token itself; ``get_num_new_matched_tokens``
only memoises (it may be called repeatedly). A block is saved once every token in it was known
when it was scheduled (async scheduling schedules a token before it is sampled), so its bytes
are final by the end of that step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fabric.integrations.vllm.config import ConnectorConfig
from fabric.integrations.vllm.jobs import JobReport, NodeLoad
from fabric.integrations.vllm.metadata import (
    DiskLoad,
    FabricMetadata,
    PeerHold,
    PeerRead,
    token_digest,
)
from fabric.integrations.vllm.node import NodeAttachment
from fabric.integrations.vllm.pages import PageGeometry
from fabric.integrations.vllm.saves import FullRun, disk_save, node_saves, tier_saves
from fabric.integrations.vllm.stats import SchedulerStats
from fabric.integrations.vllm.tiers import EventBuffer, TierHit, TierLedger
from fabric.integrations.vllm.traces import TIER_TO_SOURCE, RequestTraces
from fabric.kvbm import EventSink, KvEvent, SequenceHash, SharedBlockStore, Tier, hash_token_blocks
from fabric.signal.kv_trace import KvSource

logger = logging.getLogger(__name__)

_PEER_PARAMS = ("remote_worker_id", "remote_request_id", "remote_num_tokens")


@dataclass(slots=True)
class _Lookup:
    """What ``get_num_new_matched_tokens`` answered for a request (memoised for alloc):
    ``hit`` holds the pinned G2 / G3 blocks, which come before the ``num_node`` blocks the node
    tier held, which come before the G4 ones."""

    num_local_tokens: int
    num_external_tokens: int
    from_peer: bool
    hit: TierHit | None = None
    num_node: int = 0


@dataclass(slots=True)
class _Tracked:
    """A request between admission and finish: its hashes so far and blocks already offered."""

    request: Any
    num_offered_blocks: int = 0
    recheck_until: int = 0
    """Blocks below this index are offered even if the store's index claims them (reloads)."""


class FabricScheduler:
    """Scheduler-side logic of ``FabricConnector`` (module docstring)."""

    def __init__(
        self,
        config: ConnectorConfig,
        geometry: PageGeometry,
        store: SharedBlockStore | None,
        ledger: TierLedger | None = None,
        *,
        events: tuple[EventSink, EventBuffer] | None = None,
        node: NodeAttachment | None = None,
    ) -> None:
        self.config = config
        self.geometry = geometry
        self.block_size = geometry.block_size
        self.stats = SchedulerStats()
        self.traces = RequestTraces(
            geometry.block_size, KvSource.PEER if config.kv_role.produces else KvSource.PREFILL
        )
        """Each request's KV trace (``traces``), returned and logged when it finishes."""
        self._store = store
        self._ledger = ledger
        self._events = events
        self._node = node
        self._sources: dict[str, dict[Tier, int]] = {}
        self._seed = geometry.hash_seed
        self._compat = geometry.compat_hash
        self._kv_cache_manager: Any = None
        self._lookups: dict[str, _Lookup] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._hash_cache: dict[str, list[SequenceHash]] = {}
        self._meta = FabricMetadata()
        self._host_holds: set[int] = set()
        """Job ids of holds kept in the host tier and not yet reported freed by the workers."""

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        self._kv_cache_manager = kv_cache_manager

    # ---- lookups -----------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """External tokens beyond the ``num_computed_tokens`` vLLM holds locally (block-aligned).

        Returns ``(n, True)`` for a prefill a producer holds for us (asynchronous read),
        ``(n, False)`` for a hit below G1 (G2, G3, the node tier, G4: loaded before the step's
        forward), ``(0, False)`` otherwise.
        """
        req_id = request.request_id
        self._forget_lookup(req_id)
        self.traces.looked_up(req_id, num_computed_tokens)
        peer = self._peer_params(request)
        if peer is not None:
            remote_tokens = min(int(peer["remote_num_tokens"]), request.num_prompt_tokens)
            num = remote_tokens - num_computed_tokens
            if num <= 0:
                return 0, False
            self._lookups[req_id] = _Lookup(num_computed_tokens, num, from_peer=True)
            return num, True
        no_tier = self._store is None and self._ledger is None and self._node is None
        if no_tier or not self.config.load_blocks:
            return 0, False
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs  # the last token is always computed
        first = num_computed_tokens // bs
        if first >= max_blocks:
            return 0, False
        hashes = self._hashes(req_id, request.all_token_ids, max_blocks)[first:max_blocks]
        hit = self._ledger.match(hashes) if self._ledger is not None else None
        num_tier = hit.num_blocks if hit is not None else 0
        rest = hashes[num_tier:]
        num_node = self._node.link.prefix_length(rest) if self._node is not None and rest else 0
        rest = rest[num_node:]
        num_shared = self._store.prefix_length(rest) if self._store and rest else 0
        self.stats.num_lookups += 1
        if num_tier + num_node + num_shared == 0:
            if hit is not None:
                self._ledger_release(hit)
            return 0, False
        num = (num_tier + num_node + num_shared) * bs
        self._lookups[req_id] = _Lookup(
            num_computed_tokens, num, from_peer=False, hit=hit, num_node=num_node
        )
        logger.debug(
            "request %s: %d tokens hit below G1 (%d blocks in G2/G3, %d in the node tier, "
            "%d in G4)",
            req_id,
            num,
            num_tier,
            num_node,
            num_shared,
        )
        return num, False

    def _forget_lookup(self, req_id: str) -> None:
        """Drop a memoised lookup, unpinning its G2 / G3 blocks."""
        lookup = self._lookups.pop(req_id, None)
        if lookup is not None and lookup.hit is not None:
            self._ledger_release(lookup.hit)

    def _ledger_release(self, hit: TierHit) -> None:
        assert self._ledger is not None
        self._ledger.release_hit(hit)

    def _peer_params(self, request: Any) -> dict[str, Any] | None:
        """The request's P/D params when this instance should read its prefill from a peer."""
        params: dict[str, Any] | None = request.kv_transfer_params
        if not (self.config.pd_enabled and self.config.kv_role.consumes and params):
            return None
        if not params.get("do_remote_prefill"):
            return None
        if any(params.get(k) is None for k in _PEER_PARAMS):
            logger.warning(
                "request %s: kv_transfer_params lack %s; computing the prompt locally",
                request.request_id,
                [k for k in _PEER_PARAMS if params.get(k) is None],
            )
            return None
        compat = params.get("remote_compat_hash")
        if compat is not None and compat != f"{self._compat:016x}":
            logger.warning(
                "request %s: the producer's KV is incompatible (compat %s, ours %016x); "
                "computing the prompt locally",
                request.request_id,
                compat,
                self._compat,
            )
            return None
        return params

    def _hashes(self, req_id: str, tokens: Any, num_blocks: int) -> list[SequenceHash]:
        """The first ``num_blocks`` chained hashes of ``tokens`` (memoised and extended)."""
        cached = self._hash_cache.setdefault(req_id, [])
        if len(cached) < num_blocks:
            bs = self.block_size
            parent = cached[-1] if cached else None
            more = hash_token_blocks(
                list(tokens[len(cached) * bs : num_blocks * bs]),
                bs,
                seed=self._seed,
                parent=parent,
            ).sequence_hashes
            cached.extend(more)
        return cached[:num_blocks]

    # ---- allocation --------------------------------------------------------------------------

    def update_state_after_alloc(
        self, request: Any, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """Plan the load vLLM agreed to (``num_external_tokens``) into ``block_ids``."""
        req_id = request.request_id
        self._tracked.setdefault(req_id, _Tracked(request))
        lookup = self._lookups.pop(req_id, None)
        hit = lookup.hit if lookup is not None else None
        bs = self.block_size
        if self._peer_params(request) is not None:
            self._plan_peer_read(request, block_ids, num_external_tokens, lookup)
            return
        if num_external_tokens <= 0 or lookup is None or lookup.from_peer:
            if hit is not None:
                self._ledger_release(hit)
            self.traces.planned(req_id, request.num_prompt_tokens, [])
            return
        first = lookup.num_local_tokens // bs
        num = num_external_tokens // bs
        ids = block_ids[first : first + num]
        num_tier = 0
        sources: dict[Tier, int] = {}
        traced: list[tuple[KvSource, int, tuple[int, ...]]] = []
        if hit is not None:
            assert self._ledger is not None
            num_tier = min(hit.num_blocks, num)
            for load in self._ledger.plan_loads(req_id, hit, ids, num_tier):
                self._meta.tier_loads.append(load)
                sources[load.tier] = sources.get(load.tier, 0) + len(load.block_ids) * bs
                traced.append((TIER_TO_SOURCE[load.tier], len(load.block_ids) * bs, load.block_ids))
        num_node = min(lookup.num_node, num - num_tier)
        hashes = self._hashes(req_id, request.all_token_ids, first + num)
        if num_node:
            end = num_tier + num_node
            self._meta.node_loads.append(
                NodeLoad(
                    req_id, tuple(ids[num_tier:end]), tuple(hashes[first + num_tier : first + end])
                )
            )
            sources[Tier.NODE] = num_node * bs
            traced.append((KvSource.NODE, num_node * bs, tuple(ids[num_tier:end])))
        if num > num_tier + num_node:
            start = num_tier + num_node
            self._meta.loads.append(
                DiskLoad(req_id, tuple(ids[start:]), tuple(hashes[first + start :]))
            )
            sources[Tier.SHARED] = (num - start) * bs
            traced.append((KvSource.G4, (num - start) * bs, tuple(ids[start:])))
        self._sources[req_id] = sources
        self.traces.planned(req_id, request.num_prompt_tokens, traced)
        self.stats.num_host_hit_tokens += sources.get(Tier.HOST, 0)
        self.stats.num_local_disk_hit_tokens += sources.get(Tier.DISK, 0)
        self.stats.num_node_hit_tokens += sources.get(Tier.NODE, 0)
        self.stats.num_disk_hit_tokens += sources.get(Tier.SHARED, 0)

    def _plan_peer_read(
        self, request: Any, block_ids: list[int], num_external_tokens: int, lookup: _Lookup | None
    ) -> None:
        """Plan reading the prefill a producer holds for ``request`` (or, after a full local
        hit, only telling it to free its blocks)."""
        params = request.kv_transfer_params
        params["do_remote_prefill"] = False  # one transfer per request, even if retried
        loads: list[tuple[KvSource, int, tuple[int, ...]]] = []
        if num_external_tokens > 0 and lookup is not None and lookup.from_peer:
            bs = self.block_size
            first = lookup.num_local_tokens // bs
            end = -(-(lookup.num_local_tokens + num_external_tokens) // bs)
            read = self._peer_read(request, params, first, tuple(block_ids[first:end]))
            self.stats.num_peer_reads += 1
            loads.append((self.traces.remote_source, num_external_tokens, read.block_ids))
        else:  # a full local hit: nothing to read, but the producer may free its blocks
            read = self._peer_read(request, params, 0, ())
        self._meta.reads.append(read)
        worker = read.remote_worker_id if loads else ""
        self.traces.planned(
            request.request_id, request.num_prompt_tokens, loads, prefill_worker=worker
        )

    def stats_dict(self) -> dict[str, int | float]:
        """``SchedulerStats`` and the tier jobs still in flight."""
        jobs = self._ledger.num_jobs if self._ledger is not None else 0
        return {**self.stats.as_dict(), "tier_jobs_in_flight": jobs}

    def hit_sources(self, req_id: str) -> dict[Tier, int]:
        """Tokens of the request's last planned load by source tier (taken once)."""
        return self._sources.pop(req_id, {})

    def _peer_read(
        self, request: Any, params: dict[str, Any], first: int, block_ids: tuple[int, ...]
    ) -> PeerRead:
        num_tokens = min(int(params["remote_num_tokens"]), request.num_prompt_tokens)
        return PeerRead(
            request_id=request.request_id,
            remote_worker_id=str(params["remote_worker_id"]),
            remote_request_id=str(params["remote_request_id"]),
            token_ids=tuple(request.prompt_token_ids[:num_tokens]),
            first_block=first,
            block_ids=block_ids,
            report=bool(block_ids),
        )

    # ---- per step ----------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> FabricMetadata:
        """This step's loads, reads and holds, plus the saves of blocks it completes."""
        saving = self._ledger is not None or self._store is not None or self._node is not None
        if self.config.save_blocks and saving:
            runs = self._full_runs(scheduler_output)
            if self._node is not None:
                self._meta.node_saves.extend(node_saves(runs))
                self.stats.num_node_save_blocks += sum(len(run.block_ids) for run in runs)
            if self._ledger is not None:
                saves, writes = tier_saves(runs, self._ledger)
                self._meta.tier_saves.extend(saves)
                self._meta.tier_writes.extend(writes)
                self.stats.num_save_blocks += sum(len(save.block_ids) for save in saves)
            elif self._store is not None and (save := disk_save(runs, self._store)) is not None:
                self._meta.saves.append(save)
                self.stats.num_save_blocks += len(save.block_ids)
        meta, self._meta = self._meta, FabricMetadata()
        return meta

    def _full_runs(self, scheduler_output: Any) -> list[FullRun]:
        """The runs of the scheduled requests whose full blocks by the end of this step go
        beyond those already offered (``saves``); they count as offered from now on."""
        num_scheduled = scheduler_output.num_scheduled_tokens
        steps = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        steps += list(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        bs = self.block_size
        runs = []
        for req_id, num_computed in steps:
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            tokens = tracked.request.all_token_ids
            end = min(num_computed + num_scheduled.get(req_id, 0), len(tokens)) // bs
            start = tracked.num_offered_blocks
            if end <= start:
                continue
            hashes = self._hashes(req_id, tokens, end)
            (block_ids,) = self._kv_cache_manager.get_block_ids(req_id)
            runs.append(
                FullRun(
                    tuple(block_ids[start:end]),
                    tuple(hashes[start:end]),
                    hashes[start - 1] if start else None,
                    tokens[start * bs : end * bs],
                    recheck=max(0, tracked.recheck_until - start),
                )
            )
            tracked.num_offered_blocks = end
        return runs

    def update_connector_output(
        self, invalid_block_ids: set[int], report: JobReport | None = None
    ) -> None:
        """Apply the workers' tier job ``report``; offer again the blocks of tracked requests
        that failed to load (vLLM recomputes them).

        The failed files were removed by the worker's store (corrupt) or are missing; this
        instance's store index may still name them, so the re-offer skips the ``contains``
        filter and lets the worker's ``write`` decide.
        """
        if report and self._ledger is not None:
            self._ledger.report(report)
            self._host_holds = {j for j in self._host_holds if self._ledger.is_pending(j)}
        self.stats.num_load_error_blocks += len(invalid_block_ids)
        self.traces.load_errors(invalid_block_ids)
        if not invalid_block_ids or self._kv_cache_manager is None:
            return
        for req_id, tracked in self._tracked.items():
            (block_ids,) = self._kv_cache_manager.get_block_ids(req_id)
            upto = min(tracked.num_offered_blocks, len(block_ids))
            failed = [i for i in range(upto) if block_ids[i] in invalid_block_ids]
            if failed:
                tracked.recheck_until = max(tracked.recheck_until, tracked.num_offered_blocks)
                tracked.num_offered_blocks = failed[0]

    # ---- finish ------------------------------------------------------------------------------

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any]]:
        """Untrack the request; hold its blocks when a decode instance will read them; end
        its KV trace.

        Returns ``(delay_free, kv_transfer_params)`` as vLLM expects: the P/D handoff's params
        when held, and always ``fabric_stats``, the request's trace (``traces``).
        """
        delay_free, params = self._hand_over(request, block_ids)
        stats = self.traces.finished(request.request_id)
        return delay_free, {**(params or {}), "fabric_stats": stats}

    def _hand_over(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        req_id = request.request_id
        self._tracked.pop(req_id, None)
        self._hash_cache.pop(req_id, None)
        self._sources.pop(req_id, None)
        self._forget_lookup(req_id)
        params = request.kv_transfer_params
        if self._peer_params(request) is not None:  # finished before it was ever scheduled
            params["do_remote_prefill"] = False
            self._meta.reads.append(self._peer_read(request, params, 0, ()))
            return False, None
        if not (self.config.pd_enabled and self.config.kv_role.produces and params):
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if request.status not in (
            RequestStatus.FINISHED_LENGTH_CAPPED,
            RequestStatus.FINISHED_STOPPED,
        ):
            return False, None  # aborted: nothing to hand over
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        num_blocks = -(-num_tokens // self.block_size)
        held = tuple(block_ids[:num_blocks])
        if not held or len(held) < num_blocks:
            return False, None
        scratch = self._ledger.plan_hold(num_blocks) if self._ledger is not None else None
        job_id, host_ids = scratch if scratch is not None else (0, ())
        self._meta.holds.append(
            PeerHold(
                request_id=req_id,
                block_ids=held,
                num_tokens=num_tokens,
                token_digest=token_digest(request.prompt_token_ids[:num_tokens]),
                timeout_s=self.config.hold_timeout_s,
                host_ids=host_ids,
                job_id=job_id,
            )
        )
        self.stats.num_holds += 1
        self.stats.num_host_holds += bool(host_ids)
        if host_ids:
            self._host_holds.add(job_id)
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_worker_id": self.config.fabric_worker_id,
            "remote_request_id": req_id,
            "remote_block_ids": list(held),
            "remote_num_tokens": num_tokens,
            "remote_compat_hash": f"{self._compat:016x}",
        }

    @property
    def has_host_holds(self) -> bool:
        """Prefills held in the host tier for a consumer: vLLM freed their requests, so the
        engine must keep stepping (``has_pending_push_work``) for the worker to serve and
        release them."""
        return bool(self._host_holds)

    def take_events(self) -> list[KvEvent]:
        """The tiers' KV events since the last call (for vLLM's own event stream)."""
        return self._events[1].take() if self._events is not None else []

    def shutdown(self) -> None:
        """Close the disk store (the worker side closes its own), the ledger, the node link and
        the event publisher; idempotent."""
        for req_id in list(self._lookups):
            self._forget_lookup(req_id)
        if self._ledger is not None:
            self._ledger.close()
        self._host_holds.clear()
        if self._node is not None:
            self._node.close()
            self._node = None
        if self._events is not None:
            self._events[0].close()
            self._events = None
        if self._store is not None:
            self._store.close()
            self._store = None
