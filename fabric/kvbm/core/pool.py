"""One tier's block pool: reset list, registry by sequence hash, reference counts.

The pool is mechanism only: ``allocate / register / match / release``. It never decides what to
evict (its ``EvictionPolicy`` does) and never touches block contents (storage and copies live in
``storage`` / ``copy``; the manager ties them together).

Invariants (checked by ``check_invariants`` and the stateful tests in tests/kvbm/test_pool.py):

* ``num_free + num_cached + num_in_use == num_blocks``, where free blocks are RESET and sit in the
  reset list, cached blocks are registered with no reference and sit in the eviction policy, and
  in-use blocks have ``ref_count > 0`` (owned by a ``MutableBlocks`` or referenced by
  ``ImmutableBlocks`` handles).
* Every registry entry maps a hash to a block registered under that hash; a hash is registered at
  most once (a duplicate registration reuses the block already holding it and frees the new one).
* No referenced block is in the reset list or the policy; reference counts are never negative.

Batches, not blocks, are the unit of work: one call handles a whole request's blocks and emits
one event per contiguous run, so per-block cost is a few dictionary and list operations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fabric.errors import FabricError, InvalidInput, InvalidTransition, PoolExhausted
from fabric.kvbm.core.block import BlockRecord, BlockState, ImmutableBlocks, MutableBlocks
from fabric.kvbm.core.events import AllCleared, BlockRemoved, BlockStored, EventSink, NullSink
from fabric.kvbm.core.eviction import EvictionPolicy, PriorityLruPolicy
from fabric.kvbm.core.types import BlockId, SequenceHash, Tier

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one pool's occupancy and lifetime counters (blocks, not calls)."""

    tier: Tier
    num_blocks: int
    num_free: int
    num_cached: int
    num_in_use: int
    hits: int
    misses: int
    evictions: int
    registered: int
    duplicates: int


class BlockPool:
    """The blocks of one tier of one worker; not thread-safe (one owner thread, like the engine).

    Args:
        num_blocks: blocks in the pool (> 0).
        block_size: tokens per block (> 0).
        tier: which tier this pool serves (events and metrics are labelled with it).
        policy: eviction policy; priority-then-LRU by default.
        events: where BlockStored / BlockRemoved / AllCleared go; nothing by default.
        name: for messages and logs.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        tier: Tier = Tier.DEVICE,
        *,
        policy: EvictionPolicy[BlockId] | None = None,
        events: EventSink | None = None,
        name: str | None = None,
    ) -> None:
        for label, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"{label} must be a positive int, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tier = tier
        self.name = name or tier.name.lower()
        self._policy: EvictionPolicy[BlockId] = (
            policy if policy is not None else PriorityLruPolicy()
        )
        self._events: EventSink = events if events is not None else NullSink()
        self._records = [BlockRecord(BlockId(i)) for i in range(num_blocks)]
        # Popped from the end: block 0 is handed out first, so fresh pools fill in address order
        # and their regions coalesce.
        self._reset: list[BlockId] = [BlockId(i) for i in reversed(range(num_blocks))]
        self._registry: dict[SequenceHash, BlockRecord] = {}
        self._num_in_use = 0
        self._hits = self._misses = self._evictions = self._registered = self._duplicates = 0

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out now: reset ones plus evictable cached ones."""
        return len(self._reset) + len(self._policy)

    def stats(self) -> PoolStats:
        return PoolStats(
            tier=self.tier,
            num_blocks=self.num_blocks,
            num_free=len(self._reset),
            num_cached=len(self._policy),
            num_in_use=self._num_in_use,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            registered=self._registered,
            duplicates=self._duplicates,
        )

    def contains(self, sequence_hash: SequenceHash) -> bool:
        """Whether a block is registered under ``sequence_hash`` (takes no reference)."""
        return sequence_hash in self._registry

    def prefix_length(self, sequence_hashes: Sequence[SequenceHash]) -> int:
        """How many leading hashes are registered here (takes no reference, counts no hit)."""
        registry = self._registry
        for i, h in enumerate(sequence_hashes):
            if h not in registry:
                return i
        return len(sequence_hashes)

    def state(self, block_id: BlockId) -> BlockState:
        """RESET or REGISTERED for blocks no handle writes to; PARTIAL/COMPLETE live on handles."""
        record = self._record(block_id)
        if record.sequence_hash is not None:
            return BlockState.REGISTERED
        return BlockState.RESET

    def ref_count(self, block_id: BlockId) -> int:
        return self._record(block_id).ref_count

    # -- lifecycle -----------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> MutableBlocks | None:
        """``num_blocks`` RESET blocks owned by the returned handle, or None if too few are free.

        Reset blocks are used first, then cached blocks chosen by the eviction policy (each
        eviction unregisters the block and emits ``BlockRemoved``).

        Raises:
            PoolExhausted: the request exceeds the whole pool, so it can never succeed.
        """
        if num_blocks < 0:
            raise InvalidInput(f"cannot allocate {num_blocks} blocks")
        if num_blocks > self.num_blocks:
            raise PoolExhausted(
                f"{self.name}: {num_blocks} blocks requested but the pool holds "
                f"{self.num_blocks} in total; raise the {self.tier.name} pool size or shorten "
                "the request"
            )
        reset = self._reset
        shortfall = num_blocks - len(reset)
        if shortfall > 0:
            if shortfall > len(self._policy):
                return None
            self._evict(shortfall)
        ids = reset[len(reset) - num_blocks :]
        ids.reverse()
        del reset[len(reset) - num_blocks :]
        records = self._records
        for block_id in ids:
            records[block_id].ref_count = 1
        self._num_in_use += num_blocks
        return MutableBlocks(self, ids)

    def register(
        self,
        blocks: MutableBlocks,
        sequence_hashes: Sequence[SequenceHash],
        *,
        parent_hash: SequenceHash | None = None,
        priority: int = 0,
        token_ids: Sequence[int] | None = None,
    ) -> ImmutableBlocks:
        """Consume complete mutable blocks; return them registered, one reference held on each.

        A hash already registered here is not stored twice: the returned handle holds the block
        that already has it (so its ``block_ids`` can differ from ``blocks``'), and the new block
        goes back to the reset list. Read block ids from the returned handle.

        Args:
            blocks: a live handle of this pool whose every block is COMPLETE.
            sequence_hashes: one chained hash per block, in order.
            parent_hash: the hash of the block before ``blocks[0]`` (None at a sequence start);
                carried in ``BlockStored`` events.
            priority: eviction priority of the new blocks (higher is kept longer).
            token_ids: the blocks' tokens, carried in events for routers that index token ids.
        """
        blocks._check(self)
        num = len(blocks)
        if len(sequence_hashes) != num:
            raise InvalidInput(f"{num} blocks but {len(sequence_hashes)} sequence hashes")
        if blocks.num_tokens != num * self.block_size:
            partial = blocks.num_complete
            raise InvalidTransition(
                f"only complete blocks can be registered: block {partial} holds "
                f"{blocks.num_tokens - partial * self.block_size} of {self.block_size} tokens "
                "(split() the handle and keep the partial tail mutable)"
            )
        if token_ids is not None and len(token_ids) != num * self.block_size:
            expected = num * self.block_size
            raise InvalidInput(f"token_ids has {len(token_ids)} ids, expected {expected}")
        ids = blocks._spend()
        registry = self._registry
        records = self._records
        policy = self._policy
        out_ids: list[BlockId] = []
        stored: list[int] = []  # indexes into ids of newly stored blocks
        for i, (block_id, h) in enumerate(zip(ids, sequence_hashes, strict=True)):
            existing = registry.get(h)
            if existing is None:
                record = records[block_id]
                record.sequence_hash = h
                record.priority = priority
                registry[h] = record
                out_ids.append(block_id)
                stored.append(i)
            else:
                if existing.ref_count == 0:
                    policy.remove((existing.block_id,))
                    self._num_in_use += 1
                existing.ref_count += 1
                out_ids.append(existing.block_id)
                records[block_id].ref_count = 0
                self._reset.append(block_id)
                self._num_in_use -= 1
        self._registered += len(stored)
        self._duplicates += num - len(stored)
        if stored and self._events.enabled:
            self._publish_stored(sequence_hashes, stored, parent_hash, token_ids)
        return ImmutableBlocks(self, out_ids, list(sequence_hashes))

    def match(self, sequence_hashes: Sequence[SequenceHash]) -> ImmutableBlocks:
        """The longest registered prefix of ``sequence_hashes``, one reference taken on each.

        Stops at the first miss. An empty handle is a valid result (and must still be released
        or may simply be dropped: it holds nothing).
        """
        registry = self._registry
        ids: list[BlockId] = []
        revived: list[BlockId] = []
        for h in sequence_hashes:
            record = registry.get(h)
            if record is None:
                break
            if record.ref_count == 0:
                revived.append(record.block_id)
            record.ref_count += 1
            ids.append(record.block_id)
        num = len(ids)
        if revived:
            self._policy.remove(revived)
            self._num_in_use += len(revived)
        self._hits += num
        self._misses += len(sequence_hashes) - num
        return ImmutableBlocks(self, ids, list(sequence_hashes[:num]))

    def match_present(self, sequence_hashes: Sequence[SequenceHash]) -> ImmutableBlocks:
        """References on every registered hash among ``sequence_hashes`` (not only a prefix),
        in order; the handle's ``sequence_hashes`` say which were present. Counts no hit."""
        registry = self._registry
        ids: list[BlockId] = []
        present: list[SequenceHash] = []
        revived: list[BlockId] = []
        for h in sequence_hashes:
            record = registry.get(h)
            if record is None:
                continue
            if record.ref_count == 0:
                revived.append(record.block_id)
            record.ref_count += 1
            ids.append(record.block_id)
            present.append(h)
        if revived:
            self._policy.remove(revived)
            self._num_in_use += len(revived)
        return ImmutableBlocks(self, ids, present)

    def retain(
        self, blocks: ImmutableBlocks, positions: Sequence[int] | None = None
    ) -> ImmutableBlocks:
        """A new handle on ``blocks`` (or on the given positions of it), one more reference each."""
        blocks._check(self)
        ids, hashes = blocks._block_ids, blocks._sequence_hashes
        if positions is not None:
            if any(not 0 <= i < len(ids) for i in positions):
                raise InvalidInput(
                    f"positions {list(positions)} out of range for {len(ids)} blocks"
                )
            ids = [ids[i] for i in positions]
            hashes = [hashes[i] for i in positions]
        records = self._records
        for block_id in ids:
            records[block_id].ref_count += 1
        return ImmutableBlocks(self, list(ids), list(hashes))

    def release(self, blocks: MutableBlocks | ImmutableBlocks) -> None:
        """Give the handle's blocks back; the handle is spent.

        A registered block whose last reference goes becomes cached (evictable, still matchable);
        an unregistered block (a mutable handle given back, e.g. on abort) becomes RESET.
        """
        blocks._check(self)
        ids = blocks._spend()
        records = self._records
        reset = self._reset
        freed = 0
        cached: list[BlockId] = []
        priorities: list[int] = []
        for block_id in ids:
            record = records[block_id]
            record.ref_count -= 1
            if record.ref_count == 0:
                freed += 1
                if record.sequence_hash is None:
                    reset.append(block_id)
                else:
                    cached.append(block_id)
                    priorities.append(record.priority)
            elif record.ref_count < 0:  # pragma: no cover - guarded by handle spending
                raise FabricError(f"{self.name}: block {block_id} released more than taken")
        if cached:
            self._policy.insert(cached, priorities)
        self._num_in_use -= freed

    def reset_cache(self) -> bool:
        """Drop every cached block (AllCleared); False, changing nothing, if any block is in use."""
        if self._num_in_use:
            return False
        for record in self._registry.values():
            record.sequence_hash = None
            self._reset.append(record.block_id)
        self._registry.clear()
        self._policy.clear()
        if self._events.enabled:
            self._events.publish([AllCleared(self.tier)])
        logger.info("%s: cache reset, %d blocks free", self.name, len(self._reset))
        return True

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests and debugging)."""
        reset = set(self._reset)
        assert len(reset) == len(self._reset), "a block is in the reset list twice"
        in_use = 0
        for record in self._records:
            assert record.ref_count >= 0, f"block {record.block_id} has a negative ref count"
            if record.ref_count > 0:
                in_use += 1
                assert record.block_id not in reset, f"referenced block {record.block_id} is free"
                assert record.block_id not in self._policy, f"in-use {record.block_id} evictable"
            elif record.sequence_hash is None:
                assert record.block_id in reset, f"unreferenced block {record.block_id} is lost"
            else:
                assert record.block_id in self._policy, f"cached block {record.block_id} is lost"
                assert record.block_id not in reset
        assert in_use == self._num_in_use, f"in-use count {self._num_in_use} != {in_use}"
        assert len(reset) + len(self._policy) + in_use == self.num_blocks
        for h, record in self._registry.items():
            assert record.sequence_hash == h, f"registry entry {h} points to another hash"
        registered = sum(r.sequence_hash is not None for r in self._records)
        assert registered == len(self._registry), "a registered block is missing from the registry"

    # -- internals -----------------------------------------------------------------------------

    def _record(self, block_id: BlockId) -> BlockRecord:
        if not 0 <= block_id < self.num_blocks:
            raise InvalidInput(f"block id {block_id} out of range 0..{self.num_blocks - 1}")
        return self._records[block_id]

    def _evict(self, num_blocks: int) -> None:
        victims = self._policy.evict(num_blocks)
        registry = self._registry
        records = self._records
        removed: list[SequenceHash] = []
        for block_id in victims:
            record = records[block_id]
            h = record.sequence_hash
            assert h is not None
            del registry[h]
            record.sequence_hash = None
            removed.append(h)
        self._reset.extend(victims)
        self._evictions += len(victims)
        if self._events.enabled:
            self._events.publish([BlockRemoved(self.tier, tuple(removed))])
        logger.debug("%s: evicted %d blocks", self.name, len(victims))

    def _publish_stored(
        self,
        sequence_hashes: Sequence[SequenceHash],
        stored: list[int],
        parent_hash: SequenceHash | None,
        token_ids: Sequence[int] | None,
    ) -> None:
        """One BlockStored per contiguous run of newly stored blocks (duplicates split runs)."""
        bs = self.block_size
        events: list[BlockStored] = []
        start = prev = stored[0]
        for i in [*stored[1:], None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            run_parent = parent_hash if start == 0 else sequence_hashes[start - 1]
            events.append(
                BlockStored(
                    tier=self.tier,
                    sequence_hashes=tuple(sequence_hashes[start : prev + 1]),
                    parent_hash=run_parent,
                    block_hashes=None,
                    token_ids=None
                    if token_ids is None
                    else tuple(token_ids[start * bs : (prev + 1) * bs]),
                    block_size=bs,
                )
            )
            if i is not None:
                start = prev = i
        self._events.publish(events)


def register_positions(
    pool: BlockPool,
    allocation: MutableBlocks,
    sequence_hashes: Sequence[SequenceHash],
    positions: Sequence[int],
    parents: Sequence[SequenceHash | None],
    *,
    token_ids: Sequence[int] | None = None,
) -> None:
    """Register freshly copied blocks, the i-th of ``allocation`` under
    ``sequence_hashes[positions[i]]``, and leave them cached (references released).

    Registration goes one run of consecutive positions at a time, each run with
    ``parents[first position]`` as its parent, so every ``BlockStored`` event chains correctly.
    ``token_ids``, when given, are the tokens of every position (``block_size`` per entry of
    ``sequence_hashes``); each run's events carry its slice. ``allocation`` is consumed; its
    blocks become complete here.
    """
    bs = pool.block_size
    allocation.advance(allocation.capacity - allocation.num_tokens)
    rest = allocation
    start = 0
    while start < len(positions):
        end = start + 1
        while end < len(positions) and positions[end] == positions[end - 1] + 1:
            end += 1
        run, rest = rest.split(end - start)
        first, last = positions[start], positions[end - 1]
        run_hashes = list(sequence_hashes[first : last + 1])
        run_tokens = None if token_ids is None else token_ids[first * bs : (last + 1) * bs]
        pool.release(
            pool.register(run, run_hashes, parent_hash=parents[first], token_ids=run_tokens)
        )
        start = end
    pool.release(rest)  # empty
