"""The offload manager's copy thread: batches of block ids in, finished batches out.

Pools are single-owner, so the copy thread never sees one: the owner thread hands it a ``CopyJob``
(two storages and their block ids, already referenced and allocated; or a storage's block ids and
the G4 store with the sequence hashes to write them under), the thread only runs ``copy_blocks``
(or packs the blocks and writes them to the store) and hands the job back, with the exception on it
if the copy raised (a failure is data; the owner thread returns the blocks). Jobs run by priority
(higher first), then in submission order. (CUDA copies from this thread would need their own
stream; untested here, no GPU.)

Invariant: every submitted job comes back through ``collect`` exactly once, unless ``stop``'s
join timed out while it still ran.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import cast

from fabric.kvbm.core.types import SequenceHash
from fabric.kvbm.offload.moves import OffloadPath, TierMove
from fabric.kvbm.shared.store import SharedBlockStore, store_blocks
from fabric.kvbm.tiers.block_copy import copy_blocks
from fabric.kvbm.tiers.storage import Storage


@dataclass(slots=True, eq=False)
class CopyJob:
    """One batch for the copy thread: storages and ids, never a pool. With a ``SharedBlockStore`` as
    ``dst``, ``dst_ids`` are the sequence hashes to store ``src_ids`` under."""

    path: OffloadPath
    transfers: list[TierMove]
    src: Storage
    src_ids: list[int]
    dst: Storage | SharedBlockStore
    dst_ids: list[int]
    error: Exception | None = None

    def run(self) -> None:
        if not isinstance(self.dst, SharedBlockStore):
            copy_blocks(self.src, self.src_ids, self.dst, self.dst_ids)
            return
        store_blocks(self.src, self.src_ids, self.dst, cast(list[SequenceHash], self.dst_ids))


class CopyThread:
    """One daemon thread running ``copy_blocks`` for submitted jobs; started on construction."""

    def __init__(self, name: str = "kvbm-offload") -> None:
        self._seq = itertools.count()
        self._inbox: queue.PriorityQueue[tuple[int, int, CopyJob | None]] = queue.PriorityQueue()
        self._outbox: queue.SimpleQueue[CopyJob] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: CopyJob) -> None:
        """Queue ``job`` behind those of a higher path priority and those submitted before it."""
        self._inbox.put((-job.path.priority, next(self._seq), job))

    def collect(self, timeout_s: float) -> list[CopyJob]:
        """The finished jobs; waits up to ``timeout_s`` for the first if it is positive."""
        jobs: list[CopyJob] = []
        try:
            if timeout_s > 0:
                jobs.append(self._outbox.get(timeout=timeout_s))
            while True:
                jobs.append(self._outbox.get_nowait())
        except queue.Empty:
            pass
        return jobs

    def stop(self, timeout_s: float) -> None:
        """End the thread after every job already submitted; wait for it up to ``timeout_s``."""
        self._inbox.put((1 << 62, 0, None))
        self.join(timeout_s)

    def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the thread to end (after ``stop``)."""
        self._thread.join(max(0.0, timeout_s))

    def _loop(self) -> None:
        while (job := self._inbox.get()[2]) is not None:
            try:
                job.run()
            except Exception as exc:  # reported as data; the owner thread returns the blocks
                job.error = exc
            self._outbox.put(job)
