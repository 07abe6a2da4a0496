"""Holder masks: which slots (indexed workers) hold a block on which tiers, as one int.

Owns the representation ``kv_index.KvPrefixIndex`` keeps per block and hands to its readers:

* A *holder mask* is an int with ``TIER_BITS`` bits per slot, bit ``s * TIER_BITS + i`` set when
  slot ``s`` holds the block on the ``i``-th tier (``Tier`` order).
* ``HolderStates`` interns masks with reference counts: a block's entry in the index's table is a
  small state id, and the blocks of one prefix usually share one (one holder, one tier; or every
  worker, for a system prompt).
* ``HeldPrefixes`` is one prefix walk's result: slots grouped by how many leading hashes they
  hold, each group a mask of the slots' lowest bits (``slots_of`` names them).

Invariants: a state id's mask is non-zero and unique while it is referenced; ids start at
``hash_table.FIRST_VALUE`` (they are the table's values) and a freed id is reused only after
``collect``, which the index calls when no id is held in a local.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fabric.frontend.hash_table import FIRST_VALUE
from fabric.kvbm import Tier

TIER_BITS = len(Tier)
"""Bits of one slot in a holder mask: one per tier, in ``Tier`` order (at least 2)."""
TIER_BIT = {tier: 1 << i for i, tier in enumerate(Tier)}
"""A tier's bit in slot 0's part of a mask."""
SLOT_BITS = (1 << TIER_BITS) - 1
"""Every tier bit of slot 0."""


class HolderStates:
    """Interned holder masks with reference counts (``KvPrefixIndex``'s state table).

    Ids start at ``FIRST_VALUE``: they are the values of the index's hash table.
    """

    def __init__(self) -> None:
        self.masks: list[int] = [0] * FIRST_VALUE
        self.refs: list[int] = [0] * FIRST_VALUE
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

    def move(self, old: int | None, new: int | None, count: int) -> None:
        """``count`` entries go from state ``old`` to ``new`` (None: no state)."""
        if new is not None:
            self.refs[new] += count
        if old is not None:
            refs = self.refs[old] - count
            self.refs[old] = refs
            if refs == 0:
                self._unreferenced.append(old)

    def collect(self) -> None:
        """Free every state left without references (call when no id is held in a local)."""
        for state in self._unreferenced:
            if self.refs[state] == 0 and self.masks[state]:
                del self._id_of[self.masks[state]]
                self.masks[state] = 0
                self._free.append(state)
        self._unreferenced.clear()


@dataclass(frozen=True, slots=True)
class HeldPrefixes:
    """One prefix walk's result: which workers hold how many leading hashes.

    Attributes:
        slot_of, worker_of: the index's slots when the walk ran (a snapshot).
        groups: ``(length, slot bits)``, one per length > 0 some worker holds; a slot's bit is
            the lowest mask bit of the slot.
    """

    slot_of: dict[str, int]
    worker_of: list[str | None]
    groups: list[tuple[int, int]]

    def length_of(self, worker_id: str) -> int:
        """How many leading hashes ``worker_id`` holds (0: none, or not indexed)."""
        slot = self.slot_of.get(worker_id)
        if slot is not None:
            bit = 1 << (slot * TIER_BITS)
            for length, bits in self.groups:
                if bits & bit:
                    return length
        return 0

    def holders(self, min_length: int) -> Iterator[str]:
        """The workers holding at least ``min_length`` (> 0) leading hashes."""
        for length, bits in self.groups:
            if length >= min_length:
                for slot in slots_of(bits):
                    worker_id = self.worker_of[slot]
                    assert worker_id is not None, "a walked slot has a worker"
                    yield worker_id


def slots_of(bits: int) -> Sequence[int]:
    """The slots whose lowest mask bit is set in ``bits`` (only such bits may be set)."""
    digits = bin(bits)[:1:-1]  # digit i is bit i
    slots = []
    position = digits.find("1")
    while position >= 0:
        slots.append(position // TIER_BITS)
        position = digits.find("1", position + TIER_BITS)
    return slots
