"""``U64Table``: a numpy open-addressing hash table from 64-bit keys to 32-bit values, in bulk.

The KV index's (``kv_index``) map from sequence hash to holder state: ten million entries cost
12 bytes of slot each (a ``uint64`` key and a ``uint32`` value, in two arrays: a gather from
each costs less than one from an array of 12-byte records) at the table's load, instead of a
Python dict entry and an int object per key.
Every operation takes a batch of keys as a numpy array and probes them together (a few
vectorized rounds, then a scalar loop for the few keys whose probe runs are still open).

Layout: ``capacity`` slots, linear probing (wrapping at the end) from a key's home slot: the
top 32 bits of ``key * 0x9E3779B97F4A7C15`` (Fibonacci hashing, so sequential keys spread too)
scaled to the capacity, which can be any size (a rebuild sizes the table to its entries, not to
a power of two). A slot's value says what the slot is: ``EMPTY`` (0, ends every probe run),
``TOMBSTONE`` (1, a deleted entry: probes go on past it, inserts reuse it) or a stored value
(``>= FIRST_VALUE``); a key is meaningful only in a slot holding a value, so every 64-bit key,
0 included, can be stored.

Invariants:

* Every stored key is in exactly one slot, reachable from its home slot without crossing an
  ``EMPTY`` one; ``len`` counts stored slots, ``_tombstones`` deleted ones. A tombstone right
  before an empty slot ends no probe run, so a deletion makes such tombstones empty (walking
  back a few slots).
* Stored and deleted slots together stay at most ``MAX_LOAD`` of the capacity (so every probe
  run ends): an insert that would pass it first rebuilds the table without tombstones, at a
  capacity where the entries fill ``GROW_LOAD`` of it (``MIN_CAPACITY`` at least).
* Positions (``find``'s answers) stay valid until the next ``insert`` (which may rebuild) or an
  ``assign`` that deletes the last entry (the table is then reallocated at ``MIN_CAPACITY``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

EMPTY = 0
TOMBSTONE = 1
FIRST_VALUE = 2
"""The smallest value a slot can store (0 and 1 mark empty and deleted slots)."""
MIN_CAPACITY = 1024
MAX_LOAD = 0.5
GROW_LOAD = 0.3
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_HIGH = np.uint64(32)
_SCALAR_BELOW = 32
"""Keys still probing below this many: finish them one by one (a numpy round costs more)."""
_RECLAIM_ROUNDS = 4
"""How far back from a deleted slot tombstones before an empty slot are made empty."""

Keys = npt.NDArray[np.uint64]
Positions = npt.NDArray[np.intp]
Values = npt.NDArray[np.uint32]


class U64Table:
    """``uint64`` key -> ``uint32`` value (see the module docstring). Not thread-safe."""

    def __init__(self, capacity: int = MIN_CAPACITY) -> None:
        self._allocate(max(MIN_CAPACITY, capacity))
        self._used = 0
        self._tombstones = 0

    def __len__(self) -> int:
        return self._used

    @property
    def capacity(self) -> int:
        return int(self._keys.size)

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self.values.nbytes)

    def find(self, keys: Keys) -> Positions:
        """Each key's slot, or -1 where it is not stored (duplicates allowed)."""
        return self.find_or_end(keys)[0]

    def find_or_end(self, keys: Keys) -> tuple[Positions, Positions]:
        """``find``'s answer, and for each key not stored the empty slot its probe ended at
        (``insert``'s place to start from: every slot before it in the run is taken)."""
        found = np.full(keys.size, -1, dtype=np.intp)
        ends = np.full(keys.size, -1, dtype=np.intp)
        if not keys.size or not self._used:
            return found, self._home(keys)
        table_keys, values, capacity = self._keys, self.values, self.capacity
        pos = self._home(keys)
        index = np.arange(keys.size)
        while index.size >= _SCALAR_BELOW:
            at = values[pos]
            hit = (table_keys[pos] == keys) & (at >= FIRST_VALUE)
            found[index[hit]] = pos[hit]
            empty = at == EMPTY
            ends[index[empty]] = pos[empty]
            going = ~(hit | empty)
            index, keys, pos = index[going], keys[going], _next(pos[going], capacity)
        get_key, get_value = table_keys.item, values.item
        for i, key, start in zip(index.tolist(), keys.tolist(), pos.tolist(), strict=True):
            p = start
            while (value := get_value(p)) != EMPTY:
                if value >= FIRST_VALUE and get_key(p) == key:
                    found[i] = p
                    break
                p = p + 1 if p + 1 < capacity else 0
            else:
                ends[i] = p
        return found, ends

    def assign(self, positions: Positions, new_values: Values) -> None:
        """Set the values of stored slots; a ``TOMBSTONE`` value deletes the slot's entry."""
        self.values[positions] = new_values
        dead = positions[new_values == TOMBSTONE]
        self._used -= dead.size
        self._tombstones += dead.size
        if not self._used and self._tombstones:  # emptied: back to the smallest table
            self._allocate(MIN_CAPACITY)
            self._tombstones = 0
        elif dead.size:
            self._empty_run_ends(dead)

    def _empty_run_ends(self, dead: Positions) -> None:
        """Tombstones just before an empty slot end no probe run: make them empty, walking
        back a few slots from each of ``dead``."""
        values, capacity = self.values, self.capacity
        for _ in range(_RECLAIM_ROUNDS):
            ends = dead[values[_next(dead.copy(), capacity)] == EMPTY]
            ends = ends[values[ends] == TOMBSTONE]
            if not ends.size:
                return
            values[ends] = EMPTY
            self._tombstones -= int(np.unique(ends).size)
            dead = ends - 1
            dead[dead < 0] = capacity - 1

    def insert(self, keys: Keys, value: int, starts: Positions | None = None) -> None:
        """Store distinct keys none of which is stored yet, all with ``value``.

        Args:
            starts: where each key's probe may start (``find_or_end``'s ends, unchanged
                since); None: at its home slot.
        """
        if not keys.size:
            return
        if self._reserve(keys.size) or starts is None:
            starts = self._home(keys)
        self._place(keys, np.full(keys.size, value, dtype=np.uint32), starts)

    # Internals
    # -----------------------------------------------------------------------------------------

    def _allocate(self, capacity: int) -> None:
        self._keys: Keys = np.zeros(capacity, dtype=np.uint64)
        self.values: Values = np.zeros(capacity, dtype=np.uint32)
        """Per slot: ``EMPTY``, ``TOMBSTONE`` or a stored value (read-only outside)."""
        self._scale = np.uint64(capacity)

    def _home(self, keys: Keys) -> Positions:
        return ((((keys * _GOLDEN) >> _HIGH) * self._scale) >> _HIGH).astype(np.intp)

    def _reserve(self, num_new: int) -> bool:
        """Rebuild first when ``num_new`` more entries would pass ``MAX_LOAD``; whether it did."""
        if self._used + self._tombstones + num_new <= MAX_LOAD * self.capacity:
            return False
        capacity = max(MIN_CAPACITY, int((self._used + num_new) / GROW_LOAD))
        live = self.values >= FIRST_VALUE
        keys, values = self._keys[live], self.values[live]
        del live
        self._allocate(capacity)
        self._used = self._tombstones = 0
        self._place(keys, values, self._home(keys))
        return True

    def _place(self, keys: Keys, values: Values, pos: Positions) -> None:
        """Write absent, distinct keys into free slots (several keys may race for one slot:
        each round the last write to a slot wins it, the others probe on)."""
        table_keys, table_values, capacity = self._keys, self.values, self.capacity
        reused = 0
        index = np.arange(keys.size)
        while index.size >= _SCALAR_BELOW:
            free = table_values[pos] < FIRST_VALUE
            free_pos, free_index = pos[free], index[free]
            table_keys[free_pos] = keys[free_index]
            won = table_keys[free_pos] == keys[free_index]
            won_pos = free_pos[won]
            reused += int(np.count_nonzero(table_values[won_pos] == TOMBSTONE))
            table_values[won_pos] = values[free_index[won]]
            going = np.ones(index.size, dtype=bool)
            going[np.flatnonzero(free)[won]] = False
            index, pos = index[going], _next(pos[going], capacity)
        get_value = table_values.item
        for i, start in zip(index.tolist(), pos.tolist(), strict=True):
            p = start
            while (value := get_value(p)) >= FIRST_VALUE:
                p = p + 1 if p + 1 < capacity else 0
            reused += value == TOMBSTONE
            table_keys[p] = keys[i]
            table_values[p] = values[i]
        self._used += keys.size
        self._tombstones -= reused


def _next(positions: Positions, capacity: int) -> Positions:
    """The slots after ``positions``, wrapping at the end."""
    positions += 1
    positions[positions == capacity] = 0
    return positions
