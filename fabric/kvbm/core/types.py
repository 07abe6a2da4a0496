"""Identifier types and the tier enum shared by every KVBM module.

``BlockId`` indexes a block inside one pool (0 .. num_blocks-1). ``SequenceHash`` identifies the
whole token prefix ending at a block (chained, see ``hashing``); it is the key blocks are registered
and matched by, in every tier and on every instance. ``BlockHash`` is the hash of one block's tokens
alone (what KV-aware routers such as Dynamo's index).
"""

from __future__ import annotations

from enum import Enum
from typing import NewType

BlockId = NewType("BlockId", int)
SequenceHash = NewType("SequenceHash", int)
BlockHash = NewType("BlockHash", int)


class Tier(Enum):
    """Where a pool's blocks live, fastest first (the seeds' G1..G4 names are the values)."""

    DEVICE = "G1"
    HOST = "G2"
    DISK = "G3"
    SHARED = "G4"
    """The shared disk store (``shared.store.SharedBlockStore``): a directory instances share."""
    NODE = "G2N"
    """The node cache (``fabric.node``): a host tier in shared memory that another process owns
    and every instance on the host stores into and loads from (``manager.NodeTier``)."""

    @property
    def medium(self) -> str:
        """The medium name vLLM's KV events use for this tier ("GPU", "CPU_PINNED", ...)."""
        return _MEDIUM[self]


_MEDIUM = {
    Tier.DEVICE: "GPU",
    Tier.HOST: "CPU_PINNED",
    Tier.DISK: "DISK",
    Tier.SHARED: "SHARED_DISK",
    Tier.NODE: "CPU_SHARED",
}
