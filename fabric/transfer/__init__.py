"""The transfer layer: memory regions, transfer agents (NIXL and a loopback fake), region lists.

It knows memory regions, agents and descriptor lists, never blocks: ``fabric.kvbm`` turns block
ids into ``RegionList`` pairs and injects an agent. Imports only ``fabric.errors``, numpy and
(``metrics``: the process's NIXL transfer metrics) prometheus_client; NIXL is imported lazily by
``NixlAgent`` (``fabric.transfer.nixl_agent``), so this package works without it.
"""

from __future__ import annotations

from fabric.transfer.agent import (
    AgentConfig,
    Registration,
    Transfer,
    TransferAgent,
    TransferOp,
    TransferState,
)
from fabric.transfer.loopback import LoopbackAgent, LoopbackRegistry
from fabric.transfer.memory import BufferInfo, MemoryKind, RegionList, pair_coalesce

__all__ = [
    "AgentConfig",
    "BufferInfo",
    "LoopbackAgent",
    "LoopbackRegistry",
    "MemoryKind",
    "RegionList",
    "Registration",
    "Transfer",
    "TransferAgent",
    "TransferOp",
    "TransferState",
    "pair_coalesce",
]
