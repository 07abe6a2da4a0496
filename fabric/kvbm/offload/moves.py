"""What the offload manager hands out and keeps: its table rows, tier moves and stats.

``OffloadPath`` is one row of the manager's table (a tier move, its priority, blocks per copy).
A ``TierMove`` is one submission on one path and owns the references it took; ``OffloadStats``
counts ended moves and blocks (``Onboarding``, which joins the moves of one ``onboard`` call, lives
with the manager). Every record here belongs to the manager's owner thread.

Lifecycle of a ``TierMove``::

    QUEUED ──dispatch──▶ IN_FLIGHT ──copied, registered──▶ DONE
      │ └─target full──▶ DROPPED      ├──copy raised──▶ FAILED (TransferError logged, counted)
      └─────cancel─────▶ CANCELLED ◀──┘ cancel: the copy ends, its allocation is returned
    at submission: BUSY (queue bound reached), or DONE when the target lacks nothing

Invariants: every reference a transfer takes is released once when it ends (DONE, FAILED,
CANCELLED, DROPPED); an ``Onboarding`` is taken (``wait``) or cancelled once, and either way every
device block it holds goes to the caller or back to the pool.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from fabric.errors import TransferError
from fabric.kvbm.core.block import ImmutableBlocks, MutableBlocks
from fabric.kvbm.core.types import SequenceHash, Tier


@dataclass(frozen=True, slots=True)
class OffloadPath:
    """One row of the table: a tier move, its priority (higher first), blocks per copy."""

    source: Tier
    target: Tier
    priority: int = 0
    batch_size: int = 64

    @property
    def onboard(self) -> bool:
        return self.target is Tier.DEVICE


class MoveState(Enum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DROPPED = "dropped"
    BUSY = "busy"


@dataclass(slots=True)
class OffloadStats:
    """Ended transfers by state, and blocks, since the manager was built."""

    transfers: Counter[MoveState] = field(default_factory=Counter)
    num_blocks_copied: int = 0
    num_blocks_skipped: int = 0
    """Not queued: the target held the hash or a transfer to it was queued already."""
    num_blocks_filtered: int = 0
    """Not written to disk: the frequency filter did not admit them."""


@dataclass(slots=True, eq=False)
class TierMove:
    """One submission on one path; owner thread only. ``sequence_hashes``: what it moves (a DONE
    transfer put them all in the target). ``cancel()`` gives its references back."""

    path: OffloadPath
    state: MoveState
    priority: int = 0
    sequence_hashes: list[SequenceHash] = field(default_factory=list)
    num_copied: int = 0
    error: TransferError | None = None
    _canceller: Callable[[TierMove], bool] | None = None
    """The manager's cancel; this module never imports the manager (no import cycle)."""
    _source: ImmutableBlocks | None = None
    _parents: list[SequenceHash | None] = field(default_factory=list)
    _held: ImmutableBlocks | None = None
    _allocation: MutableBlocks | None = None
    _missing: list[int] = field(default_factory=list)
    _result: ImmutableBlocks | None = None
    _queued_blocks: int = 0
    _cancelling: bool = False

    @property
    def done(self) -> bool:
        return self.state not in (MoveState.QUEUED, MoveState.IN_FLIGHT)

    def cancel(self) -> bool:
        """Queued: ends now. In flight: ends when its copy returns, registering nothing.
        False if it had ended already."""
        return self._canceller is not None and self._canceller(self)
