"""Write-back bookkeeping for the offload manager: which blocks are dirty, and when to copy them.

Modes (``FABRIC_OFFLOAD_MODE``). *write_through*: ``on_registered`` offloads every new device
block at once and every block landing in HOST goes on to DISK: a hit survives any eviction, at
the cost of copying every block, hot or cold, while its request may still run. *write_back*:
new blocks are only marked dirty; ``step`` copies the oldest dirty blocks of a tier once it has
fewer than ``writeback_free`` of its blocks free (its next allocations evict): fewer copies, but a
block evicted before its write-back (between two steps) is lost to the lower tiers.

``DirtyBlocks`` only chooses; the manager copies. Per offload path it keeps the source tier's
dirty hashes least recently registered first (the eviction order) and at most twice the tier's
size (beyond that, the oldest are forgotten). Owner thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

from fabric.kvbm.core.types import SequenceHash
from fabric.kvbm.manager import KvBlockManager
from fabric.kvbm.offload.moves import OffloadPath


class DirtyBlocks:
    """The blocks registered in each offload path's source tier and not yet written back."""

    def __init__(
        self, kvbm: KvBlockManager, paths: Sequence[OffloadPath], writeback_free: float
    ) -> None:
        self._kvbm = kvbm
        self._dirty: dict[OffloadPath, OrderedDict[SequenceHash, None]] = {
            p: OrderedDict() for p in paths if not p.onboard
        }
        sources = {p.source for p in paths if not p.onboard}
        self._low = {t: int(writeback_free * kvbm.pool(t).num_blocks) for t in sources}

    def mark(self, path: OffloadPath, sequence_hashes: Sequence[SequenceHash]) -> None:
        """``sequence_hashes`` were just registered in ``path.source``: newest dirty blocks."""
        dirty, bound = self._dirty[path], 2 * self._kvbm.pool(path.source).num_blocks
        for h in sequence_hashes:
            dirty[h] = None
            dirty.move_to_end(h)  # least recently registered first, like the eviction order
        while len(dirty) > bound:  # beyond twice the tier, the oldest are gone: forget
            dirty.popitem(last=False)

    def batched_pick(self) -> Iterator[tuple[OffloadPath, list[SequenceHash]]]:
        """Per path whose source tier is under pressure: its oldest dirty blocks the tier still
        holds (up to ``batch_size``), no longer dirty; ``unpick`` them if they were not queued."""
        for path, dirty in self._dirty.items():
            pool = self._kvbm.pool(path.source)
            if not dirty or pool.stats().num_free >= self._low[path.source]:
                continue
            picked: list[SequenceHash] = []
            while dirty and len(picked) < path.batch_size:
                h = dirty.popitem(last=False)[0]
                if pool.contains(h):
                    picked.append(h)
            if picked:
                yield path, picked

    def unpick(self, path: OffloadPath, picked: Sequence[SequenceHash]) -> None:
        """Keep ``picked`` dirty, oldest first, as they were before ``batched_pick``."""
        dirty = self._dirty[path]
        for h in reversed(picked):
            dirty[h] = None
            dirty.move_to_end(h, last=False)
