"""The connector's host (G2) and local disk (G3) tiers as vLLM's scheduler sees them.

vLLM keeps G1 (its block pool and prefix cache). The tiers below it are the block manager's own
``BlockPool``s (``fabric.kvbm.build_pool``: the same pools, eviction policies and disk admission
filter the reference engine uses), owned here, on the scheduler side, which decides every move;
their bytes live on the worker side (``mover.TierMover``), in storages with the same block ids.
The two sides share no memory: moves travel in ``FabricMetadata`` and come back done (or failed)
in the worker's ``FabricWorkerMeta``, by job id.

Moves, each a job::

    save   G1 -> G2   vLLM blocks that became full this step, copied out by the worker after
                      the forward pass (``TierSave``); the host blocks are registered at once
                      (the worker executes steps in order, so any later load finds the bytes)
    write  G2 -> G3   write-through on the worker's copy thread (``TierWrite``), for blocks the
                      disk admission filter admits; registered in G3 when reported done
    write  G2 -> G4   the same to the shared store, when it is configured (``TierWrite`` with
                      ``Tier.SHARED``: sequence hashes for ids)
    load   G2/G3 -> G1  a prefix hit copied into the blocks vLLM allocated, before the forward
                      pass (``TierLoad``)
    hold   G1 -> G2   a finished prefill's blocks copied into scratch host blocks and served to
                      a P/D consumer from there (``PeerHold.host_ids``); freed when reported

Invariants:

* A block a job reads is referenced (pinned) from planning until the job is reported, so no
  allocation can evict it mid-copy; a job's target blocks are allocated at planning and either
  registered (done) or released (failed), never both, never leaked.
* ``match`` pins what it returns; a lookup that vLLM does not turn into a load is released
  (``release_hit``), including a lookup repeated for the same request.
* Jobs are counted done when ``world_size`` worker ranks reported them (tensor parallel: every
  rank moves its own shard under the same ids).

Not thread-safe: vLLM's scheduler thread only.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from fabric.errors import ConfigError
from fabric.integrations.vllm.jobs import JobReport, TierLoad, TierSave, TierWrite
from fabric.kvbm import (
    BlockPool,
    EventSink,
    FrequencyFilter,
    ImmutableBlocks,
    KvbmConfig,
    KvEvent,
    MutableBlocks,
    SequenceHash,
    Tier,
    build_pool,
    register_positions,
)

logger = logging.getLogger(__name__)

LEDGER_TIERS = (Tier.HOST, Tier.DISK)
"""The pool tiers the connector adds below vLLM's G1, fastest first."""


class EventBuffer:
    """The pools' events kept until vLLM takes them (``take``: the connector's ``take_events``,
    which vLLM publishes on its own KV event stream with the G1 ones)."""

    enabled = True

    def __init__(self) -> None:
        self._events: list[KvEvent] = []

    def publish(self, events: Sequence[KvEvent]) -> None:
        self._events.extend(events)

    def take(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        self._events.clear()


@dataclass(slots=True)
class TierHit:
    """A prefix found below G1: ``by_tier[t]`` pinned blocks of tier ``t``, in prefix order
    (host first, then disk)."""

    by_tier: dict[Tier, ImmutableBlocks] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return sum(len(h) for h in self.by_tier.values())


@dataclass(slots=True)
class _Job:
    """What a reported job releases (``pinned``) and registers: on success, ``allocation``'s
    i-th block in ``target`` under ``hashes[positions[i]]`` (chained after ``parent``; its
    events carry ``tokens``, ``block_size`` per hash, when known)."""

    pinned: list[ImmutableBlocks]
    target: Tier | None = None
    allocation: MutableBlocks | None = None
    hashes: list[SequenceHash] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    parent: SequenceHash | None = None
    tokens: Sequence[int] | None = None
    reports: int = 0


class TierLedger:
    """G2 / G3 pools and the jobs in flight between them and vLLM (module docstring)."""

    def __init__(
        self,
        pools: dict[Tier, BlockPool],
        *,
        disk_filter: FrequencyFilter,
        shared: bool = False,
        world_size: int = 1,
    ) -> None:
        if Tier.HOST not in pools:
            raise ConfigError(
                "the connector's tiers start with a host tier: set cpu_cache_gb (or "
                "DYN_KVBM_CPU_CACHE_GB) to use a local disk tier"
            )
        self._pools = pools
        self._filter = disk_filter
        self._shared = shared
        self._world_size = world_size
        self._jobs: dict[int, _Job] = {}
        self._next_id = itertools.count(1)

    @classmethod
    def build(
        cls,
        config: KvbmConfig,
        block_bytes: int,
        events: EventSink,
        *,
        shared: bool,
        world_size: int = 1,
    ) -> TierLedger | None:
        """The ledger of the configured tiers (None when no host tier is configured)."""
        pools = {}
        for tier in LEDGER_TIERS:
            num_blocks = config.tier_blocks(tier, block_bytes)
            if num_blocks:
                pools[tier] = build_pool(config, tier, num_blocks, events)
        if not pools:
            return None
        return cls(
            pools,
            disk_filter=FrequencyFilter(config.disk_admit_after),
            shared=shared,
            world_size=world_size,
        )

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return tuple(t for t in LEDGER_TIERS if t in self._pools)

    def pool(self, tier: Tier) -> BlockPool:
        return self._pools[tier]

    @property
    def num_jobs(self) -> int:
        """Jobs planned and not yet reported."""
        return len(self._jobs)

    def is_pending(self, job_id: int) -> bool:
        """Job ``job_id`` was planned and not yet reported done (by every rank) or failed."""
        return job_id in self._jobs

    # -- lookups -------------------------------------------------------------------------------

    def match(self, hashes: Sequence[SequenceHash]) -> TierHit:
        """The longest prefix of ``hashes`` held in G2 then G3, pinned."""
        self._filter.observe(list(hashes))
        hit = TierHit()
        start = 0
        for tier in self.tiers:
            if start == len(hashes):
                break
            handle = self._pools[tier].match(hashes[start:])
            if len(handle):
                hit.by_tier[tier] = handle
                start += len(handle)
        return hit

    def release_hit(self, hit: TierHit) -> None:
        for tier, handle in hit.by_tier.items():
            if handle.live:
                self._pools[tier].release(handle)
        hit.by_tier.clear()

    def plan_loads(
        self, request_id: str, hit: TierHit, block_ids: Sequence[int], num_blocks: int
    ) -> list[TierLoad]:
        """Loads of the first ``num_blocks`` blocks of ``hit`` into vLLM's ``block_ids``; the
        rest of the hit is released, the loaded blocks stay pinned until reported."""
        loads: list[TierLoad] = []
        start = 0
        for tier in self.tiers:
            handle = hit.by_tier.pop(tier, None)
            if handle is None:
                continue
            take = max(0, min(len(handle), num_blocks - start))
            if take < len(handle):
                keep = self._pools[tier].retain(handle, list(range(take))) if take else None
                self._pools[tier].release(handle)
                handle = keep
            if handle is None:
                continue
            job_id = next(self._next_id)
            self._jobs[job_id] = _Job([handle])
            loads.append(
                TierLoad(
                    job_id,
                    request_id,
                    tier,
                    tuple(handle.block_ids),
                    tuple(block_ids[start : start + take]),
                )
            )
            start += take
        return loads

    # -- saves and write-downs -----------------------------------------------------------------

    def plan_save(
        self,
        block_ids: Sequence[int],
        hashes: Sequence[SequenceHash],
        parent: SequenceHash | None,
        tokens: Sequence[int] | None = None,
    ) -> tuple[TierSave | None, list[TierWrite]]:
        """Copy out vLLM's ``block_ids`` (a run of one request's consecutive full blocks, hashed
        ``hashes``, after ``parent``) to G2, then down to G3 / G4: the save of the blocks G2
        lacks (registered now) and the write-downs of the run (registered when done). Nothing
        is planned when G2 cannot take the run (every host block referenced): a miss, later.
        ``tokens`` (the run's, ``block_size`` per hash) go into every tier's ``BlockStored``
        events, for routers that index vLLM's stream by token ids."""
        host = self._pools[Tier.HOST]
        missing = [i for i, h in enumerate(hashes) if not host.contains(h)]
        if not missing:
            return None, []
        # Pin what G2 holds already, so the allocation cannot evict it, and allocate only the
        # rest: a full G2 never trades a block it still needs for a copy it already has.
        pins = [host.match([hashes[i]]) for i in range(len(hashes)) if i not in set(missing)]
        try:
            allocation = host.allocate(len(missing))
            if allocation is None:
                logger.debug("host tier full (all referenced): %d blocks not saved", len(missing))
                return None, []
            host_ids = tuple(allocation.block_ids)
            register_positions(
                host, allocation, hashes, missing, [parent, *hashes[:-1]], token_ids=tokens
            )
            save = TierSave(tuple(block_ids[i] for i in missing), host_ids)
            run = host.match(hashes)  # the whole run, pinned while its writes are planned
            writes = self._plan_writes(run, parent, tokens) if len(run) == len(hashes) else []
            host.release(run)
        finally:
            for pin in pins:
                host.release(pin)
        return save, writes

    def _plan_writes(
        self, blocks: ImmutableBlocks, parent: SequenceHash | None, tokens: Sequence[int] | None
    ) -> list[TierWrite]:
        """Write-downs of ``blocks`` (G2, referenced by the caller) to G3 and G4."""
        host = self._pools[Tier.HOST]
        hashes = blocks.sequence_hashes
        writes: list[TierWrite] = []
        disk = self._pools.get(Tier.DISK)
        if disk is not None:
            positions = [
                i for i, h in enumerate(hashes) if self._filter.admits(h) and not disk.contains(h)
            ]
            allocation = disk.allocate(len(positions)) if positions else None
            if allocation is not None:
                pinned = host.retain(blocks, positions)
                writes.append(
                    self._job(
                        _Job([pinned], Tier.DISK, allocation, hashes, positions, parent, tokens),
                        TierWrite(
                            0,
                            Tier.HOST,
                            tuple(pinned.block_ids),
                            Tier.DISK,
                            tuple(allocation.block_ids),
                        ),
                    )
                )
        if self._shared:
            pinned = host.retain(blocks)
            writes.append(
                self._job(
                    _Job([pinned]),
                    TierWrite(0, Tier.HOST, tuple(pinned.block_ids), Tier.SHARED, tuple(hashes)),
                )
            )
        return writes

    def _job(self, job: _Job, write: TierWrite) -> TierWrite:
        job_id = next(self._next_id)
        self._jobs[job_id] = job
        return dataclasses.replace(write, job_id=job_id)

    # -- P/D holds -----------------------------------------------------------------------------

    def plan_hold(self, num_blocks: int) -> tuple[int, tuple[int, ...]] | None:
        """Host blocks for a finished prefill's KV held for a consumer: ``(job id, host ids)``,
        freed when the job is reported (the hold released or expired); None when G2 cannot
        take them now."""
        allocation = self._pools[Tier.HOST].allocate(num_blocks)
        if allocation is None:
            return None
        job_id = next(self._next_id)
        self._jobs[job_id] = _Job([], allocation=allocation)
        return job_id, tuple(allocation.block_ids)

    # -- reports -------------------------------------------------------------------------------

    def report(self, report: JobReport) -> None:
        """Apply the worker ranks' merged report: ``done[job]`` ranks finished it; a ``failed``
        job (one rank could not do it) has its target released, never registered."""
        for job_id in report.failed:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                self._finish(job, ok=False)
        for job_id, ranks in report.done.items():
            job = self._jobs.get(job_id)
            if job is None:
                continue
            job.reports += ranks
            if job.reports >= self._world_size:
                del self._jobs[job_id]
                self._finish(job, ok=True)

    def _finish(self, job: _Job, *, ok: bool) -> None:
        for handle in job.pinned:
            if handle.live:
                self._pools[handle.tier].release(handle)
        if job.allocation is None:
            return
        if job.target is None:  # a hold's scratch blocks: never registered
            self._pools[job.allocation.tier].release(job.allocation)
            return
        pool = self._pools[job.target]
        if not ok:
            pool.release(job.allocation)
            return
        parents = [job.parent, *job.hashes[:-1]]
        register_positions(
            pool, job.allocation, job.hashes, job.positions, parents, token_ids=job.tokens
        )

    def close(self) -> None:
        """Forget every job in flight, releasing what it holds (shutdown)."""
        for job in self._jobs.values():
            self._finish(job, ok=False)
        self._jobs.clear()
