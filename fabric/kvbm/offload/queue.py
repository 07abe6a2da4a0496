"""The offload manager's per-path queues: which transfers wait, and which batch is copied next.

One heap per ``OffloadPath``. The next batch comes from the path of highest priority that has a
transfer waiting (onboards first in the default table), and within it by request priority, then
age, until ``batch_size`` blocks; a cancelled transfer stays in its heap and is skipped when
popped. Backpressure is counted in blocks: offloads count toward ``max_queued_blocks``, onboards
never do (they are never refused). Owner thread only.

Invariant: ``num_queued_blocks`` is the sum of ``TierMove._queued_blocks`` over the transfers
pushed and not yet ``unqueue``d.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

from fabric.kvbm.offload.moves import MoveState, OffloadPath, TierMove


class PathQueues:
    """A priority heap of QUEUED transfers per path, with a bound on queued offload blocks."""

    def __init__(self, paths: Sequence[OffloadPath], max_queued_blocks: int) -> None:
        self._paths = sorted(paths, key=lambda p: -p.priority)
        self._heaps: dict[OffloadPath, list[tuple[int, int, TierMove]]] = {
            p: [] for p in self._paths
        }
        self._seq = itertools.count()
        self._max_queued, self.num_queued_blocks = max_queued_blocks, 0

    def __bool__(self) -> bool:
        return any(self._heaps.values())

    def full(self, num_blocks: int) -> bool:
        """Whether queueing ``num_blocks`` more offload blocks would pass the bound (a first
        transfer is always taken, however large)."""
        return bool(self.num_queued_blocks) and (
            self.num_queued_blocks + num_blocks > self._max_queued
        )

    def push(self, transfer: TierMove) -> None:
        """Queue a QUEUED transfer on its path; its offload blocks count until ``unqueue``."""
        transfer._queued_blocks = 0 if transfer.path.onboard else len(transfer.sequence_hashes)
        self.num_queued_blocks += transfer._queued_blocks
        heapq.heappush(self._heaps[transfer.path], (-transfer.priority, next(self._seq), transfer))

    def unqueue(self, transfer: TierMove) -> None:
        """``transfer`` left the queue (dispatched or ended): its blocks no longer count."""
        self.num_queued_blocks -= transfer._queued_blocks
        transfer._queued_blocks = 0

    def pop_batch(self) -> tuple[OffloadPath, list[TierMove]] | None:
        """The best path's next transfers, up to its ``batch_size`` blocks (at least one popped;
        the batch is empty if every popped one was cancelled); None if nothing waits."""
        path = next((p for p in self._paths if self._heaps[p]), None)
        if path is None:
            return None
        entries, batch, num = self._heaps[path], list[TierMove](), 0
        while entries and (not batch or num < path.batch_size):
            transfer = heapq.heappop(entries)[2]
            if transfer.state is MoveState.QUEUED:  # cancelled ones are left in place
                batch.append(transfer)
                num += len(transfer.sequence_hashes)
        return path, batch

    def take_all(self) -> list[TierMove]:
        """Empty every heap; the transfers that were in them, path by path."""
        taken: list[TierMove] = []
        for entries in self._heaps.values():
            taken += [transfer for *_, transfer in entries]
            entries.clear()
        return taken
