"""The router's view of which worker caches which KV blocks, built from KV events.

Owns ``KvPrefixIndex``: ``sequence hash -> workers`` (what prefix matching walks) and, per worker,
``sequence hash -> tiers`` (what removals and clears need). It is fed by ``kv_subscriber`` threads
and read by the router on the event loop, so every method takes one lock.

Invariants:

* ``w in hash_to_workers[h]`` exactly when ``worker_to_tiers[w][h]`` is a non-empty set of tiers:
  a block stored on the device and offloaded to the host stays indexed until both copies are
  removed. Empty sets and empty maps are never kept.
* ``AllBlocksCleared`` (any tier: the wire does not say which) forgets every block of the worker,
  as does ``clear_worker``: the index may miss what a worker holds, never claim what it lacks
  (a miss costs a recompute, a false hit would not).
* Sequence hashes are chained, so a prefix match walks the request's hashes in order and stops,
  per worker, at the first hash the worker lacks (on the tiers asked for, when a match names
  tiers: the router matches device and host copies only, see ``policy``).

Every worker that publishes KV events is indexed, whatever its role: prefill, decode and
aggregated workers alike (the router decides which of them may supply KV to whom).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence

from fabric.kvbm import AllCleared, BlockRemoved, BlockStored, KvEvent, SequenceHash, Tier


class KvPrefixIndex:
    """Which workers hold which sequence hashes (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hash_to_workers: dict[SequenceHash, set[str]] = {}
        self._worker_to_tiers: dict[str, dict[SequenceHash, set[Tier]]] = {}

    def apply(self, worker_id: str, events: Iterable[KvEvent]) -> None:
        """Apply one batch of ``worker_id``'s events, in order."""
        with self._lock:
            for event in events:
                if isinstance(event, BlockStored):
                    self._store(worker_id, event.tier, event.sequence_hashes)
                elif isinstance(event, BlockRemoved):
                    self._remove(worker_id, event.tier, event.sequence_hashes)
                elif isinstance(event, AllCleared):
                    self._clear(worker_id)

    def clear_worker(self, worker_id: str) -> None:
        """Forget everything ``worker_id`` holds (it left, or its event stream has a hole)."""
        with self._lock:
            self._clear(worker_id)

    def num_blocks(self, worker_id: str) -> int:
        """How many distinct sequence hashes ``worker_id`` is known to hold."""
        with self._lock:
            return len(self._worker_to_tiers.get(worker_id, ()))

    def match_lengths(
        self,
        hashes: Sequence[SequenceHash],
        workers: Iterable[str],
        tiers: Collection[Tier] | None = None,
    ) -> dict[str, int]:
        """For each of ``workers``, how many leading ``hashes`` it holds (0 for none).

        Args:
            tiers: count only copies on these tiers; None: any tier.
        """
        lengths = dict.fromkeys(workers, 0)
        active = set(lengths)
        with self._lock:
            for depth, sequence_hash in enumerate(hashes):
                holders = self._hash_to_workers.get(sequence_hash)
                if holders is None:
                    break
                active &= holders
                if tiers is not None:
                    active = {w for w in active if self._holds_on(w, sequence_hash, tiers)}
                if not active:
                    break
                for worker_id in active:
                    lengths[worker_id] = depth + 1
        return lengths

    def tiers_of(self, worker_id: str, sequence_hash: SequenceHash) -> frozenset[Tier]:
        """The tiers on which ``worker_id`` holds ``sequence_hash`` (empty: it does not)."""
        with self._lock:
            return frozenset(self._worker_to_tiers.get(worker_id, {}).get(sequence_hash, ()))

    def _holds_on(
        self, worker_id: str, sequence_hash: SequenceHash, tiers: Collection[Tier]
    ) -> bool:
        held = self._worker_to_tiers[worker_id][sequence_hash]  # exists: worker is a holder
        return any(tier in held for tier in tiers)

    def _store(self, worker_id: str, tier: Tier, hashes: Iterable[SequenceHash]) -> None:
        tiers_by_hash = self._worker_to_tiers.setdefault(worker_id, {})
        for sequence_hash in hashes:
            tiers_by_hash.setdefault(sequence_hash, set()).add(tier)
            self._hash_to_workers.setdefault(sequence_hash, set()).add(worker_id)

    def _remove(self, worker_id: str, tier: Tier, hashes: Iterable[SequenceHash]) -> None:
        tiers_by_hash = self._worker_to_tiers.get(worker_id)
        if tiers_by_hash is None:
            return
        for sequence_hash in hashes:
            tiers = tiers_by_hash.get(sequence_hash)
            if tiers is None:
                continue
            tiers.discard(tier)
            if not tiers:
                del tiers_by_hash[sequence_hash]
                self._drop_holder(sequence_hash, worker_id)
        if not tiers_by_hash:
            del self._worker_to_tiers[worker_id]

    def _clear(self, worker_id: str) -> None:
        for sequence_hash in self._worker_to_tiers.pop(worker_id, {}):
            self._drop_holder(sequence_hash, worker_id)

    def _drop_holder(self, sequence_hash: SequenceHash, worker_id: str) -> None:
        holders = self._hash_to_workers[sequence_hash]
        holders.discard(worker_id)
        if not holders:
            del self._hash_to_workers[sequence_hash]
