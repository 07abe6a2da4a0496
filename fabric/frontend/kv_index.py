"""The router's view of which worker caches which KV blocks, built from KV events.

Owns ``KvPrefixIndex``: for every sequence hash some worker holds, which workers hold it on which
tiers. It is fed by ``kv_subscriber``'s thread and read by the router, so every method takes one
lock. It is sized for fleets of hundreds of workers and about ten million cached blocks
(``python -m fabric.bench router-scale``), so it keeps no Python object per (worker, block):

* Each indexed worker has a *slot* ``s``; a *holder mask* is an int with ``len(Tier)`` bits per
  slot, bit ``s * TIER_BITS + tier`` set when slot ``s`` holds the block on that tier.
* ``_entries`` maps a sequence hash to a *state id*, a small int naming one holder mask in the
  interned state table (``_HolderStates``): the blocks of one prefix usually share one mask (one
  holder, one tier; or every worker, for a system prompt), so a block costs one dict entry.
* Per slot, a log of the hashes the worker stored (an ``array('Q')``, 8 bytes each, compacted when
  it holds twice as many hashes as the worker does) is what ``AllBlocksCleared`` and
  ``clear_worker`` walk: a clear costs the worker's blocks, not the index's.

Invariants:

* A hash is in ``_entries`` exactly when some slot holds it on some tier; a state's reference
  count is the number of entries naming it, and a state with none is freed at the end of the call
  that dropped it (so ids are never reused within one ``apply``).
* ``_num_blocks[s]`` is the number of entries whose mask has a bit of slot ``s``. A worker has a
  slot exactly when it holds a block (outside a call): a slot whose count falls to 0 is freed,
  and the lowest free slot is handed out first, which keeps masks narrow.
* A block stored on the device and offloaded to the host stays indexed for its worker until both
  copies are removed.
* ``AllBlocksCleared`` (any tier: the wire does not say which) forgets every block of the worker,
  as does ``clear_worker``: the index may miss what a worker holds, never claim what it lacks
  (a miss costs a recompute, a false hit would not).
* Sequence hashes are chained, so a prefix match walks the request's hashes in order and stops,
  per worker, at the first hash the worker lacks (on the tiers asked for, when a match names
  tiers: the router matches device and host copies only, see ``policy``). The walk starts with
  every indexed worker, stops at the first hash none of those still in it holds (or at once when
  no asked-for worker is indexed), and recomputes who is still in only where a block's state
  differs from the previous block's: its cost grows with the matched prefix, not with the number
  of workers (but for naming each worker's length once at the end).

Every worker that publishes KV events is indexed, whatever its role: prefill, decode and
aggregated workers alike (the router decides which of them may supply KV to whom).
"""

from __future__ import annotations

import heapq
import threading
from array import array
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from fabric.kvbm import AllCleared, BlockRemoved, BlockStored, KvEvent, SequenceHash, Tier

TIER_BITS = len(Tier)
"""Bits of one slot in a holder mask: one per tier, in ``Tier`` order (at least 2)."""
_TIER_BIT = {tier: 1 << i for i, tier in enumerate(Tier)}
_SLOT_BITS = (1 << TIER_BITS) - 1
_LOG_SLACK = 256
"""A slot's log is compacted when it exceeds twice the worker's blocks plus this."""


@dataclass(slots=True)
class _Move:
    """Within one store or removal call: where the entries of one old state go.

    Attributes:
        new: the new state (the old one: nothing to do; None: the entry goes).
        slot_changes: whether the slot becomes, or stops being, a holder.
        count: the entries moved so far (their reference counts move once, at the end).
    """

    new: int | None
    slot_changes: bool
    count: int = 0


class _HolderStates:
    """Interned holder masks with reference counts (``KvPrefixIndex``'s state table)."""

    def __init__(self) -> None:
        self.masks: list[int] = []
        self.refs: list[int] = []
        self._id_of: dict[int, int] = {}
        self._free: list[int] = []
        self._unreferenced: list[int] = []

    def __len__(self) -> int:
        return len(self._id_of)

    def intern(self, mask: int) -> int:
        """The id of ``mask`` (non-zero), allocated with no references when new."""
        state = self._id_of.get(mask)
        if state is None:
            if self._free:
                state = self._free.pop()
                self.masks[state] = mask
            else:
                state = len(self.masks)
                self.masks.append(mask)
                self.refs.append(0)
            self._id_of[mask] = state
            self._unreferenced.append(state)
        return state

    def unref(self, state: int, count: int = 1) -> None:
        refs = self.refs[state] - count
        self.refs[state] = refs
        if refs == 0:
            self._unreferenced.append(state)

    def collect(self) -> None:
        """Free every state left without references (call when no id is held in a local)."""
        for state in self._unreferenced:
            if self.refs[state] == 0 and self.masks[state]:
                del self._id_of[self.masks[state]]
                self.masks[state] = 0
                self._free.append(state)
        self._unreferenced.clear()


class KvPrefixIndex:
    """Which workers hold which sequence hashes (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[SequenceHash, int] = {}
        self._states = _HolderStates()
        self._slot_of: dict[str, int] = {}
        self._worker_of: list[str | None] = []
        self._free_slots: list[int] = []
        self._num_blocks: list[int] = []
        self._logs: list[array[int]] = []
        self._ones = 0
        """Bit ``s * TIER_BITS`` for every allocated slot ``s``."""

    def apply(self, worker_id: str, events: Iterable[KvEvent]) -> None:
        """Apply one batch of ``worker_id``'s events, in order."""
        with self._lock:
            slot = self._slot_for(worker_id)
            for event in events:
                if isinstance(event, BlockStored):
                    self._store(slot, _TIER_BIT[event.tier], event.sequence_hashes)
                elif isinstance(event, BlockRemoved):
                    self._remove(slot, _TIER_BIT[event.tier], event.sequence_hashes)
                elif isinstance(event, AllCleared):
                    self._clear(slot)
            self._maybe_free_slot(slot)
            self._states.collect()

    def clear_worker(self, worker_id: str) -> None:
        """Forget everything ``worker_id`` holds (it left, or its event stream has a hole)."""
        with self._lock:
            slot = self._slot_of.get(worker_id)
            if slot is not None:
                self._clear(slot)
                self._maybe_free_slot(slot)
                self._states.collect()

    def num_blocks(self, worker_id: str) -> int:
        """How many distinct sequence hashes ``worker_id`` is known to hold."""
        with self._lock:
            slot = self._slot_of.get(worker_id)
            return 0 if slot is None else self._num_blocks[slot]

    @property
    def num_cached_blocks(self) -> int:
        """(worker, sequence hash) pairs held, over every worker."""
        with self._lock:
            return sum(self._num_blocks)

    @property
    def num_hashes(self) -> int:
        """Distinct sequence hashes held by some worker."""
        with self._lock:
            return len(self._entries)

    def match_lengths(
        self,
        hashes: Iterable[SequenceHash],
        workers: Iterable[str],
        tiers: Collection[Tier] | None = None,
    ) -> dict[str, int]:
        """For each of ``workers``, how many leading ``hashes`` it holds (0 for none).

        ``hashes`` is consumed in order and only while some indexed worker holds every hash so
        far (on ``tiers``), one miss included, and not at all when none of ``workers`` is
        indexed: it may be a generator that computes them lazily (``policy`` does).

        Args:
            tiers: count only copies on these tiers; None: any tier.
        """
        lengths = dict.fromkeys(workers, 0)
        with self._lock:
            slot_of = self._slot_of
            if not any(worker_id in slot_of for worker_id in lengths):
                return lengths
            slot_lengths = self._match_slots(hashes, tiers)
            for worker_id in lengths:
                slot = slot_of.get(worker_id)
                if slot is not None:
                    lengths[worker_id] = slot_lengths.get(slot, 0)
        return lengths

    def tiers_of(self, worker_id: str, sequence_hash: SequenceHash) -> frozenset[Tier]:
        """The tiers on which ``worker_id`` holds ``sequence_hash`` (empty: it does not)."""
        with self._lock:
            slot = self._slot_of.get(worker_id)
            state = self._entries.get(sequence_hash)
            if slot is None or state is None:
                return frozenset()
            bits = self._states.masks[state] >> (slot * TIER_BITS)
            return frozenset(tier for tier, bit in _TIER_BIT.items() if bits & bit)

    # Internals (lock held)
    # -----------------------------------------------------------------------------------------

    def _match_slots(
        self, hashes: Iterable[SequenceHash], tiers: Collection[Tier] | None
    ) -> dict[int, int]:
        """``slot -> leading hashes held`` for every slot holding at least the first one."""
        ones = self._ones
        wanted = sum(_TIER_BIT[tier] for tier in (Tier if tiers is None else tiers))
        pattern = ones * wanted  # the wanted tier bits of every slot
        low = ones * (_SLOT_BITS >> 1)  # every slot's bits but its top one
        top = ones << (TIER_BITS - 1)
        masks = self._states.masks
        get = self._entries.get
        active = ones
        depth = 0
        previous: int | None = None
        dropped: list[tuple[int, int]] = []  # (depth, slots that lack the hash at that depth)
        for sequence_hash in hashes:
            state = get(sequence_hash)
            if state is None:
                break
            if state != previous:  # same state: same holders, nobody drops out
                previous = state
                held = masks[state] & pattern
                # a slot holding any wanted tier: its top bit (a carry out of its lower bits)
                held = (held | ((held & low) + low)) & top
                remaining = active & (held >> (TIER_BITS - 1))
                if remaining != active:
                    dropped.append((depth, active ^ remaining))
                    active = remaining
                    if not active:
                        break
            depth += 1
        dropped.append((depth, active))
        slot_lengths: dict[int, int] = {}
        for length, bits in dropped:
            if length:
                for slot in _slots(bits):
                    slot_lengths[slot] = length
        return slot_lengths

    def _slot_for(self, worker_id: str) -> int:
        slot = self._slot_of.get(worker_id)
        if slot is not None:
            return slot
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._worker_of[slot] = worker_id
        else:
            slot = len(self._worker_of)
            self._worker_of.append(worker_id)
            self._num_blocks.append(0)
            self._logs.append(array("Q"))
        self._slot_of[worker_id] = slot
        self._ones |= 1 << (slot * TIER_BITS)
        return slot

    def _maybe_free_slot(self, slot: int) -> None:
        """Free ``slot`` when its worker holds nothing (no entry names it then)."""
        if self._num_blocks[slot]:
            return
        worker_id = self._worker_of[slot]
        assert worker_id is not None, "an allocated slot has a worker"
        del self._slot_of[worker_id]
        self._worker_of[slot] = None
        self._logs[slot] = array("Q")
        self._ones &= ~(1 << (slot * TIER_BITS))
        heapq.heappush(self._free_slots, slot)

    def _store(self, slot: int, tier_bit: int, hashes: Iterable[SequenceHash]) -> None:
        shift = slot * TIER_BITS
        bit = tier_bit << shift
        own = _SLOT_BITS << shift
        entries = self._entries
        get = entries.get
        states = self._states
        masks = states.masks
        log = self._logs[slot]
        moves: dict[int | None, _Move] = {}
        for sequence_hash in hashes:
            old = get(sequence_hash)
            move = moves.get(old)
            if move is None:
                mask = 0 if old is None else masks[old]
                if mask & bit:  # held there already
                    move = moves[old] = _Move(old, False)
                else:
                    move = moves[old] = _Move(states.intern(mask | bit), not mask & own)
            new = move.new
            if new == old:
                continue
            entries[sequence_hash] = new  # type: ignore[assignment]  # a store never deletes
            move.count += 1
            if move.slot_changes:
                log.append(sequence_hash)
        self._num_blocks[slot] += self._settle(moves)
        if len(log) > 2 * self._num_blocks[slot] + _LOG_SLACK:
            self._compact_log(slot)

    def _remove(self, slot: int, tier_bit: int, hashes: Iterable[SequenceHash]) -> None:
        self._drop(slot, tier_bit << (slot * TIER_BITS), hashes)

    def _clear(self, slot: int) -> None:
        logged = cast(Iterable[SequenceHash], self._logs[slot])
        self._drop(slot, _SLOT_BITS << (slot * TIER_BITS), logged)
        self._logs[slot] = array("Q")

    def _drop(self, slot: int, bits: int, hashes: Iterable[SequenceHash]) -> None:
        """Clear ``bits`` (some of ``slot``'s) in the masks of ``hashes``."""
        own = _SLOT_BITS << (slot * TIER_BITS)
        entries = self._entries
        get = entries.get
        states = self._states
        masks = states.masks
        moves: dict[int | None, _Move] = {}
        for sequence_hash in hashes:
            old = get(sequence_hash)
            if old is None:
                continue
            move = moves.get(old)
            if move is None:
                mask = masks[old]
                if not mask & bits:  # not held there
                    move = moves[old] = _Move(old, False)
                else:
                    left = mask & ~bits
                    move = moves[old] = _Move(states.intern(left) if left else None, not left & own)
            new = move.new
            if new == old:
                continue
            if new is None:
                del entries[sequence_hash]
            else:
                entries[sequence_hash] = new
            move.count += 1
        self._num_blocks[slot] -= self._settle(moves)

    def _settle(self, moves: dict[int | None, _Move]) -> int:
        """Move the reference counts of a call's moves; returns the hashes the slot gained or
        lost (as a holder on any tier)."""
        refs = self._states.refs
        changed = 0
        for old, move in moves.items():
            if move.count:
                if move.new is not None:
                    refs[move.new] += move.count
                if old is not None:
                    self._states.unref(old, move.count)
                if move.slot_changes:
                    changed += move.count
        return changed

    def _compact_log(self, slot: int) -> None:
        """Keep one log entry per hash the slot still holds."""
        own = _SLOT_BITS << (slot * TIER_BITS)
        get = self._entries.get
        masks = self._states.masks
        kept = array("Q")
        for sequence_hash in dict.fromkeys(self._logs[slot]):
            state = get(SequenceHash(sequence_hash))
            if state is not None and masks[state] & own:
                kept.append(sequence_hash)
        self._logs[slot] = kept


def _slots(bits: int) -> Sequence[int]:
    """The slots whose lowest mask bit is set in ``bits`` (only such bits may be set)."""
    digits = bin(bits)[:1:-1]  # digit i is bit i
    slots = []
    position = digits.find("1")
    while position >= 0:
        slots.append(position // TIER_BITS)
        position = digits.find("1", position + TIER_BITS)
    return slots
