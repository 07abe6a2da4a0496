"""``LeaseTable``: things held for a peer until it lets them go or their deadline passes.

Owns lease ids, owners and deadlines, nothing of what is held: the node cache keeps its
reservations and pins here and releases what ``take`` or ``expire`` hands back. Times are the
table's clock (``time.monotonic`` in the service, a manual clock in tests).

Invariants:

* A lease id is granted once (ids count up from 1) and is live until ``take``, ``expire`` or
  ``take_peer`` returns its item, exactly once; after that every call about it says it is gone.
* Only the peer that was granted a lease may take or renew it.
* ``expire(now)`` returns every live lease whose deadline is at or before ``now`` and no other;
  it scans only when the earliest deadline has come (O(1) otherwise).

Not thread-safe: the node cache calls it under its own lock.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NewType, TypeVar

LeaseId = NewType("LeaseId", int)
T = TypeVar("T")


@dataclass(slots=True)
class _Entry(Generic[T]):
    peer: str
    item: T
    deadline: float


class LeaseGone(LookupError):
    """The lease is not live (never granted, released, expired) or belongs to another peer."""


class LeaseTable(Generic[T]):
    """Live leases by id (see the module docstring)."""

    def __init__(self, lease_s: float, clock: Callable[[], float]) -> None:
        self.lease_s = lease_s
        self._clock = clock
        self._ids = itertools.count(1)
        self._entries: dict[LeaseId, _Entry[T]] = {}
        self._earliest = math.inf

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        """The table's clock."""
        return self._clock()

    def items(self) -> list[T]:
        return [entry.item for entry in self._entries.values()]

    def grant(self, peer: str, item: T) -> tuple[LeaseId, float]:
        """A new lease on ``item`` for ``peer``: (its id, its deadline)."""
        lease_id = LeaseId(next(self._ids))
        deadline = self._clock() + self.lease_s
        self._entries[lease_id] = _Entry(peer, item, deadline)
        self._earliest = min(self._earliest, deadline)
        return lease_id, deadline

    def remaining_s(self, deadline: float) -> float:
        return max(0.0, deadline - self._clock())

    def take(self, lease_id: int, peer: str) -> T:
        """End ``peer``'s lease ``lease_id``; its item, now the caller's to release.

        Raises:
            LeaseGone: it is not live, or not ``peer``'s.
        """
        self._check(lease_id, peer)
        return self._entries.pop(LeaseId(lease_id)).item

    def peek(self, lease_id: int, peer: str) -> T:
        """``peer``'s live lease's item, left in place (raises ``LeaseGone`` like ``take``)."""
        return self._check(lease_id, peer).item

    def renew(self, lease_id: int, peer: str) -> tuple[T, float]:
        """Move ``peer``'s lease's deadline to one lease time from now: (its item, the deadline)."""
        entry = self._check(lease_id, peer)
        entry.deadline = self._clock() + self.lease_s
        return entry.item, entry.deadline

    def take_peer(self, peer: str) -> list[T]:
        """End every lease of ``peer`` (a client that attached again: its old self is gone)."""
        ids = [i for i, entry in self._entries.items() if entry.peer == peer]
        return [self._entries.pop(i).item for i in ids]

    def expire(self) -> list[tuple[str, T]]:
        """End every lease whose deadline has come: (its peer, its item), oldest grant first."""
        now = self._clock()
        if now < self._earliest:
            return []
        gone = [i for i, entry in self._entries.items() if entry.deadline <= now]
        expired = [(entry.peer, entry.item) for entry in map(self._entries.pop, gone)]
        self._earliest = min((e.deadline for e in self._entries.values()), default=math.inf)
        return expired

    def _check(self, lease_id: int, peer: str) -> _Entry[T]:
        entry = self._entries.get(LeaseId(lease_id))
        if entry is None:
            raise LeaseGone(f"lease {lease_id} is not live (released, expired or never granted)")
        if entry.peer != peer:
            raise LeaseGone(f"lease {lease_id} belongs to {entry.peer!r}, not to {peer!r}")
        return entry
