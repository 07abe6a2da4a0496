"""The producer's hold table: the prefills whose blocks wait for a consumer to read them.

One entry per request, in one of four states::

    hold() ──▶ HELD ──lend() (the consumer asks)──▶ LENT ──release()──▶ DONE
                 │                                    │
                 ├───────── deadline passed ──────────┴──▶ EXPIRED     (collect())
                 │                                    │
                 └──── its consumer left the fleet ───┴──▶ ABANDONED   (abandon())

``finish`` is ``release`` and ``collect`` of one request in one call, for an owner that frees
blocks on the thread that learns the consumer is done (the reference engine's scheduler thread);
vLLM's connector learns it on its signal thread and frees on the engine thread, so it calls
``release`` there and ``collect`` here.

Invariants:

* Every hold leaves the table exactly once, through ``finish``, ``collect``, ``abandon`` or
  ``expire_all``, and the caller that takes it out frees its blocks; a hold is never freed twice
  or leaked.
* ``abandon(consumer, held_before)`` takes out only the holds taken for that consumer before
  ``held_before``: a consumer that left and came back (a restart under the same worker id) keeps
  the holds taken after it was seen leaving. Holds taken without a ``consumer`` are never
  abandoned (their deadline frees them).
* A lent hold's deadline is pushed to at least ``lend`` time + ``lend_grace_s``, so blocks are
  never freed under a read that is still allowed to run. ``rearm`` pushes a held or lent hold's
  deadline later (an owner that holds blocks before it computes them starts the consumer's
  allowance when it offers them); a deadline never moves earlier.
* Requests that left the table are remembered (the last ``MAX_FORGOTTEN``) so that a late
  ``lend`` is refused as finished (``UNKNOWN_REQUEST``) rather than "not yet" (``UNAVAILABLE``).
* ``counts`` only grow: holds taken, released by a consumer, expired by their deadline,
  abandoned by a consumer that left.

Every method is thread-safe; ``item`` values (whatever the owner needs to free the blocks) are
never touched here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Generic, TypeVar

from fabric.errors import InvalidInput
from fabric.signal.errors import ErrorCode

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_FORGOTTEN = 4096
"""Finished request ids remembered to refuse late reads."""


class HoldState(Enum):
    HELD = "held"
    LENT = "lent"
    DONE = "done"
    EXPIRED = "expired"
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a hold cannot be lent: ``UNAVAILABLE`` (not held yet: retry) or ``UNKNOWN_REQUEST``."""

    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Freed(Generic[T]):
    """A hold that left the table: its owner frees ``item``'s blocks now."""

    request_id: str
    item: T
    state: HoldState
    num_blocks: int


@dataclass(slots=True)
class HoldCounts:
    num_holds: int = 0
    """Prefills held for consumers."""
    num_holds_released: int = 0
    """Holds a consumer released (``TransferDone`` or ``Abort``)."""
    num_holds_expired: int = 0
    """Holds freed by their deadline without a release."""
    num_holds_abandoned: int = 0
    """Holds freed because their consumer left the fleet (``abandon``)."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _Hold(Generic[T]):
    item: T
    num_blocks: int
    deadline: float
    consumer: str | None
    held_at: float
    state: HoldState = HoldState.HELD


class HoldTable(Generic[T]):
    """Held prefills and their deadlines (module docstring)."""

    def __init__(self, *, lend_grace_s: float = 0.0) -> None:
        if lend_grace_s < 0:
            raise InvalidInput(f"lend_grace_s={lend_grace_s} must be >= 0")
        self._lend_grace_s = lend_grace_s
        self._lock = threading.Lock()
        self._holds: dict[str, _Hold[T]] = {}
        self._finished: OrderedDict[str, HoldState] = OrderedDict()
        self.counts = HoldCounts()

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)

    def __contains__(self, request_id: object) -> bool:
        with self._lock:
            return request_id in self._holds

    @property
    def num_active(self) -> int:
        """Holds a consumer may still read (held or lent; not released, expired or taken)."""
        with self._lock:
            return sum(h.state in (HoldState.HELD, HoldState.LENT) for h in self._holds.values())

    def hold(
        self,
        request_id: str,
        item: T,
        *,
        num_blocks: int,
        deadline: float,
        consumer: str | None = None,
    ) -> None:
        """Hold ``item`` (``num_blocks`` blocks) for a consumer until ``deadline`` (monotonic).

        Args:
            consumer: the worker id of the consumer it is held for, if known: ``abandon``
                takes it out when that worker leaves.

        Raises:
            InvalidInput: ``request_id`` is already held.
        """
        with self._lock:
            if request_id in self._holds:
                raise InvalidInput(f"request {request_id!r} already has blocks on offer")
            self._holds[request_id] = _Hold(
                item, num_blocks, deadline, consumer, held_at=time.monotonic()
            )
            self._finished.pop(request_id, None)
            self.counts.num_holds += 1
        logger.debug("holding %d blocks of request %s", num_blocks, request_id)

    def lend(
        self, request_id: str, now: float, check: Callable[[T], str | None] | None = None
    ) -> T | Refusal:
        """The held item a consumer may read now, or why not.

        ``check(item)`` (under the lock) returns a reason to refuse this consumer, or None.
        """
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None:
                state = self._finished.get(request_id)
                if state is not None:
                    return Refusal(
                        ErrorCode.UNKNOWN_REQUEST, f"request {request_id} was {state.value}"
                    )
                return Refusal(ErrorCode.UNAVAILABLE, f"request {request_id} is not held (yet)")
            if hold.state not in (HoldState.HELD, HoldState.LENT):
                return Refusal(
                    ErrorCode.UNKNOWN_REQUEST, f"request {request_id} is {hold.state.value}"
                )
            problem = check(hold.item) if check is not None else None
            if problem is not None:
                return Refusal(ErrorCode.UNKNOWN_REQUEST, f"request {request_id}: {problem}")
            hold.state = HoldState.LENT
            hold.deadline = max(hold.deadline, now + self._lend_grace_s)
            return hold.item

    def rearm(self, request_id: str, deadline: float) -> bool:
        """Push a held or lent hold's deadline to at least ``deadline`` (monotonic); False when
        ``request_id`` is not held (released, expired, abandoned or never held)."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.state not in (HoldState.HELD, HoldState.LENT):
                return False
            hold.deadline = max(hold.deadline, deadline)
            return True

    def release(self, request_id: str) -> bool:
        """The consumer is done with (or gave up on) the blocks; False if not held."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.state not in (HoldState.HELD, HoldState.LENT):
                return False
            hold.state = HoldState.DONE
            self.counts.num_holds_released += 1
            return True

    def finish(self, request_id: str) -> T | None:
        """``release`` and take the hold out at once: its item, or None if it was not held."""
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.state not in (HoldState.HELD, HoldState.LENT):
                return None
            self.counts.num_holds_released += 1
            self._forget_locked(request_id, HoldState.DONE)
            return hold.item

    def collect(self, now: float) -> list[Freed[T]]:
        """Take out the holds whose blocks may be freed: released, or past their deadline."""
        freed: list[Freed[T]] = []
        with self._lock:
            for request_id, hold in list(self._holds.items()):
                if hold.state is not HoldState.DONE and now >= hold.deadline:
                    logger.warning(
                        "request %s: no consumer released its %d blocks before the hold "
                        "deadline; freeing them (did the consumer die?)",
                        request_id,
                        hold.num_blocks,
                    )
                    hold.state = HoldState.EXPIRED
                    self.counts.num_holds_expired += 1
                if hold.state in (HoldState.DONE, HoldState.EXPIRED):
                    self._forget_locked(request_id, hold.state)
                    freed.append(Freed(request_id, hold.item, hold.state, hold.num_blocks))
        return freed

    def abandon(self, consumer: str, *, held_before: float) -> list[Freed[T]]:
        """Take out the holds taken for ``consumer`` before ``held_before`` (``time.monotonic()``):
        it left the fleet, so no release will come. Released (DONE) ones count as released."""
        freed: list[Freed[T]] = []
        with self._lock:
            for request_id, hold in list(self._holds.items()):
                if hold.consumer != consumer or hold.held_at >= held_before:
                    continue
                if hold.state is not HoldState.DONE:
                    hold.state = HoldState.ABANDONED
                    self.counts.num_holds_abandoned += 1
                self._forget_locked(request_id, hold.state)
                freed.append(Freed(request_id, hold.item, hold.state, hold.num_blocks))
        return freed

    def expire_all(self) -> list[Freed[T]]:
        """Take out every hold now (shutdown); released ones count as released, not expired."""
        with self._lock:
            freed = [
                Freed(
                    request_id,
                    hold.item,
                    HoldState.DONE if hold.state is HoldState.DONE else HoldState.EXPIRED,
                    hold.num_blocks,
                )
                for request_id, hold in self._holds.items()
            ]
            for entry in freed:
                self._forget_locked(entry.request_id, entry.state)
        return freed

    def _forget_locked(self, request_id: str, state: HoldState) -> None:
        del self._holds[request_id]
        self._finished[request_id] = state
        while len(self._finished) > MAX_FORGOTTEN:
            self._finished.popitem(last=False)
