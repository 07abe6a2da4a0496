"""``NodeDisk``: the node cache's own disk tier below its shared-memory pool (issue 13).

The store is kvbm's G4 ``SharedBlockStore`` on a directory of this node (one file per block:
a verified header, atomic temp-file + rename writes, LRU by mtime, the index rebuilt by a
rescan when it opens), so a node cache restarted with the same ``--disk-dir`` (after a clean
stop or a kill -9) serves every block a previous instance wrote. Nothing here is a second cache:
the pool, its registry and its eviction stay ``NodeCache``'s; this only moves bytes.

Write-through, not spill-on-evict: a committed block is queued for its file at commit, so a
kill -9 of the service loses at most the queue (an eviction-time spill would lose everything
still in shared memory, the blocks a restart most needs). The queue holds a reference on each
queued block (``held``: not evictable, so its slot is not rewritten while the file is written)
and is bounded (``max_pending_blocks``; an empty queue takes any one batch): a commit that would
pass the bound is not written (``num_skipped``; the block stays in shared memory). One thread
writes; the cache releases each batch's references (``drain``, under its lock, at its next
request or sweep) once its files are written.

Onboarding (``onboard``) runs on the caller's thread under the cache's lock: the files of a
prefix are read and verified into slots the cache allocated, cut at the first block that is
absent or corrupt (a corrupt file is removed by the store: a miss, never wrong bytes).

Invariants: a file exists only for a block committed under that hash (the store's atomic
rename); a queued block is referenced until its write ended (written, skipped or failed); after
``close`` no write starts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fabric.errors import FabricError
from fabric.kvbm import (
    BlockPool,
    ImmutableBlocks,
    SequenceHash,
    SharedBlockStore,
    Storage,
    register_positions,
)
from fabric.kvbm.shared.store import store_blocks
from fabric.kvbm.tiers.block_copy import scatter_from_staging
from fabric.node.index import IndexWriter

logger = logging.getLogger(__name__)


DISK_STATS = (
    "disk_blocks",
    "disk_written",
    "disk_onboarded",
    "disk_skipped",
    "disk_failed",
    "disk_pending",
)
"""The keys of ``NodeDisk.stats`` (zeros in a node cache without a disk tier)."""


@dataclass(frozen=True, slots=True)
class _Batch:
    hashes: list[SequenceHash]
    slots: list[int]
    held: ImmutableBlocks


class NodeDisk:
    """The disk tier of one node cache (see the module docstring).

    Args:
        store: the block files (its compat hash and block bytes are the node's).
        storage: the shared segment (the slots blocks are written from and read into).
        max_pending_blocks: the most blocks queued for writing at once.
    """

    def __init__(
        self,
        store: SharedBlockStore,
        storage: Storage,
        *,
        max_pending_blocks: int,
    ) -> None:
        self.store = store
        self._storage = storage
        self._written: list[ImmutableBlocks] = []
        """References of batches whose write ended, for the cache to release (``drain``)."""
        self._max_pending = max_pending_blocks
        self._queue: queue.Queue[_Batch | threading.Event | None] = queue.Queue()
        """Batches to write; an event is set when the writer reaches it; None stops it."""
        self._pending = 0
        self._lock = threading.Lock()
        self.num_written = 0
        self.num_skipped = 0
        self.num_failed = 0
        self.num_onboarded = 0
        self._thread = threading.Thread(target=self._run, name="node-disk-writer", daemon=True)
        self._thread.start()

    def offload(
        self, hashes: Sequence[SequenceHash], slots: Sequence[int], held: ImmutableBlocks
    ) -> bool:
        """Queue committed blocks (``slots[i]`` holds ``hashes[i]``, referenced by ``held``) for
        their files; False (nothing queued, ``held`` not taken) when they would take the queue
        past its bound (an empty queue takes any batch, so a large one is written alone)."""
        with self._lock:
            if self._pending and self._pending + len(slots) > self._max_pending:
                self.num_skipped += len(slots)
                return False
            self._pending += len(slots)
        self._queue.put(_Batch(list(hashes), list(slots), held))
        return True

    def prefix_length(self, hashes: Sequence[SequenceHash]) -> int:
        """How many leading ``hashes`` have files (reads no payload)."""
        return self.store.prefix_length(hashes) if hashes else 0

    def onboard(self, hashes: Sequence[SequenceHash], slots: Sequence[int]) -> int:
        """Read the files of ``hashes`` into ``slots``, verified; how many leading ones were."""
        block_bytes = self.store.block_bytes
        staging = torch.empty(len(hashes) * block_bytes, dtype=torch.uint8)
        num_read = self.store.read_many(hashes, staging.numpy().reshape(len(hashes), block_bytes))
        if num_read:
            scatter_from_staging(staging, self._storage, slots[:num_read])
        self.num_onboarded += num_read
        return num_read

    def drain(self) -> list[ImmutableBlocks]:
        """The references of every batch written since the last call (the cache releases them
        under its lock; until then they count against ``max_pending_blocks``)."""
        with self._lock:
            written, self._written = self._written, []
            self._pending -= sum(len(held) for held in written)
        return written

    @property
    def num_pending(self) -> int:
        with self._lock:
            return self._pending

    def stats(self) -> dict[str, int]:
        return dict(
            zip(
                DISK_STATS,
                (
                    len(self.store),
                    self.num_written,
                    self.num_onboarded,
                    self.num_skipped,
                    self.num_failed,
                    self.num_pending,
                ),
                strict=True,
            )
        )

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every queued write ended within ``timeout_s`` (tests, clean stops)."""
        reached = threading.Event()
        self._queue.put(reached)  # the writer reaches it after every batch queued before
        return reached.wait(timeout_s)

    def close(self) -> None:
        """Write what is queued (bounded wait), stop the writer, close the store. Idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30.0)
        self.store.close()

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if isinstance(batch, threading.Event):
                batch.set()
                continue
            try:
                self.num_written += store_blocks(
                    self._storage, batch.slots, self.store, batch.hashes
                )
            except FabricError as exc:
                self.num_failed += len(batch.slots)
                logger.warning("node disk: %d blocks not written (%s)", len(batch.slots), exc)
            finally:
                with self._lock:
                    self._written.append(batch.held)


def onboard_prefix(
    pool: BlockPool, disk: NodeDisk, index: IndexWriter | None, hashes: Sequence[SequenceHash]
) -> int:
    """Extend the pool's prefix of ``hashes`` with the disk's next blocks: read into fresh slots,
    registered (events chained), published in the index; how many (0: none on disk, no room, or
    the first file absent or corrupt). The pool's own prefix is referenced meanwhile, so making
    room never evicts it. Called under the cache's lock."""
    start = pool.prefix_length(hashes)
    num = min(disk.prefix_length(hashes[start:]), pool.num_free)
    if not num:
        return 0
    present = pool.match_present(hashes[:start])
    slots = pool.allocate(num)
    assert slots is not None  # at most num_free blocks were asked for
    try:
        if index is not None:
            index.unpublish(slots.block_ids)
        num_read = disk.onboard(hashes[start : start + num], slots.block_ids)
    except BaseException:
        pool.release(slots)
        pool.release(present)
        raise
    read, rest = slots.split(num_read)
    pool.release(rest)
    if num_read:
        ids = list(read.block_ids)
        positions = list(range(start, start + num_read))
        register_positions(pool, read, hashes, positions, [None, *hashes[:-1]])
        if index is not None:
            index.publish_registered(pool, ids, [hashes[p] for p in positions])
    else:
        pool.release(read)
    pool.release(present)
    return num_read
