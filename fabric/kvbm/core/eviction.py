"""Eviction policies: which cached (registered, unreferenced) block a pool reuses next.

A pool tells its policy when blocks become evictable (``insert``, on their last release) and
when they stop being evictable (``remove``, when a match takes a reference again), a batch at a
time; when it needs blocks and has no reset ones left it asks ``evict(n)`` for victims. The
policy only chooses; the pool does the bookkeeping (registry, events). Every operation is O(1)
amortized per block in the number of cached blocks (O(p) in the number of distinct priorities,
which is small).

Also here: ``FrequencyFilter``, the admission rule that decides which blocks are worth writing to
disk (a block seen only once is rarely read back).

Invariant shared by all policies (the contract suite in tests/kvbm/test_eviction.py checks it):
``len(policy)`` counts the blocks inserted and neither removed nor evicted; ``evict(n)`` returns
``min(n, len(policy))`` distinct such blocks and forgets them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from typing import Protocol

from fabric.errors import ConfigError
from fabric.kvbm.core.types import BlockId, SequenceHash


class EvictionPolicy(Protocol):
    """Verbs take batches: a pool releases or matches a request's blocks at once, and one call
    per batch instead of per block is most of the policy's cost (tests/kvbm/test_eviction.py)."""

    def insert(self, block_ids: Sequence[BlockId], priorities: Sequence[int]) -> None:
        """These blocks became evictable, in this order (the last is the most recently used);
        ``priorities[i]`` is block i's (higher is kept longer). Refuses (ValueError, changing
        nothing) a block that is already evictable."""

    def remove(self, block_ids: Iterable[BlockId]) -> None:
        """These blocks are referenced again and must not be evicted (unknown ids: no-op)."""

    def evict(self, n: int) -> list[BlockId]:
        """Choose and forget up to ``n`` victims, best victim first."""

    def clear(self) -> None:
        """Forget every block."""

    def __len__(self) -> int: ...

    def __contains__(self, block_id: object) -> bool: ...


def _refuse_evictable(evictable: Mapping[BlockId, object], block_ids: Sequence[BlockId]) -> None:
    if not evictable.keys().isdisjoint(block_ids):
        again = sorted(set(block_ids) & evictable.keys())
        raise ValueError(f"blocks {again} are already evictable")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"blocks {list(block_ids)} repeat an id")


class _Buckets:
    """Blocks grouped by an integer key, LRU order inside each group; lowest key evicted first.

    Each block maps straight to its bucket, so removal is one dict pop and one ``del``. Buckets
    emptied by removal are dropped lazily, when eviction reaches them.
    """

    __slots__ = ("_block_to_bucket", "_buckets")

    def __init__(self) -> None:
        self._buckets: dict[int, OrderedDict[BlockId, None]] = {}
        self._block_to_bucket: dict[BlockId, OrderedDict[BlockId, None]] = {}

    def add(self, block_ids: Sequence[BlockId], keys: Sequence[int]) -> None:
        block_to_bucket = self._block_to_bucket
        _refuse_evictable(block_to_bucket, block_ids)
        buckets = self._buckets
        bucket: OrderedDict[BlockId, None] | None = None
        bucket_key: int | None = None
        for block_id, key in zip(block_ids, keys, strict=True):
            if key != bucket_key or bucket is None:
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = OrderedDict()
                bucket_key = key
            bucket[block_id] = None
            block_to_bucket[block_id] = bucket

    def discard(self, block_ids: Iterable[BlockId]) -> None:
        pop = self._block_to_bucket.pop
        for block_id in block_ids:
            bucket = pop(block_id, None)
            if bucket is not None:
                del bucket[block_id]

    def pop_lowest(self, n: int) -> list[BlockId]:
        victims: list[BlockId] = []
        buckets = self._buckets
        n = min(n, len(self._block_to_bucket))
        while len(victims) < n:
            key = min(buckets)
            bucket = buckets[key]
            popitem = bucket.popitem
            for _ in range(min(n - len(victims), len(bucket))):
                victims.append(popitem(last=False)[0])
            if not bucket:
                del buckets[key]
        block_to_bucket = self._block_to_bucket
        for block_id in victims:
            del block_to_bucket[block_id]
        return victims

    def clear(self) -> None:
        self._buckets.clear()
        self._block_to_bucket.clear()

    def __len__(self) -> int:
        return len(self._block_to_bucket)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._block_to_bucket


class LruPolicy:
    """Least recently released first; priorities ignored."""

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[BlockId, None] = OrderedDict()

    def insert(self, block_ids: Sequence[BlockId], priorities: Sequence[int]) -> None:
        order = self._order
        _refuse_evictable(order, block_ids)
        for block_id in block_ids:
            order[block_id] = None

    def remove(self, block_ids: Iterable[BlockId]) -> None:
        pop = self._order.pop
        for block_id in block_ids:
            pop(block_id, None)

    def evict(self, n: int) -> list[BlockId]:
        order = self._order
        return [order.popitem(last=False)[0] for _ in range(min(n, len(order)))]

    def clear(self) -> None:
        self._order.clear()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._order


class PriorityLruPolicy:
    """Lowest priority first, least recently released first among equals (the default)."""

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets = _Buckets()

    def insert(self, block_ids: Sequence[BlockId], priorities: Sequence[int]) -> None:
        self._buckets.add(block_ids, priorities)

    def remove(self, block_ids: Iterable[BlockId]) -> None:
        self._buckets.discard(block_ids)

    def evict(self, n: int) -> list[BlockId]:
        return self._buckets.pop_lowest(n)

    def clear(self) -> None:
        self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._buckets


class LfuPolicy:
    """Least frequently used first (uses = releases since the block was last evicted), then LRU.

    A block's count survives being matched again (``remove``) and is dropped when it is evicted,
    since the block id then holds other content.
    """

    __slots__ = ("_buckets", "_uses")

    def __init__(self) -> None:
        self._buckets = _Buckets()
        self._uses: dict[BlockId, int] = {}

    def insert(self, block_ids: Sequence[BlockId], priorities: Sequence[int]) -> None:
        get = self._uses.get
        counts = [get(block_id, 0) + 1 for block_id in block_ids]
        self._buckets.add(block_ids, counts)  # refuses before anything is counted
        self._uses.update(zip(block_ids, counts, strict=True))

    def remove(self, block_ids: Iterable[BlockId]) -> None:
        self._buckets.discard(block_ids)

    def evict(self, n: int) -> list[BlockId]:
        victims = self._buckets.pop_lowest(n)
        for block_id in victims:
            del self._uses[block_id]
        return victims

    def clear(self) -> None:
        self._buckets.clear()
        self._uses.clear()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._buckets


class EvictionKind(Enum):
    LRU = "lru"
    PRIORITY_LRU = "priority_lru"
    LFU = "lfu"


_POLICIES: dict[EvictionKind, type[LruPolicy | PriorityLruPolicy | LfuPolicy]] = {
    EvictionKind.LRU: LruPolicy,
    EvictionKind.PRIORITY_LRU: PriorityLruPolicy,
    EvictionKind.LFU: LfuPolicy,
}


def build_policy(kind: EvictionKind) -> EvictionPolicy:
    """A fresh policy of the given kind."""
    return _POLICIES[kind]()


class FrequencyFilter:
    """Admits a block to a slow tier once its sequence hash has been seen ``min_count`` times.

    Counts are bounded: after ``window`` observations every count is halved and zeros are
    dropped (the aging step of TinyLFU), so memory stays O(window) and old popularity fades.
    ``min_count=1`` admits every hash observed at least once.
    """

    __slots__ = ("_counts", "_min_count", "_observed", "_window")

    def __init__(self, min_count: int = 2, window: int = 1 << 20) -> None:
        if min_count < 1:
            raise ConfigError(f"disk admission min_count must be >= 1, got {min_count}")
        if window < 1:
            raise ConfigError(f"disk admission window must be >= 1, got {window}")
        self._min_count = min_count
        self._window = window
        self._counts: dict[SequenceHash, int] = {}
        self._observed = 0

    def observe(self, sequence_hashes: list[SequenceHash]) -> None:
        """Count one use of each hash (a registration or a match)."""
        counts = self._counts
        for h in sequence_hashes:
            counts[h] = counts.get(h, 0) + 1
        self._observed += len(sequence_hashes)
        if self._observed >= self._window:
            self._counts = {h: c >> 1 for h, c in counts.items() if c > 1}
            self._observed = 0

    def admits(self, sequence_hash: SequenceHash) -> bool:
        return self._counts.get(sequence_hash, 0) >= self._min_count

    def count(self, sequence_hash: SequenceHash) -> int:
        return self._counts.get(sequence_hash, 0)
