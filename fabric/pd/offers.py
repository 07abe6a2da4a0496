"""The producer's offers: ``BlocksReady`` messages that tell a consumer where blocks are.

``BlockExporter`` describes blocks of one storage (registered with the producer's transfer
agent) as a ``RemoteBlockSet``. The template (agent name and metadata, the storage's layout and
buffers, the compatibility hash) is built once, when the exporter is made: make it after the
storage is registered with the agent. An offer is then the template with the offered ids, so
``ready`` touches neither the agent nor the storage and may run on any thread (vLLM's connector
answers consumers on its signal thread).

Invariants: every offer of an exporter names the same agent, metadata and buffers; its ids are
validated against the layout (``InvalidInput`` for an id out of range); disk storage cannot be
exported (peers read memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fabric.kvbm import RemoteBlockSet, Storage, export_block_set
from fabric.signal.messages import BlocksReady, KvStream
from fabric.transfer.agent import TransferAgent


class BlockExporter:
    """Offers blocks of ``storage`` to consumers (module docstring)."""

    def __init__(self, storage: Storage, agent: TransferAgent, *, compat_hash: int) -> None:
        self._template = export_block_set(storage, (), agent, compat_hash)

    @property
    def agent_name(self) -> str:
        return self._template.agent_name

    def block_set(self, block_ids: Sequence[int]) -> RemoteBlockSet:
        return dataclasses.replace(self._template, block_ids=tuple(block_ids))

    def ready(
        self, request_id: str, block_ids: Sequence[int], *, first_token: int, num_tokens: int
    ) -> BlocksReady:
        """The ``BlocksReady`` offering ``block_ids`` (the first ``num_tokens`` tokens' KV)."""
        return BlocksReady(
            request_id=request_id,
            first_token=first_token,
            agent_name=self._template.agent_name,
            block_set=self.block_set(block_ids).to_bytes(),
            num_tokens=num_tokens,
        )

    def stream(
        self, request_id: str, block_ids: Sequence[int], *, num_tokens: int, done_tokens: int
    ) -> KvStream:
        """The ``KvStream`` offering ``block_ids`` before they are computed (a layer-wise
        handoff: the first ``done_tokens`` tokens' KV readable now, the rest as it is written)."""
        return KvStream(
            request_id=request_id,
            agent_name=self._template.agent_name,
            block_set=self.block_set(block_ids).to_bytes(),
            num_tokens=num_tokens,
            done_tokens=done_tokens,
        )
