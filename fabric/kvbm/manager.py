"""KvBlockManager: the facade a worker talks to, over one pool + storage per tier.

What it owns: the tiers (G1 device always; G2 host and G3 disk pools when configured; the G4
shared disk store when configured), the salt seed that makes hashes model-specific, the disk
admission filter, and the moves between tiers. Pools only allocate / register / match / release;
storages only hold bytes; ``copy_blocks`` only copies; the G4 ``SharedBlockStore`` only stores
files by sequence hash. The manager is where a block changes tier::

    offload:  DEVICE -> HOST -> DISK      (copies, registered in the target, source keeps its copy)
              HOST -> SHARED (DEVICE -> SHARED without a host tier): packed, one file per block
    onboard:  HOST -> DEVICE, DISK -> DEVICE, NODE -> DEVICE, SHARED -> DEVICE
    node:     DEVICE -> NODE when a node tier is attached (``store_node``: the worker calls it
              for every registration, so every full block lands in its host's node cache)

G4 is not a pool: several instances write and read its directory, so nothing there can be
referenced. A match lists the hashes G4 holds after the pools' prefix (``PrefixMatch.shared``);
onboarding reads them, each verified against its checksum, and cuts the prefix at the first
block that vanished or failed verification (a shorter hit, never wrong bytes). Its blocks are
compatible iff their compat hash is this manager's (the store keys its directory by it).

A move copies only the blocks the target does not already hold (dedup by sequence hash), holds a
reference on the ones it does hold so the allocation cannot evict them mid-move, and returns
every block it allocated if the copy fails. Moves are synchronous here; the asynchronous
per-path queues build on ``move`` (tiering issue).

``match`` looks through the tiers fastest first and returns one contiguous prefix split by tier;
``match_and_onboard`` turns that into device blocks (``onboard_prefix`` also says which tier
each run of them came from). The node tier (``attach_node``: a host tier
another process owns, ``node_tier.NodeTier``) is not a pool here either: ``match_and_onboard``
asks it for the prefix after the pools' (one lookup, one copy into fresh device blocks), before
G4; device blocks are allocated only for what it pinned, so a miss evicts nothing. Not
thread-safe: one owner thread.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fabric.errors import ConfigError, InvalidInput, TransferError
from fabric.kvbm.core.block import ImmutableBlocks, MutableBlocks
from fabric.kvbm.core.events import EventSink
from fabric.kvbm.core.eviction import FrequencyFilter
from fabric.kvbm.core.hashing import HashedBlocks, hash_token_blocks
from fabric.kvbm.core.pool import BlockPool, register_positions
from fabric.kvbm.core.types import BlockId, SequenceHash, Tier
from fabric.kvbm.metrics import KvbmMetrics
from fabric.kvbm.node_tier import NodeTier
from fabric.kvbm.shared.store import SharedBlockStore, store_blocks
from fabric.kvbm.tiers.block_copy import copy_blocks, scatter_from_staging
from fabric.kvbm.tiers.storage import Storage

logger = logging.getLogger(__name__)

_MOVES = {
    (Tier.DEVICE, Tier.HOST),
    (Tier.HOST, Tier.DISK),
    (Tier.DEVICE, Tier.DISK),
    (Tier.HOST, Tier.DEVICE),
    (Tier.DISK, Tier.DEVICE),
}
SPEED_ORDER = (Tier.DEVICE, Tier.HOST, Tier.DISK)
"""The pool tiers, fastest first; G4 (``Tier.SHARED``, not a pool) comes after them."""


@dataclass(slots=True)
class TierSlot:
    """One tier: its pool and the storage that holds its blocks' bytes."""

    pool: BlockPool
    storage: Storage


@dataclass(slots=True)
class PrefixMatch:
    """A matched prefix, split by tier: ``by_tier[t]`` covers the next blocks after the faster
    tiers' ones. Release with ``KvBlockManager.release_match`` (or onboard it)."""

    by_tier: dict[Tier, ImmutableBlocks] = field(default_factory=dict)
    shared: list[SequenceHash] = field(default_factory=list)
    """The hashes after the pools' blocks that the G4 store holds (files, no references)."""

    @property
    def num_blocks(self) -> int:
        return sum(len(h) for h in self.by_tier.values()) + len(self.shared)

    def count(self, tier: Tier) -> int:
        if tier is Tier.SHARED:
            return len(self.shared)
        handle = self.by_tier.get(tier)
        return 0 if handle is None else len(handle)


@dataclass(frozen=True, slots=True)
class OnboardedPrefix:
    """Device blocks for a matched prefix and where they were found: ``sources`` lists
    ``(tier, number of blocks)`` runs in prefix order, summing to ``len(blocks)`` (a request's
    KV trace is built from them)."""

    blocks: ImmutableBlocks
    sources: tuple[tuple[Tier, int], ...]


class KvBlockManager:
    """The per-worker KV block manager. Build it with ``build_kvbm``."""

    def __init__(
        self,
        tiers: dict[Tier, TierSlot],
        *,
        block_size: int,
        seed: int,
        disk_filter: FrequencyFilter,
        metrics: KvbmMetrics,
        events: EventSink,
        shared: SharedBlockStore | None = None,
    ) -> None:
        if Tier.DEVICE not in tiers:
            raise ConfigError("a KvBlockManager needs a DEVICE tier")
        if shared is not None and shared.compat_hash != seed:
            raise ConfigError(
                f"the shared disk store is keyed by compat hash {shared.compat_hash:#x}, this "
                f"manager's is {seed:#x}: open it with the manager's compat hash"
            )
        self._tiers = tiers
        self._shared = shared
        self._node: NodeTier | None = None
        self.block_size = block_size
        self.seed = seed
        self.disk_filter = disk_filter
        self.metrics = metrics
        self.events = events
        for tier, slot in tiers.items():
            metrics.bind_pool(tier, slot.pool.stats)
        if shared is not None:
            metrics.bind_store(lambda: {"blocks": len(shared), **dataclasses.asdict(shared.stats)})

    # -- access --------------------------------------------------------------------------------

    @property
    def compat_hash(self) -> int:
        """Equal on two managers iff their KV is interchangeable: block size, layers, KV heads,
        head size, dtype, K/V split and user salt all match (layout kind and alignment may
        differ: remote reads pair them). The hash seed doubles as this, so blocks of
        incompatible managers can neither match by hash nor be read over the wire."""
        return self.seed

    @property
    def tiers(self) -> tuple[Tier, ...]:
        """The configured tiers, fastest first (G4 last when configured)."""
        pools = tuple(t for t in SPEED_ORDER if t in self._tiers)
        return pools if self._shared is None else (*pools, Tier.SHARED)

    @property
    def shared_store(self) -> SharedBlockStore:
        """The G4 store. Raises ``ConfigError`` when G4 is not configured."""
        if self._shared is None:
            raise ConfigError(
                "the SHARED (G4) tier is not configured; set FABRIC_SHARED_DISK_DIR and "
                "FABRIC_SHARED_DISK_GB (or FABRIC_SHARED_DISK_BLOCKS)"
            )
        return self._shared

    @property
    def node_attached(self) -> bool:
        """Whether a node tier is attached (``attach_node``)."""
        return self._node is not None

    def attach_node(self, node: NodeTier) -> None:
        """Use ``node`` as the tier after the pools (before G4); the manager closes it.

        Raises:
            ConfigError: a node tier is attached already.
        """
        if self._node is not None:
            raise ConfigError("a node tier is attached already; one per manager")
        self._node = node

    def contains(self, tier: Tier, sequence_hash: SequenceHash) -> bool:
        """Whether ``tier`` holds ``sequence_hash`` now (no reference taken)."""
        if tier is Tier.SHARED:
            return self.shared_store.contains(sequence_hash)
        return self._slot(tier).pool.contains(sequence_hash)

    def pool(self, tier: Tier = Tier.DEVICE) -> BlockPool:
        return self._slot(tier).pool

    def storage(self, tier: Tier = Tier.DEVICE) -> Storage:
        return self._slot(tier).storage

    def hash_tokens(
        self, tokens: Sequence[int], parent: SequenceHash | None = None
    ) -> HashedBlocks:
        """Hashes of the full blocks of ``tokens`` under this manager's salt and block size."""
        return hash_token_blocks(tokens, self.block_size, seed=self.seed, parent=parent)

    # -- device lifecycle (the engine's path) ---------------------------------------------------

    def allocate(self, num_blocks: int) -> MutableBlocks | None:
        return self._slot(Tier.DEVICE).pool.allocate(num_blocks)

    def register(
        self,
        blocks: MutableBlocks,
        sequence_hashes: Sequence[SequenceHash],
        *,
        parent_hash: SequenceHash | None = None,
        priority: int = 0,
        token_ids: Sequence[int] | None = None,
    ) -> ImmutableBlocks:
        """Register complete blocks in their tier's pool (see ``BlockPool.register``)."""
        return self.pool(blocks.tier).register(
            blocks, sequence_hashes, parent_hash=parent_hash, priority=priority, token_ids=token_ids
        )

    def release(self, blocks: MutableBlocks | ImmutableBlocks) -> None:
        self.pool(blocks.tier).release(blocks)

    # -- matching across tiers -----------------------------------------------------------------

    def match(self, sequence_hashes: Sequence[SequenceHash]) -> PrefixMatch:
        """The longest prefix held by any tier, each block taken from the fastest tier holding it.

        Stops at the first hash no tier holds. References are taken on every returned block.
        Each call is one use of every hash asked for, as the disk frequency filter counts them
        (a request's later ``register`` of the missing blocks does not count again).
        """
        self.disk_filter.observe(list(sequence_hashes))
        result = PrefixMatch()
        start = 0
        for tier in SPEED_ORDER:
            if start == len(sequence_hashes):
                break
            if tier not in self._tiers:
                continue
            handle = self._tiers[tier].pool.match(sequence_hashes[start:])
            if len(handle):
                result.by_tier[tier] = handle
                start += len(handle)
        if self._shared is not None and start < len(sequence_hashes):
            rest = sequence_hashes[start:]
            result.shared = list(rest[: self._shared.prefix_length(rest)])
        return result

    def release_match(self, match: PrefixMatch) -> None:
        for handle in match.by_tier.values():
            if handle.live:
                self.release(handle)
        match.by_tier.clear()
        match.shared.clear()

    def match_and_onboard(self, sequence_hashes: Sequence[SequenceHash]) -> ImmutableBlocks:
        """Device blocks for the longest prefix any tier holds, onboarding host and disk hits.

        If the device pool cannot take every onboarded block, the prefix is cut where it
        could not be onboarded (still a valid, shorter prefix). Nothing is leaked on failure.
        """
        return self.onboard_prefix(sequence_hashes).blocks

    def onboard_prefix(self, sequence_hashes: Sequence[SequenceHash]) -> OnboardedPrefix:
        """``match_and_onboard``, also saying which tier each run of the prefix came from."""
        found = self.match(sequence_hashes)
        device = found.by_tier.pop(Tier.DEVICE, None)
        sources: list[tuple[Tier, int]] = [] if device is None else [(Tier.DEVICE, len(device))]
        cut = False
        try:
            for tier in (Tier.HOST, Tier.DISK):
                handle = found.by_tier.pop(tier, None)
                if handle is None:
                    continue
                try:
                    moved = self.move(handle, Tier.DEVICE)
                finally:
                    self.release(handle)  # popped from ``found``: released here, even on error
                if moved is None:
                    cut = True
                    break
                sources.append((tier, len(moved)))
                device = moved if device is None else device.join(moved)
            start = 0 if device is None else len(device)
            num_shared = len(found.shared)
            if not cut and self._node is not None and start < len(sequence_hashes):
                from_node = self._onboard_node(sequence_hashes, start)
                if from_node is not None:
                    sources.append((Tier.NODE, len(from_node)))
                    device = from_node if device is None else device.join(from_node)
                    start += len(from_node)
                    num_shared = self._num_shared_after(sequence_hashes, start)
            if num_shared and not cut:
                loaded = self._onboard_shared(sequence_hashes, start, num_shared)
                if loaded is not None:
                    sources.append((Tier.SHARED, len(loaded)))
                    device = loaded if device is None else device.join(loaded)
        except BaseException:
            if device is not None and device.live:
                self.release(device)
            raise
        finally:
            self.release_match(found)
        if device is None:
            device = self._slot(Tier.DEVICE).pool.match([])
        return OnboardedPrefix(device, tuple(sources))

    # -- moves between tiers -------------------------------------------------------------------

    def offload(self, blocks: ImmutableBlocks, target: Tier) -> int:
        """Copy ``blocks`` into ``target`` where they stay cached; returns blocks newly stored.

        Offloads to DISK write only blocks the frequency filter admits. The caller keeps its
        handle on ``blocks``. Returns 0 when the target has no room (backpressure, not an error).
        Offloads to SHARED write one file per block it lacks (``store_shared``).
        """
        if target is Tier.SHARED:
            return self.store_shared(blocks)
        if target is Tier.DISK:
            admits = self.disk_filter.admits
            keep = [i for i, h in enumerate(blocks.sequence_hashes) if admits(h)]
            if len(keep) < len(blocks):
                if not keep:
                    return 0
                subset = self.pool(blocks.tier).retain(blocks, keep)
                try:
                    return self._offload(subset, target)
                finally:
                    self.release(subset)
        return self._offload(blocks, target)

    def move(self, blocks: ImmutableBlocks, target: Tier) -> ImmutableBlocks | None:
        """A handle on ``blocks``' hashes in ``target``, copying those it lacks.

        Returns None when the target cannot make room (every block there is referenced). The
        caller keeps its handle on ``blocks``; on a failed copy the blocks allocated in the
        target are returned and ``TransferError`` is raised.
        """
        moved = self._move(blocks, target)
        return None if moved is None else moved[0]

    def store_shared(self, blocks: ImmutableBlocks) -> int:
        """Write the blocks G4 lacks into it; returns how many were written. Any thread may
        call it while the caller's handle keeps ``blocks`` (their bytes) in place.

        Raises:
            StorageError: writing failed (e.g. the filesystem is full).
        """
        store = self.shared_store
        hashes = blocks.sequence_hashes
        missing = [i for i, h in enumerate(hashes) if not store.contains(h)]
        if not missing:
            return 0
        ids = blocks.block_ids
        written = store_blocks(
            self._slot(blocks.tier).storage,
            [ids[i] for i in missing],
            store,
            [hashes[i] for i in missing],
        )
        self.metrics.record_offloads(blocks.tier, Tier.SHARED, written)
        return written

    def store_node(
        self, blocks: ImmutableBlocks, *, parent_hash: SequenceHash | None = None
    ) -> int:
        """Copy the blocks the node tier lacks into it (0 without a node tier); how many it
        newly stored. The caller keeps its handle. Never raises for the node's sake: a node
        that cannot be reached stores nothing (``NodeTier``)."""
        if self._node is None or not len(blocks):
            return 0
        stored = self._node.store(
            blocks.sequence_hashes,
            self._slot(blocks.tier).storage,
            blocks.block_ids,
            parent_hash=parent_hash,
        )
        self.metrics.record_offloads(blocks.tier, Tier.NODE, stored)
        return stored

    def load_node_into(
        self, sequence_hashes: Sequence[SequenceHash], block_ids: Sequence[BlockId]
    ) -> int:
        """Copy the node tier's prefix of ``sequence_hashes`` into the caller's device blocks
        ``block_ids`` (one per hash, allocated and not registered: the caller registers them);
        how many it copied (0 without a node tier). A same-host P/D decode takes the prompt's
        blocks this way before it reads the rest from the prefill over NIXL."""
        if self._node is None or not sequence_hashes:
            return 0
        if len(block_ids) < len(sequence_hashes):
            raise InvalidInput(f"{len(block_ids)} blocks for {len(sequence_hashes)} hashes")
        loaded = self._node.load(
            sequence_hashes, self._slot(Tier.DEVICE).storage, lambda n: block_ids[:n]
        )
        self.metrics.record_onboards(Tier.NODE, Tier.DEVICE, loaded)
        return loaded

    def close(self) -> None:
        """Close every storage and the node tier (idempotent). Handles must not be used
        afterwards."""
        if self._node is not None:
            self._node.close()
        for slot in self._tiers.values():
            slot.storage.close()
        if self._shared is not None:
            self._shared.close()
        self.events.close()

    # -- internals -----------------------------------------------------------------------------

    def _move(self, blocks: ImmutableBlocks, target: Tier) -> tuple[ImmutableBlocks, int] | None:
        """``move``, also returning how many blocks were copied (the rest were present)."""
        source = blocks.tier
        if (source, target) not in _MOVES:
            raise InvalidInput(f"no move from {source.name} to {target.name}")
        src, dst = self._slot(source), self._slot(target)
        hashes = blocks.sequence_hashes
        held = dst.pool.match_present(hashes)  # references keep present blocks in place
        present = set(held.sequence_hashes)
        missing = [i for i, h in enumerate(hashes) if h not in present]
        try:
            if missing:
                allocation = dst.pool.allocate(len(missing))
                if allocation is None:
                    return None
                self._copy_and_register(src, blocks, dst, allocation, missing)
                if target is Tier.DEVICE:
                    self.metrics.record_onboards(source, target, len(missing))
                else:
                    self.metrics.record_offloads(source, target, len(missing))
            return dst.pool.match_present(hashes), len(missing)  # all present; counts no hit
        finally:
            dst.pool.release(held)

    def _onboard_node(
        self, sequence_hashes: Sequence[SequenceHash], start: int
    ) -> ImmutableBlocks | None:
        """Device blocks for the node tier's prefix of ``sequence_hashes[start:]``, registered;
        None when it held none or the device had no room."""
        assert self._node is not None
        pool = self._slot(Tier.DEVICE).pool
        allocations: list[MutableBlocks] = []

        def allocate(num_blocks: int) -> list[int]:
            if allocations:
                raise InvalidInput("a node tier's load allocates once")
            allocation = pool.allocate(min(num_blocks, pool.num_free))
            assert allocation is not None  # at most num_free blocks were asked for
            allocations.append(allocation)
            return [int(b) for b in allocation.block_ids]

        try:
            num_read = self._node.load(
                sequence_hashes[start:], self._slot(Tier.DEVICE).storage, allocate
            )
        except BaseException:
            for allocation in allocations:
                pool.release(allocation)
            raise
        if not allocations:
            return None
        loaded, rest = allocations[0].split(num_read)
        pool.release(rest)
        if num_read == 0:
            pool.release(loaded)
            return None
        positions = range(start, start + num_read)
        register_positions(pool, loaded, sequence_hashes, positions, [None, *sequence_hashes[:-1]])
        self.metrics.record_onboards(Tier.NODE, Tier.DEVICE, num_read)
        return pool.match_present(sequence_hashes[start : start + num_read])

    def _num_shared_after(self, sequence_hashes: Sequence[SequenceHash], start: int) -> int:
        """How many hashes from ``start`` on G4 holds contiguously (0 without G4)."""
        if self._shared is None:
            return 0
        return self._shared.prefix_length(sequence_hashes[start:])

    def _onboard_shared(
        self, sequence_hashes: Sequence[SequenceHash], start: int, count: int
    ) -> ImmutableBlocks | None:
        """Device blocks for ``sequence_hashes[start:start + count]`` read from G4, cut at the
        first block that is gone or fails verification; None when none could be onboarded."""
        pool, store = self._slot(Tier.DEVICE).pool, self.shared_store
        allocation = pool.allocate(count)
        if allocation is None:
            return None
        wanted = sequence_hashes[start : start + count]
        staging = torch.empty(count * store.block_bytes, dtype=torch.uint8)
        try:
            num_read = store.read_many(wanted, staging.numpy().reshape(count, store.block_bytes))
            if num_read:
                scatter_from_staging(
                    staging, self._slot(Tier.DEVICE).storage, allocation.block_ids[:num_read]
                )
        except BaseException:
            pool.release(allocation)
            raise
        if num_read == 0:
            pool.release(allocation)
            return None
        loaded, rest = allocation.split(num_read)
        pool.release(rest)
        positions = range(start, start + num_read)
        register_positions(pool, loaded, sequence_hashes, positions, [None, *sequence_hashes[:-1]])
        self.metrics.record_onboards(Tier.SHARED, Tier.DEVICE, num_read)
        if num_read < count:
            logger.info("shared store: %d of %d matched blocks onboarded", num_read, count)
        return pool.match_present(wanted[:num_read])

    def _slot(self, tier: Tier) -> TierSlot:
        slot = self._tiers.get(tier)
        if slot is None:
            raise ConfigError(
                f"the {tier.name} tier is not configured; give it a size "
                "(FABRIC_CPU_CACHE_GB / FABRIC_DISK_CACHE_GB or their *_BLOCKS overrides)"
            )
        return slot

    def _offload(self, blocks: ImmutableBlocks, target: Tier) -> int:
        moved = self._move(blocks, target)
        if moved is None:
            logger.debug("offload to %s skipped: no free blocks", target.name)
            return 0
        handle, num_copied = moved
        self.release(handle)
        return num_copied

    def _copy_and_register(
        self,
        src: TierSlot,
        blocks: ImmutableBlocks,
        dst: TierSlot,
        allocation: MutableBlocks,
        missing: list[int],
    ) -> None:
        """Copy the ``missing`` positions of ``blocks`` into ``allocation`` and register them,
        one contiguous run at a time so events carry the right parent hash."""
        ids = blocks.block_ids
        hashes = blocks.sequence_hashes
        try:
            copy_blocks(src.storage, [ids[i] for i in missing], dst.storage, allocation.block_ids)
        except (OSError, RuntimeError, ValueError) as exc:
            dst.pool.release(allocation)
            raise TransferError(
                f"copying {len(missing)} blocks {src.pool.tier.name} -> {dst.pool.tier.name} "
                f"failed: {exc}"
            ) from exc
        register_positions(dst.pool, allocation, hashes, missing, [None, *hashes[:-1]])
