"""The router's view of which worker caches which KV blocks, built from KV events.

Owns ``KvPrefixIndex``: for every sequence hash some worker holds, which workers hold it on which
tiers. It is fed by ``kv_subscriber``'s thread and read by the router, so every method takes one
lock. It is sized for fleets of hundreds of workers and about ten million cached blocks
(``python -m fabric.bench router-scale``), so it keeps no Python object per (worker, block):

* Each indexed worker has a *slot* ``s``; a *holder mask* (``holders``: the representation,
  the interned states and a walk's result) is an int with ``len(Tier)`` bits per slot, bit
  ``s * TIER_BITS + tier`` set when slot ``s`` holds the block on that tier.
* ``_table`` (``hash_table.U64Table``, numpy arrays) maps a sequence hash to a *state id*, a
  small int naming one holder mask in the interned state table (``holders.HolderStates``): the
  blocks of one prefix usually share one mask (one holder, one tier; or every worker, for a
  system prompt), so a block costs one 12-byte slot of an open-addressing table (24-40 bytes at
  its load).
* Per slot, a log of the hashes the worker stored (an ``array('Q')``, 8 bytes each, compacted when
  it holds twice as many hashes as the worker does) is what ``AllBlocksCleared`` and
  ``clear_worker`` walk: a clear costs the worker's blocks, not the index's.
* A batch's events are applied in bulk (``kv_batches``): consecutive stores (or removals) of one
  tier as one numpy lookup of their hashes, then one state change per distinct old state.

Invariants:

* A hash is in ``_table`` exactly when some slot holds it on some tier; a state's reference
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
  tiers: the router matches device and host copies only, see ``policy``). The walk looks hashes
  up a chunk at a time, starts with every indexed worker, stops at the first hash none of those
  still in it holds (or at once when no asked-for worker is indexed), and recomputes who is
  still in only where a block's state differs from the previous block's: its cost grows with the
  matched prefix, not with the number of workers. Its result (``HeldPrefixes``) keeps the
  holders grouped by length, so a reader pays for the workers it asks about.

Every worker that publishes KV events is indexed, whatever its role: prefill, decode and
aggregated workers alike (the router decides which of them may supply KV to whom).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from array import array
from collections.abc import Collection, Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from fabric.frontend.hash_table import TOMBSTONE, Keys, U64Table
from fabric.frontend.holders import (
    SLOT_BITS,
    TIER_BIT,
    TIER_BITS,
    HeldPrefixes,
    HolderStates,
)
from fabric.frontend.kv_batches import counted, distinct, group, runs
from fabric.kvbm import AllCleared, BlockStored, KvEvent, SequenceHash, Tier

_LOG_SLACK = 256
"""A slot's log is compacted when it exceeds twice the worker's blocks plus this."""
FIRST_CHUNK = 16
"""Hashes of a ``Sequence`` given to ``match_lengths`` looked up first (the next chunks double)."""

HashChunk = Sequence[SequenceHash] | npt.NDArray[np.uint64]
"""Sequence hashes in chain order, as a sequence of ints or a ``uint64`` array."""


class KvPrefixIndex:
    """Which workers hold which sequence hashes (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table = U64Table()
        self._states = HolderStates()
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
            for kind, tier, hashes in runs(events):
                if kind is AllCleared:
                    self._clear(slot)
                elif kind is BlockStored:
                    self._store(slot, TIER_BIT[tier], hashes)
                else:
                    self._drop(slot, TIER_BIT[tier] << (slot * TIER_BITS), hashes)
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
            return len(self._table)

    def match_lengths(
        self,
        hashes: Iterable[SequenceHash],
        workers: Iterable[str],
        tiers: Collection[Tier] | None = None,
    ) -> dict[str, int]:
        """For each of ``workers``, how many leading ``hashes`` it holds (0 for none).

        An iterator ``hashes`` is consumed in order and only while some indexed worker holds
        every hash so far (on ``tiers``), one miss included, and not at all when none of
        ``workers`` is indexed: it may compute them lazily. A sequence is looked up in chunks
        (``FIRST_CHUNK`` hashes, then doubling) while some worker holds every hash so far.

        Args:
            tiers: count only copies on these tiers; None: any tier.
        """
        chunks: Iterable[HashChunk]
        if isinstance(hashes, Sequence | np.ndarray):
            chunks = _doubling_chunks(hashes)
        else:
            chunks = ([sequence_hash] for sequence_hash in hashes)
        return self.match_chunks(chunks, workers, tiers)

    def match_chunks(
        self,
        chunks: Iterable[HashChunk],
        workers: Iterable[str],
        tiers: Collection[Tier] | None = None,
    ) -> dict[str, int]:
        """``match_lengths`` over hashes given chunk by chunk: the next chunk is taken only
        while some indexed worker holds every hash so far (a lazy hasher hashes no further).
        """
        lengths = dict.fromkeys(workers, 0)
        held = self.held_prefixes(chunks, lengths.keys(), tiers)
        for worker_id in held.holders(1):
            if worker_id in lengths:
                lengths[worker_id] = held.length_of(worker_id)
        return lengths

    def held_prefixes(
        self,
        chunks: Iterable[HashChunk],
        workers: Collection[str],
        tiers: Collection[Tier] | None = None,
    ) -> HeldPrefixes:
        """``match_chunks`` over every indexed worker, as the walk found it: groups of workers
        by length, read per worker or per length (its cost grows with the prefix and the
        number of distinct lengths, not with the workers). Nothing (no chunk taken) when none
        of ``workers`` (best a set or a dict's keys) is indexed.
        """
        with self._lock:
            if self._slot_of.keys().isdisjoint(workers):
                return HeldPrefixes({}, [], [])
            groups = [(length, bits) for length, bits in self._match_slots(chunks, tiers) if bits]
            return HeldPrefixes(dict(self._slot_of), list(self._worker_of), groups)

    def tiers_of(self, worker_id: str, sequence_hash: SequenceHash) -> frozenset[Tier]:
        """The tiers on which ``worker_id`` holds ``sequence_hash`` (empty: it does not)."""
        with self._lock:
            slot = self._slot_of.get(worker_id)
            position = int(self._table.find(np.array([sequence_hash], dtype=np.uint64))[0])
            if slot is None or position < 0:
                return frozenset()
            state = int(self._table.values[position])
            bits = self._states.masks[state] >> (slot * TIER_BITS)
            return frozenset(tier for tier, bit in TIER_BIT.items() if bits & bit)

    # Internals (lock held)
    # -----------------------------------------------------------------------------------------

    def _match_slots(
        self, chunks: Iterable[HashChunk], tiers: Collection[Tier] | None
    ) -> list[tuple[int, int]]:
        """``(length, slot bits)``: the slots (lowest mask bit of each) holding exactly
        ``length`` leading hashes, for every length > 0 some slot holds (bits may be 0)."""
        ones = self._ones
        wanted = sum(TIER_BIT[tier] for tier in (Tier if tiers is None else tiers))
        pattern = ones * wanted  # the wanted tier bits of every slot
        low = ones * (SLOT_BITS >> 1)  # every slot's bits but its top one
        top = ones << (TIER_BITS - 1)
        masks = self._states.masks
        table = self._table
        active = ones
        depth = 0  # hashes of earlier chunks, all held by some active slot
        previous = None
        dropped: list[tuple[int, int]] = []  # (depth, slots that lack the hash at that depth)
        for chunk in chunks:
            keys = np.asarray(chunk, dtype=np.uint64)
            positions = table.find(keys)
            misses = np.flatnonzero(positions < 0)
            num_held = int(misses[0]) if misses.size else keys.size
            states = table.values[positions[:num_held]]
            starts = np.flatnonzero(states[1:] != states[:-1]) + 1  # where the state changes
            for offset, state in zip(
                itertools.chain((0,), starts.tolist()),
                states[np.concatenate(([0], starts))].tolist() if num_held else (),
                strict=False,
            ):
                if state == previous:  # same state: same holders, nobody drops out
                    continue
                previous = state
                held = masks[state] & pattern
                # a slot holding any wanted tier: its top bit (a carry out of its lower bits)
                held = (held | ((held & low) + low)) & top
                remaining = active & (held >> (TIER_BITS - 1))
                if remaining != active:
                    dropped.append((depth + offset, active ^ remaining))
                    active = remaining
                    if not active:
                        break
            if not active:
                break
            depth += num_held
            if num_held < keys.size:
                break
        dropped.append((depth, active))
        return [(length, bits) for length, bits in dropped if length]

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

    def _store(self, slot: int, tier_bit: int, hashes: Keys) -> None:
        shift = slot * TIER_BITS
        bit = tier_bit << shift
        own = SLOT_BITS << shift
        states = self._states
        masks = states.masks
        keys = distinct(hashes)
        positions, ends = self._table.find_or_end(keys)
        found = positions >= 0
        gained = 0
        if found.any():
            at = positions[found]
            olds, which = group(self._table.values[at])
            news = olds.copy()
            joined = np.zeros(olds.size, dtype=bool)
            for j, (old, count) in enumerate(counted(olds, which)):
                mask = masks[old]
                if mask & bit:  # held there already
                    continue
                new = news[j] = states.intern(mask | bit)
                states.move(old, new, count)
                if not mask & own:
                    joined[j] = True
                    gained += count
            if not np.array_equal(news, olds):
                self._table.assign(at, news[which])
            if joined.any():
                self._logs[slot].frombytes(keys[found][joined[which]].tobytes())
        missing = keys[~found]
        if missing.size:
            new = states.intern(bit)
            states.move(None, new, missing.size)
            self._table.insert(missing, new, ends[~found])
            self._logs[slot].frombytes(missing.tobytes())
            gained += missing.size
        self._num_blocks[slot] += gained
        if len(self._logs[slot]) > 2 * self._num_blocks[slot] + _LOG_SLACK:
            self._compact_log(slot)

    def _clear(self, slot: int) -> None:
        logged = np.frombuffer(self._logs[slot], dtype=np.uint64).copy()
        self._drop(slot, SLOT_BITS << (slot * TIER_BITS), logged)
        self._logs[slot] = array("Q")

    def _drop(self, slot: int, bits: int, hashes: Keys) -> None:
        """Clear ``bits`` (some of ``slot``'s) in the masks of ``hashes``."""
        own = SLOT_BITS << (slot * TIER_BITS)
        states = self._states
        masks = states.masks
        keys = distinct(hashes)
        positions = self._table.find(keys)
        at = positions[positions >= 0]
        if not at.size:
            return
        olds, which = group(self._table.values[at])
        news = olds.copy()
        lost = 0
        for j, (old, count) in enumerate(counted(olds, which)):
            mask = masks[old]
            if not mask & bits:  # not held there
                continue
            left = mask & ~bits
            new = states.intern(left) if left else None
            news[j] = TOMBSTONE if new is None else new
            states.move(old, new, count)
            if not left & own:
                lost += count
        if not np.array_equal(news, olds):
            self._table.assign(at, news[which])
        self._num_blocks[slot] -= lost

    def _compact_log(self, slot: int) -> None:
        """Keep one log entry per hash the slot still holds."""
        own = SLOT_BITS << (slot * TIER_BITS)
        keys = distinct(np.frombuffer(self._logs[slot], dtype=np.uint64))
        positions = self._table.find(keys)
        found = positions >= 0
        olds, which = group(self._table.values[positions[found]])
        masks = self._states.masks
        holds = np.array([bool(masks[old] & own) for old in olds.tolist()], dtype=bool)
        kept = array("Q")
        kept.frombytes(keys[found][holds[which]].tobytes())
        self._logs[slot] = kept


def _doubling_chunks(
    hashes: Sequence[SequenceHash] | npt.NDArray[np.uint64],
) -> Iterator[HashChunk]:
    start, size = 0, FIRST_CHUNK
    while start < len(hashes):
        yield hashes[start : start + size]
        start += size
        size *= 2
