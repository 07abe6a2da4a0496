"""A KV event batch as the index applies it: runs of hashes, deduplicated and grouped in bulk.

Owns the numpy side of ``KvPrefixIndex.apply``: ``runs`` joins a batch's consecutive stores (or
removals) of one tier into one array of hashes (an ``AllCleared`` is a run of its own), so each
run is one vectorized lookup; ``distinct`` drops repeated hashes; ``group`` and ``counted`` turn
the looked-up state ids into one state change per distinct old state. Pure functions over
arrays: no index state.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt

from fabric.frontend.hash_table import Keys
from fabric.kvbm import AllCleared, KvEvent, SequenceHash, Tier


def runs(events: Iterable[KvEvent]) -> Iterator[tuple[type, Tier, Keys]]:
    """The batch's events with consecutive stores (or removals) of one tier joined into one
    ``(kind, tier, hashes)``; an ``AllCleared`` is its own run (its hashes empty)."""
    kind: type | None = None
    tier = Tier.DEVICE
    parts: list[tuple[SequenceHash, ...]] = []
    for event in events:
        if isinstance(event, AllCleared):
            if kind is not None:
                yield kind, tier, as_keys(parts)
                kind, parts = None, []
            yield AllCleared, event.tier, np.empty(0, dtype=np.uint64)
            continue
        if (type(event), event.tier) != (kind, tier):
            if kind is not None:
                yield kind, tier, as_keys(parts)
            kind, tier, parts = type(event), event.tier, []
        parts.append(event.sequence_hashes)
    if kind is not None:
        yield kind, tier, as_keys(parts)


def as_keys(parts: list[tuple[SequenceHash, ...]]) -> Keys:
    if len(parts) == 1:
        return np.array(parts[0], dtype=np.uint64)
    return np.fromiter(itertools.chain.from_iterable(parts), dtype=np.uint64)


def distinct(keys: Keys) -> Keys:
    """``keys`` without repeats (order not kept when there were some)."""
    if keys.size < 2:
        return keys
    ordered = np.sort(keys)
    if (ordered[1:] != ordered[:-1]).all():
        return keys
    return np.unique(ordered)


def group(values: npt.NDArray[np.uint32]) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.intp]]:
    """The distinct values and, per value, the index of its distinct value."""
    first = values[0]
    if (values == first).all():  # the usual case: one prefix, one state
        return values[:1].copy(), np.zeros(values.size, dtype=np.intp)
    distinct, which = np.unique(values, return_inverse=True)
    return distinct, which.reshape(-1)


def counted(
    distinct: npt.NDArray[np.uint32], which: npt.NDArray[np.intp]
) -> Iterator[tuple[int, int]]:
    """``(value, how many)`` for each distinct value."""
    counts = np.bincount(which, minlength=distinct.size)
    return zip(distinct.tolist(), counts.tolist(), strict=True)
