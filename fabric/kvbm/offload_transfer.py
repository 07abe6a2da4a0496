"""What the offload manager hands out and keeps: its table rows, transfers, onboardings, stats.

``OffloadPath`` is one row of the manager's table (a tier move, its priority, blocks per copy).
A ``Transfer`` is one submission on one path and owns the references it took; an ``Onboarding``
joins the transfers of one ``OffloadManager.onboard`` call into one device handle; ``OffloadStats``
counts ended transfers and blocks. Every record here belongs to the manager's owner thread.

Lifecycle of a ``Transfer``::

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
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from fabric.errors import InvalidTransition, TransferError
from fabric.kvbm.block import ImmutableBlocks, MutableBlocks
from fabric.kvbm.types import SequenceHash, Tier

if TYPE_CHECKING:
    from fabric.kvbm.manager import KvBlockManager
    from fabric.kvbm.offload import OffloadManager


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


class TransferState(Enum):
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

    transfers: Counter[TransferState] = field(default_factory=Counter)
    num_blocks_copied: int = 0
    num_blocks_skipped: int = 0
    """Not queued: the target held the hash or a transfer to it was queued already."""
    num_blocks_filtered: int = 0
    """Not written to disk: the frequency filter did not admit them."""


@dataclass(slots=True, eq=False)
class Transfer:
    """One submission on one path; owner thread only. ``sequence_hashes``: what it moves (a DONE
    transfer put them all in the target). ``cancel()`` gives its references back."""

    path: OffloadPath
    state: TransferState
    priority: int = 0
    sequence_hashes: list[SequenceHash] = field(default_factory=list)
    num_copied: int = 0
    error: TransferError | None = None
    _manager: OffloadManager | None = None
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
        return self.state not in (TransferState.QUEUED, TransferState.IN_FLIGHT)

    def cancel(self) -> bool:
        """Queued: ends now. In flight: ends when its copy returns, registering nothing.
        False if it had ended already."""
        return self._manager is not None and self._manager._cancel(self)


class Onboarding:
    """Device blocks for the longest prefix any tier held at ``onboard`` time."""

    def __init__(
        self, manager: OffloadManager, device: ImmutableBlocks | None, parts: list[Transfer]
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

    def _release_results(self, parts: list[Transfer]) -> None:
        for part in parts:
            if part._result is not None:
                self._manager._kvbm.release(part._result)
                part._result = None
