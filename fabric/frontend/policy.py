"""Routing policy: which decode and which prefill worker serve a request. Choices only.

Owns two pure functions over worker records, loads and the KV prefix index; the router
(``router.Router``) owns the state they read.

* ``choose_decode``: the decode or aggregated worker with the fewest in-flight requests (ties:
  the smallest worker id, so choices are reproducible).
* ``choose_prefill``: the prefill worker holding the longest cached prefix of the prompt, then the
  fewest in-flight prefills, then the smallest worker id. Only workers whose ``compat_hash``
  equals the decode worker's qualify (another hash means KV the decode worker cannot read).
  The prompt's sequence hashes are computed the way workers register blocks:
  ``hash_token_blocks(tokens, layout["block_size"], seed=record.compat_hash)`` (a
  ``KvBlockManager``'s compat hash is its hash seed), once per distinct (seed, block size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fabric.discovery.registry import WorkerRecord
from fabric.frontend.kv_index import KvPrefixIndex
from fabric.kvbm.hashing import sequence_hashes


@dataclass(frozen=True, slots=True)
class PrefillChoice:
    """The chosen prefill worker and how many of the prompt's full blocks it already holds."""

    record: WorkerRecord
    matched_blocks: int
    num_blocks: int


def choose_decode(
    candidates: Sequence[WorkerRecord], load: Mapping[str, int]
) -> WorkerRecord | None:
    """The least-loaded candidate, or None when there is none."""
    if not candidates:
        return None
    return min(candidates, key=lambda r: (load.get(r.worker_id, 0), r.worker_id))


def block_size_of(record: WorkerRecord) -> int | None:
    """``layout["block_size"]`` when it is a positive int, else None."""
    value = record.layout.get("block_size")
    return value if isinstance(value, int) and value > 0 else None


def choose_prefill(
    candidates: Sequence[WorkerRecord],
    token_ids: Sequence[int],
    index: KvPrefixIndex,
    load: Mapping[str, int],
) -> PrefillChoice | None:
    """The prefill worker with the longest cached prefix, ties by load (None without one)."""
    if not candidates:
        return None
    groups: dict[tuple[int, int], list[str]] = {}
    matched: dict[str, int] = {}
    num_blocks: dict[str, int] = {}
    for record in candidates:
        block_size = block_size_of(record)
        if block_size is None:  # unknown geometry: a candidate, without a prefix
            matched[record.worker_id] = num_blocks[record.worker_id] = 0
        else:
            groups.setdefault((record.compat_hash, block_size), []).append(record.worker_id)
    for (seed, block_size), worker_ids in groups.items():
        hashes = sequence_hashes(token_ids, block_size, seed=seed)
        matched.update(index.match_lengths(hashes, worker_ids))
        num_blocks.update(dict.fromkeys(worker_ids, len(hashes)))
    best = min(
        candidates,
        key=lambda r: (-matched[r.worker_id], load.get(r.worker_id, 0), r.worker_id),
    )
    return PrefillChoice(best, matched[best.worker_id], num_blocks[best.worker_id])
