"""``NodeTier``: what a block manager needs from a host tier that another process owns.

The node KV cache (``fabric.node``: one shared-memory pool per host, served by its own process)
implements it; kvbm sits below that package and cannot import it, so whoever builds a worker
attaches one to its manager (``KvBlockManager.attach_node``). Blocks move by sequence hash with
one copy each way between a storage of this process and the node's shared memory; this process
holds no reference on them (the node's leases cover the copies).

Invariants every implementation keeps:

* ``load`` returns ``n`` only when the first ``n`` allocated blocks of ``dst`` hold the bytes of
  ``sequence_hashes[:n]`` (the longest prefix the node held, cut where it could not be read).
* ``store`` returns how many blocks it newly stored; the node holds every one of them, each
  under its hash, once this returns.
* Both are total: a node that cannot be reached, refuses, or whose lease ended stores or loads
  0 blocks and the implementation logs why. A node tier never fails a request: it is a cache.
* Calls come from the manager's owner thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from fabric.kvbm.core.types import SequenceHash
from fabric.kvbm.tiers.storage import Storage


class NodeTier(Protocol):
    """A host tier in another process's shared memory (see the module docstring)."""

    def store(
        self,
        sequence_hashes: Sequence[SequenceHash],
        src: Storage,
        block_ids: Sequence[int],
        *,
        parent_hash: SequenceHash | None = None,
    ) -> int:
        """Copy the blocks the node lacks (``block_ids[i]`` of ``src`` holds
        ``sequence_hashes[i]``) into it; how many it newly stored."""
        ...

    def load(
        self,
        sequence_hashes: Sequence[SequenceHash],
        dst: Storage,
        allocate: Callable[[int], Sequence[int]],
    ) -> int:
        """Copy the longest prefix of ``sequence_hashes`` the node holds into ``dst``: once the
        node pinned ``m`` blocks, ``allocate(m)`` gives up to ``m`` block ids of ``dst`` (fewer:
        no room for more), and the first ``n`` of them receive the prefix; ``n``. Allocating only
        after the lookup keeps a miss from evicting anything in ``dst``'s pool."""
        ...

    def close(self) -> None:
        """Detach (never removes what the node holds). Idempotent."""
        ...
