"""Eviction policies: which evictable key an owner gives up next.

A key is whatever its owner evicts: a ``BlockId`` for the device and host pools (which cached,
registered and unreferenced block to reuse), a ``SequenceHash`` for the G4 shared store's index
(which block file to unlink). The policies are generic over the key type and never look inside a
key; they only hash it and compare it for equality.

An owner tells its policy when keys become evictable (``insert``; a pool does on their last
release) and when they stop being evictable (``remove``; a pool does when a match takes a
reference again), a batch at a time; when it needs room it asks ``evict(n)`` for victims. The
policy only chooses; the owner does the bookkeeping (registry, events, files). Every operation is
O(1) amortized per key in the number of evictable keys (O(p) in the number of distinct
priorities, which is small).

Also here: ``FrequencyFilter``, the admission rule that decides which blocks are worth writing to
disk (a block seen only once is rarely read back).

Invariant shared by all policies (the contract suite in tests/kvbm/test_eviction.py checks it):
``len(policy)`` counts the keys inserted and neither removed nor evicted; ``evict(n)`` returns
``min(n, len(policy))`` distinct such keys and forgets them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from enum import Enum
from typing import Generic, Protocol, TypeVar

from fabric.errors import ConfigError
from fabric.kvbm.core.types import BlockId, SequenceHash

K = TypeVar("K", bound=Hashable)
"""The key a policy orders: ``BlockId`` in the pools, ``SequenceHash`` in the G4 store."""


class EvictionPolicy(Protocol[K]):
    """Verbs take batches: a pool releases or matches a request's blocks at once, and one call
    per batch instead of per key is most of the policy's cost (tests/kvbm/test_eviction.py)."""

    def insert(self, keys: Sequence[K], priorities: Sequence[int]) -> None:
        """These keys became evictable, in this order (the last is the most recently used);
        ``priorities[i]`` is key i's (higher is kept longer). Refuses (ValueError, changing
        nothing) a key that is already evictable."""

    def remove(self, keys: Iterable[K]) -> None:
        """These keys are in use again and must not be evicted (unknown keys: no-op)."""

    def evict(self, n: int) -> list[K]:
        """Choose and forget up to ``n`` victims, best victim first."""

    def clear(self) -> None:
        """Forget every key."""

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...


def _refuse_evictable(evictable: Mapping[K, object], keys: Sequence[K]) -> None:
    if not evictable.keys().isdisjoint(keys):
        again = [key for key in dict.fromkeys(keys) if key in evictable]
        raise ValueError(f"keys {again} are already evictable")
    if len(set(keys)) != len(keys):
        raise ValueError(f"keys {list(keys)} repeat a key")


class _Buckets(Generic[K]):
    """Keys grouped by an integer rank, LRU order inside each group; lowest rank evicted first.

    Each key maps straight to its bucket, so removal is one dict pop and one ``del``. Buckets
    emptied by removal are dropped lazily, when eviction reaches them.
    """

    __slots__ = ("_buckets", "_key_to_bucket")

    def __init__(self) -> None:
        self._buckets: dict[int, OrderedDict[K, None]] = {}
        self._key_to_bucket: dict[K, OrderedDict[K, None]] = {}

    def add(self, keys: Sequence[K], ranks: Sequence[int]) -> None:
        key_to_bucket = self._key_to_bucket
        _refuse_evictable(key_to_bucket, keys)
        buckets = self._buckets
        bucket: OrderedDict[K, None] | None = None
        bucket_rank: int | None = None
        for key, rank in zip(keys, ranks, strict=True):
            if rank != bucket_rank or bucket is None:
                bucket = buckets.get(rank)
                if bucket is None:
                    bucket = buckets[rank] = OrderedDict()
                bucket_rank = rank
            bucket[key] = None
            key_to_bucket[key] = bucket

    def discard(self, keys: Iterable[K]) -> None:
        pop = self._key_to_bucket.pop
        for key in keys:
            bucket = pop(key, None)
            if bucket is not None:
                del bucket[key]

    def pop_lowest(self, n: int) -> list[K]:
        victims: list[K] = []
        buckets = self._buckets
        n = min(n, len(self._key_to_bucket))
        while len(victims) < n:
            rank = min(buckets)
            bucket = buckets[rank]
            popitem = bucket.popitem
            for _ in range(min(n - len(victims), len(bucket))):
                victims.append(popitem(last=False)[0])
            if not bucket:
                del buckets[rank]
        key_to_bucket = self._key_to_bucket
        for key in victims:
            del key_to_bucket[key]
        return victims

    def clear(self) -> None:
        self._buckets.clear()
        self._key_to_bucket.clear()

    def __len__(self) -> int:
        return len(self._key_to_bucket)

    def __contains__(self, key: object) -> bool:
        return key in self._key_to_bucket


class LruPolicy(Generic[K]):
    """Least recently inserted first; priorities ignored. Re-inserting after ``remove`` makes a
    key the most recently used (a touch)."""

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, keys: Sequence[K], priorities: Sequence[int]) -> None:
        order = self._order
        _refuse_evictable(order, keys)
        for key in keys:
            order[key] = None

    def remove(self, keys: Iterable[K]) -> None:
        pop = self._order.pop
        for key in keys:
            pop(key, None)

    def evict(self, n: int) -> list[K]:
        order = self._order
        return [order.popitem(last=False)[0] for _ in range(min(n, len(order)))]

    def clear(self) -> None:
        self._order.clear()

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class PriorityLruPolicy(Generic[K]):
    """Lowest priority first, least recently inserted first among equals (the pools' default)."""

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: _Buckets[K] = _Buckets()

    def insert(self, keys: Sequence[K], priorities: Sequence[int]) -> None:
        self._buckets.add(keys, priorities)

    def remove(self, keys: Iterable[K]) -> None:
        self._buckets.discard(keys)

    def evict(self, n: int) -> list[K]:
        return self._buckets.pop_lowest(n)

    def clear(self) -> None:
        self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets


class LfuPolicy(Generic[K]):
    """Least frequently used first (uses = inserts since the key was last evicted), then LRU.

    A key's count survives ``remove`` (a pool's block matched again) and is dropped when it is
    evicted, since a pool's block id then holds other content.
    """

    __slots__ = ("_buckets", "_uses")

    def __init__(self) -> None:
        self._buckets: _Buckets[K] = _Buckets()
        self._uses: dict[K, int] = {}

    def insert(self, keys: Sequence[K], priorities: Sequence[int]) -> None:
        get = self._uses.get
        counts = [get(key, 0) + 1 for key in keys]
        self._buckets.add(keys, counts)  # refuses before anything is counted
        self._uses.update(zip(keys, counts, strict=True))

    def remove(self, keys: Iterable[K]) -> None:
        self._buckets.discard(keys)

    def evict(self, n: int) -> list[K]:
        victims = self._buckets.pop_lowest(n)
        for key in victims:
            del self._uses[key]
        return victims

    def clear(self) -> None:
        self._buckets.clear()
        self._uses.clear()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets


class EvictionKind(Enum):
    LRU = "lru"
    PRIORITY_LRU = "priority_lru"
    LFU = "lfu"


_POLICIES: dict[EvictionKind, Callable[[], EvictionPolicy[BlockId]]] = {
    EvictionKind.LRU: LruPolicy,
    EvictionKind.PRIORITY_LRU: PriorityLruPolicy,
    EvictionKind.LFU: LfuPolicy,
}


def build_policy(kind: EvictionKind) -> EvictionPolicy[BlockId]:
    """A fresh policy of the given kind, for a pool's block ids."""
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
