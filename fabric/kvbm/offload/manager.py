"""OffloadManager: asynchronous tier moves over a table of paths; bytes move off the owner thread.

One worker type serves every row of a table of ``OffloadPath(source, target, priority,
batch_size)``; its parts: ``offload_transfer`` (records), ``offload_queue`` (per-path queues),
``offload_worker`` (copy thread), ``offload_writeback`` (dirty blocks). The default table
(``build_offload_manager``; priorities in brackets)::

    DEVICE ──offload [1]──▶ HOST ──offload [0]──▶ DISK     (DEVICE ─▶ DISK [1] if there is no HOST)
      ▲ ▲                    │  └──offload [0]──▶ SHARED (DEVICE ─▶ SHARED [1] if there is no HOST)
      │ └────onboard [10]────┘                     │
      └──────onboard [10]──────────────────────────┘

G4 (SHARED) is the last tier and not a pool: a batch to it packs the source blocks and writes
one file per missing hash on the copy thread (nothing is allocated or registered; the store
indexes what it wrote). G4 hits onboard synchronously in ``KvBlockManager.match_and_onboard``
(read, verified, scattered: milliseconds per prompt); ``onboard`` here stops before them.

Threading: pools are single-owner, so every reference, allocation and registration happens on
the owner (scheduler) thread; one copy thread only runs ``copy_blocks`` on storages::

    owner thread                                              copy thread
    offload() / onboard(): take references, queue per path
    step(): collect finished copies ◀── outbox ◀───────────── copy_blocks(src ids -> dst ids)
            register them, release every reference
            dispatch: best path first, one batch per copy ─▶ inbox (by path priority) ─▶
    Onboarding.wait(t): step() until its copies are registered

A block under copy is referenced on both sides: the source is registered (immutable) and pinned
(not evictable); the target is an unregistered allocation owned by the transfer (no one matches or
writes it). Registration follows the copy, so a target block is matchable only with its bytes.
The owner feeds it: ``on_registered`` after each registration, ``step`` once per loop.

Choices. Backpressure is a value, never a wait: over ``max_queued_blocks`` an offload returns a
BUSY transfer (the owner thread must not stall; the blocks stay cached, resubmit later).
``max_in_flight`` bounds the copy batches handed to the copy thread. A target that cannot make
room (``allocate`` -> None) drops an offload (DROPPED: pinned source blocks go back at once
instead of waiting on a full tier) and cuts an onboarded prefix there (a shorter hit, never a
failed request), as ``match_and_onboard`` does. Onboards are never refused and dispatch first
(path priority, then request priority, then age). Offloads skip hashes the target holds or that
are queued or in flight to it; offloads to DISK copy only what ``kvbm.disk_filter`` admits when
they are dispatched, as ``KvBlockManager.offload`` does.

Modes (``FABRIC_OFFLOAD_MODE``): *write_through* offloads every block as it is registered;
*write_back* copies dirty blocks only under pressure (``offload_writeback``).

Invariants: a hash is queued or in flight at most once per offload target and registered there
once (the pool dedups). ``close`` drains within its bound, then cancels; a copy still running
at the deadline keeps its blocks (freeing memory a copy may still write would corrupt another
block) and ``close`` returns False.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from fabric.errors import InvalidInput, InvalidTransition, PoolExhausted, TransferError
from fabric.kvbm.config import KvbmConfig, OffloadMode
from fabric.kvbm.core.block import ImmutableBlocks
from fabric.kvbm.core.pool import register_positions
from fabric.kvbm.core.types import SequenceHash, Tier
from fabric.kvbm.manager import KvBlockManager
from fabric.kvbm.offload.copier import CopyJob, CopyThread
from fabric.kvbm.offload.moves import MoveState, OffloadPath, OffloadStats, TierMove
from fabric.kvbm.offload.queue import PathQueues
from fabric.kvbm.offload.writeback import DirtyBlocks

__all__ = [
    "OffloadManager",
    "OffloadPath",
    "OffloadStats",
    "Onboarding",
    "TierMove",
    "MoveState",
    "build_offload_manager",
]

logger = logging.getLogger(__name__)

_POLL_S = 0.05


class OffloadManager:
    """Per-path queues over ``kvbm`` and one copy thread; every method belongs to ``kvbm``'s
    owner thread. Built by ``build_offload_manager``."""

    def __init__(
        self,
        kvbm: KvBlockManager,
        *,
        paths: Sequence[OffloadPath],
        mode: OffloadMode = OffloadMode.WRITE_THROUGH,
        max_in_flight: int = 4,
        max_queued_blocks: int = 4096,
        writeback_free: float = 0.1,
        close_timeout_s: float = 5.0,
    ) -> None:
        if max_in_flight < 1 or max_queued_blocks < 1:
            raise InvalidInput("max_in_flight and max_queued_blocks must be >= 1")
        self._kvbm, self.mode, self.stats = kvbm, mode, OffloadStats()
        self._paths = sorted(paths, key=lambda p: -p.priority)
        self._queues = PathQueues(paths, max_queued_blocks)
        self._pending: dict[Tier, set[SequenceHash]] = {p.target: set() for p in paths}
        self._dirty = DirtyBlocks(kvbm, paths, writeback_free)
        self._max_in_flight = max_in_flight
        self.close_timeout_s = close_timeout_s
        self._in_flight: set[CopyJob] = set()
        self._onboardings: set[Onboarding] = set()
        self._closed = False
        self._thread = CopyThread("kvbm-offload")

    # -- submissions ---------------------------------------------------------------------------

    def offload(
        self, blocks: ImmutableBlocks, target: Tier | None = None, *, priority: int = 0
    ) -> TierMove:
        """Queue a copy of ``blocks`` (the caller keeps its handle) to ``target`` (default: the
        table's first offload path from their tier). Returns it QUEUED; DONE at once if the
        target lacks nothing; BUSY if ``max_queued_blocks`` are queued already."""
        if self._closed:
            raise InvalidTransition("the offload manager is closed")
        path = self._path(blocks.tier, target)
        hashes, pending = blocks.sequence_hashes, self._pending[path.target]
        holds, keep = self._kvbm.contains, dict[SequenceHash, int]()
        for i, h in enumerate(hashes):
            if h not in pending and h not in keep and not holds(path.target, h):
                keep[h] = i
        self.stats.num_blocks_skipped += len(hashes) - len(keep)
        if not keep or self._queues.full(len(keep)):
            state = MoveState.BUSY if keep else MoveState.DONE
            self.stats.transfers[state] += 1
            return TierMove(path, state, priority, list(keep))
        pending.update(keep)
        source = self._kvbm.pool(blocks.tier).retain(blocks, list(keep.values()))
        return self._enqueue(
            path, source, priority, [hashes[i - 1] if i else None for i in keep.values()]
        )

    def onboard(self, sequence_hashes: Sequence[SequenceHash], *, priority: int = 0) -> Onboarding:
        """Match ``sequence_hashes`` over the tiers (one use each, for the disk filter) and start
        copying the host and disk parts to the device; ``wait`` before computing on them."""
        if self._closed:
            raise InvalidTransition("the offload manager is closed")
        found = self._kvbm.match(sequence_hashes)
        device = found.by_tier.pop(Tier.DEVICE, None)
        paths = {p.source: p for p in self._paths if p.onboard}
        parts: list[TierMove] = []
        start, cut = 0 if device is None else len(device), False
        for tier in (Tier.HOST, Tier.DISK):
            handle = found.by_tier.pop(tier, None)
            if handle is None:
                continue
            cut = cut or tier not in paths  # the prefix ends before a part it cannot onboard
            if cut:
                self._kvbm.release(handle)
                continue
            parents = [
                sequence_hashes[i - 1] if i else None for i in range(start, start + len(handle))
            ]
            start += len(handle)
            parts.append(self._enqueue(paths[tier], handle, priority, parents))
        self._kvbm.release_match(found)
        onboarding = Onboarding(self, device, parts)
        self._onboardings.add(onboarding)
        self._dispatch()
        return onboarding

    def on_registered(self, blocks: ImmutableBlocks, *, priority: int = 0) -> None:
        """``blocks`` were just registered: write-through offloads them, write-back marks them
        dirty. The caller keeps its handle."""
        for path in self._paths:
            if path.source is not blocks.tier or path.onboard or self._closed:
                continue
            if self.mode is OffloadMode.WRITE_THROUGH:
                self.offload(blocks, path.target, priority=priority)
                continue
            self._dirty.mark(path, blocks.sequence_hashes)

    # -- the owner thread's loop ---------------------------------------------------------------

    def step(self) -> int:
        """Register finished copies, write back under pressure, dispatch; never blocks.
        Returns how many copy batches were collected."""
        collected = self._collect(0.0)
        if self.mode is OffloadMode.WRITE_BACK and not self._closed:
            self._write_back()
        self._dispatch()
        return collected

    @property
    def idle(self) -> bool:
        return not self._in_flight and not self._queues

    def drain(self, timeout_s: float | None = None) -> bool:
        """Step until nothing is queued or in flight; False if ``timeout_s`` passed first."""
        return self._wait_until(lambda: self.idle, timeout_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Drain within ``timeout_s`` (default ``close_timeout_s``), cancel what is left, stop the
        copy thread. False (logged) if a copy still ran at the deadline: its blocks stay held."""
        if timeout_s is None:
            timeout_s = self.close_timeout_s
        if not self._closed:
            self._closed = True
            deadline = time.monotonic() + timeout_s
            self.drain(timeout_s)
            for onboarding in list(self._onboardings):
                onboarding.cancel()
            for transfer in self._queues.take_all():
                transfer.cancel()
            for job in self._in_flight:
                for transfer in job.transfers:
                    transfer._cancelling = True
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._collect(min(left, _POLL_S))
            self._thread.stop(deadline - time.monotonic())  # after every job handed over
            if self._in_flight:
                logger.error(
                    "offload close: %d copy batches still running after %.1f s; their "
                    "blocks stay referenced",
                    len(self._in_flight),
                    timeout_s,
                )
        return not self._in_flight

    # -- internals: owner thread ---------------------------------------------------------------

    def _path(self, source: Tier, target: Tier | None) -> OffloadPath:
        for p in self._paths:
            if p.source is source and not p.onboard and target in (None, p.target):
                return p
        wanted = "any tier" if target is None else target.name
        raise InvalidInput(f"no offload path from {source.name} to {wanted} in the table")

    def _enqueue(
        self,
        path: OffloadPath,
        source: ImmutableBlocks,
        priority: int,
        parents: list[SequenceHash | None],
    ) -> TierMove:
        """Queue a transfer holding ``source`` (``parents[i]``: the hash before block i)."""
        t = TierMove(
            path,
            MoveState.QUEUED,
            priority,
            source.sequence_hashes,
            _canceller=self._cancel,
            _source=source,
            _parents=parents,
        )
        self._queues.push(t)
        return t

    def _cancel(self, transfer: TierMove) -> bool:
        if transfer.state is MoveState.IN_FLIGHT:
            transfer._cancelling = True
            return True
        if transfer.state is MoveState.QUEUED:
            self._finish(transfer, MoveState.CANCELLED)
            return True
        return False

    def _dispatch(self) -> None:
        while len(self._in_flight) < self._max_in_flight:
            if (popped := self._queues.pop_batch()) is None:
                return
            job = self._prepare(*popped)
            if job is not None:
                self._in_flight.add(job)
                self._thread.submit(job)

    def _prepare(self, path: OffloadPath, batch: list[TierMove]) -> CopyJob | None:
        """Take target references and allocations for a batch; end what needs no copy."""
        if path.target is Tier.SHARED:
            return self._prepare_shared(path, batch)
        dst = self._kvbm.pool(path.target)
        job = CopyJob(
            path, [], self._kvbm.storage(path.source), [], self._kvbm.storage(path.target), []
        )
        for t in batch:
            self._queues.unqueue(t)
            if path.target is Tier.DISK and not self._admit(t):
                continue
            t._held = dst.match_present(t.sequence_hashes)
            present = set(t._held.sequence_hashes)
            t._missing = [i for i, h in enumerate(t.sequence_hashes) if h not in present]
            if not t._missing:
                self._finish(t, MoveState.DONE)
                continue
            try:
                t._allocation = dst.allocate(len(t._missing))
            except PoolExhausted:  # larger than the whole target tier
                t._allocation = None
            if t._allocation is None:
                logger.debug(
                    "%s -> %s full: %d blocks dropped",
                    path.source.name,
                    path.target.name,
                    len(t._missing),
                )
                self._finish(t, MoveState.DROPPED)
                continue
            assert t._source is not None
            ids = t._source.block_ids
            job.src_ids += [ids[i] for i in t._missing]
            job.dst_ids += t._allocation.block_ids
            t.state = MoveState.IN_FLIGHT
            job.transfers.append(t)
        return job if job.transfers else None

    def _prepare_shared(self, path: OffloadPath, batch: list[TierMove]) -> CopyJob | None:
        """A batch to G4: the copy thread writes the blocks the store lacks (no allocation:
        files are named by hash; the source references keep the bytes in place)."""
        store = self._kvbm.shared_store
        job = CopyJob(path, [], self._kvbm.storage(path.source), [], store, [])
        for t in batch:
            self._queues.unqueue(t)
            t._missing = [i for i, h in enumerate(t.sequence_hashes) if not store.contains(h)]
            if not t._missing:
                self._finish(t, MoveState.DONE)
                continue
            assert t._source is not None
            ids = t._source.block_ids
            job.src_ids += [ids[i] for i in t._missing]
            job.dst_ids += [t.sequence_hashes[i] for i in t._missing]
            t.state = MoveState.IN_FLIGHT
            job.transfers.append(t)
        return job if job.transfers else None

    def _admit(self, t: TierMove) -> bool:
        """Keep the blocks the disk filter admits now; False (ended DONE) if it admits none."""
        admits, source = self._kvbm.disk_filter.admits, t._source
        keep = [i for i, h in enumerate(t.sequence_hashes) if admits(h)]
        assert source is not None
        if len(keep) < len(t.sequence_hashes):
            self.stats.num_blocks_filtered += len(t.sequence_hashes) - len(keep)
            self._pending[t.path.target].difference_update(t.sequence_hashes)
            t._source = self._kvbm.pool(source.tier).retain(source, keep) if keep else None
            self._kvbm.release(source)
            t.sequence_hashes = [t.sequence_hashes[i] for i in keep]
            t._parents = [t._parents[i] for i in keep]
            self._pending[t.path.target].update(t.sequence_hashes)
        if not keep:
            self._finish(t, MoveState.DONE)
        return bool(keep)

    def _collect(self, timeout_s: float) -> int:
        jobs = self._thread.collect(timeout_s)
        for job in jobs:
            self._in_flight.discard(job)
            failure = None
            if job.error is not None:
                p = job.path
                failure = TransferError(
                    f"copying {len(job.src_ids)} blocks {p.source.name} -> "
                    f"{p.target.name} failed: {job.error}"
                )
                logger.warning("%s; the blocks were returned", failure)
            for t in job.transfers:
                if t._cancelling:
                    state = MoveState.CANCELLED
                elif failure is not None:
                    t.error, state = failure, MoveState.FAILED
                else:
                    self._register(t)
                    state = MoveState.DONE
                self._finish(t, state)
        return len(jobs)

    def _register(self, t: TierMove) -> None:
        """Register the copied blocks one contiguous run at a time (events chain by parent);
        blocks written to G4 are there already (the store indexes them as it writes)."""
        missing = t._missing
        if t.path.target is not Tier.SHARED:
            assert t._allocation is not None
            register_positions(
                self._kvbm.pool(t.path.target),
                t._allocation,
                t.sequence_hashes,
                missing,
                t._parents,
            )
        t.num_copied = len(missing)
        self.stats.num_blocks_copied += len(missing)
        metrics = self._kvbm.metrics
        record = metrics.record_onboards if t.path.onboard else metrics.record_offloads
        record(t.path.source, t.path.target, len(missing))

    def _finish(self, t: TierMove, state: MoveState) -> None:
        """End ``t``: release every reference it holds, keeping a DONE onboard's device blocks;
        blocks a DONE offload put in a tier go on (write-through) or are marked dirty."""
        kvbm, path = self._kvbm, t.path
        self._queues.unqueue(t)
        if state is MoveState.DONE and path.onboard:
            t._result = kvbm.pool(Tier.DEVICE).match_present(t.sequence_hashes)
        for handle in (t._held, t._allocation, t._source):
            if handle is not None and handle.live:
                kvbm.release(handle)
        t._held = t._allocation = t._source = None
        if not path.onboard:
            self._pending[path.target].difference_update(t.sequence_hashes)
        t.state = state
        self.stats.transfers[state] += 1
        if (
            state is MoveState.DONE
            and t.num_copied
            and not path.onboard
            and path.target is not Tier.SHARED  # the last tier: nothing goes on from there
        ):
            with kvbm.pool(path.target).match_present(t.sequence_hashes) as landed:
                self.on_registered(landed, priority=t.priority)

    def _write_back(self) -> None:
        """Under pressure, offload the oldest dirty blocks their tier still holds."""
        for path, picked in self._dirty.batched_pick():
            with self._kvbm.pool(path.source).match_present(picked) as handle:
                if self.offload(handle, path.target).state is MoveState.BUSY:
                    self._dirty.unpick(path, picked)

    def _wait_until(self, ready: Callable[[], bool], timeout_s: float | None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self.step()
            left = _POLL_S if deadline is None else deadline - time.monotonic()
            if ready() or left <= 0 or not self._in_flight:
                return ready()
            self._collect(min(left, _POLL_S))


class Onboarding:
    """Device blocks for the longest prefix any tier held at ``onboard`` time."""

    def __init__(
        self, manager: OffloadManager, device: ImmutableBlocks | None, parts: list[TierMove]
    ) -> None:
        self._manager, self._device, self._parts = manager, device, parts
        self._live = True

    @property
    def done(self) -> bool:
        return all(p.done for p in self._parts)

    def wait(self, timeout_s: float | None = None) -> ImmutableBlocks | None:
        """On the owner thread: step the manager until every copy is registered, then return the
        device handle (once; the caller releases it), cut at the first part that failed or did
        not fit. None if ``timeout_s`` passed first: wait again or ``cancel``."""
        if not self._live:
            raise InvalidTransition("this onboarding was already taken or cancelled")
        if not self._manager._wait_until(lambda: self.done, timeout_s):
            return None
        kvbm, result = self._end(), self._device
        for i, part in enumerate(self._parts):
            if part._result is None:
                self._release_results(self._parts[i:])
                break
            result = part._result if result is None else result.join(part._result)
            part._result = None
        return result if result is not None else kvbm.pool().match([])

    def cancel(self) -> None:
        """Give back every block this onboarding holds or is still copying."""
        if self._live:
            kvbm = self._end()
            for part in self._parts:
                part.cancel()
            self._release_results(self._parts)
            if self._device is not None:
                kvbm.release(self._device)

    def _end(self) -> KvBlockManager:
        self._live = False
        self._manager._onboardings.discard(self)
        return self._manager._kvbm

    def _release_results(self, parts: list[TierMove]) -> None:
        for part in parts:
            if part._result is not None:
                self._manager._kvbm.release(part._result)
                part._result = None


def build_offload_manager(kvbm: KvBlockManager, config: KvbmConfig) -> OffloadManager:
    """The default table (module docstring) over ``kvbm``'s tiers, sized from ``config``."""
    rows = [(Tier.DEVICE, Tier.HOST, 1), (Tier.HOST, Tier.DISK, 0), (Tier.HOST, Tier.SHARED, 0)]
    rows += [(Tier.HOST, Tier.DEVICE, 10), (Tier.DISK, Tier.DEVICE, 10)]
    if Tier.HOST not in kvbm.tiers:
        rows += [(Tier.DEVICE, Tier.DISK, 1), (Tier.DEVICE, Tier.SHARED, 1)]
    size = config.offload_batch_blocks
    paths = [OffloadPath(s, t, p, size) for s, t, p in rows if {s, t} <= set(kvbm.tiers)]
    return OffloadManager(
        kvbm,
        paths=paths,
        mode=config.offload_mode,
        max_in_flight=config.offload_max_in_flight,
        max_queued_blocks=config.offload_max_queued_blocks,
        writeback_free=config.offload_writeback_free,
        close_timeout_s=config.offload_close_timeout_s,
    )
