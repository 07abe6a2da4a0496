"""``RemoteNodeReader``: a process on another host reads a node cache's blocks over NIXL.

A load is: lookup (the longest held prefix, pinned) over the node cache's signal channel, one
NIXL READ of the pinned slots into the caller's storage (kvbm's ``plan_read`` against the node's
``RemoteBlockSet``: ``fabric.node.nixl``), then unpin, and the blocks count only once the unpin's
answer says the pin was still live: across hosts there is no shared clock to trust (the
same-host client's one-way unpin relies on one), so a pin that ended before the READ did is a
failed load, never bytes served. A reader killed mid-read leaks nothing: its pin ends at its
lease.

Where the block set comes from: ``block_set_in(registry, namespace, node)`` (the node cache's
etcd record and the block set it published beside it, both naming the same agent) or any
other channel that carries ``RemoteBlockSet.to_bytes()``.

Not wired into a worker here: a decode worker on another host would hold one of these per
remote node (``fabric.worker`` owns that path). Owned by one thread, like its agent's reads.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence

from fabric.discovery.records import WorkerRecord
from fabric.discovery.registry import Registry, Role, workers_prefix
from fabric.errors import DiscoveryError, FabricError, TransferError
from fabric.kvbm import LayoutSpec, SequenceHash, Storage
from fabric.kvbm.remote import RemoteBlockSet, plan_read
from fabric.node.client import expect_reply
from fabric.node.nixl import nixl_key
from fabric.signal.client import SignalClient
from fabric.signal.messages import (
    NodeAck,
    NodeAttach,
    NodeGeometry,
    NodeLookup,
    NodePinned,
    NodeRelease,
)
from fabric.transfer.agent import TransferAgent

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0


def block_set_in(registry: Registry, namespace: str, node: str) -> tuple[str, RemoteBlockSet]:
    """The signal endpoint and block set of ``node``'s node cache, from etcd.

    Raises:
        DiscoveryError: no live node cache record for ``node`` with NIXL, or its block set is
            missing or names another agent (an earlier instance's).
    """
    prefix = workers_prefix(namespace, Role.NODE_CACHE)
    for key, raw in registry.get_prefix(prefix).items():
        record = WorkerRecord.from_bytes(raw, key=key)
        if record.node != node or record.leaving or record.endpoints.signal is None:
            continue
        if record.agent_name is None:
            raise DiscoveryError(f"the node cache of {node} does not serve NIXL (no --nixl)")
        data = registry.get(nixl_key(namespace, node))
        block_set = None if data is None else RemoteBlockSet.from_bytes(data)
        if block_set is None or block_set.agent_name != record.agent_name:
            raise DiscoveryError(
                f"the node cache of {node} published no block set of its agent "
                f"{record.agent_name} at {nixl_key(namespace, node)}"
            )
        return record.endpoints.signal, block_set
    raise DiscoveryError(f"no node cache of {node} in namespace {namespace!r}")


class RemoteNodeReader:
    """Reads one remote node cache (see the module docstring).

    Args:
        endpoint: the node cache's signal endpoint.
        block_set: its segment's block set.
        agent: this process's agent; the storages loaded into must be registered with it.
        identity: this process's id at the node cache.
        compat_hash: this process's KV compatibility hash.
        layout: the layout of the storages loaded into (compatibility facts compared).
    """

    def __init__(
        self,
        endpoint: str,
        block_set: RemoteBlockSet,
        agent: TransferAgent,
        *,
        identity: str,
        compat_hash: int,
        layout: LayoutSpec,
        timeout_s: float = 5.0,
    ) -> None:
        diff = layout.geometry_diff(block_set.layout)
        if diff:
            raise FabricError(f"the remote node cache holds other blocks: {sorted(diff)}")
        self._signal = SignalClient(
            endpoint, identity=identity, compat_hash=compat_hash, timeout_s=timeout_s
        )
        try:
            expect_reply(self._signal.request(NodeAttach(identity)), NodeGeometry)
            self._peer = agent.add_peer(block_set.agent_metadata)
        except BaseException:
            self._signal.close()
            raise
        self._agent, self._block_set, self._compat_hash = agent, block_set, compat_hash
        self._ids = itertools.count(1)

    def load(
        self, sequence_hashes: Sequence[SequenceHash], dst: Storage, block_ids: Sequence[int]
    ) -> int:
        """Read the longest prefix of ``sequence_hashes`` the node holds into ``dst``'s blocks
        ``block_ids[:n]``; ``n`` (0: a miss).

        Raises:
            TransferError: the READ failed, or the pin ended before it did (treat the blocks as
                not loaded); FabricError: the node cache could not be reached or refused.
        """
        if not sequence_hashes:
            return 0
        pinned = expect_reply(
            self._signal.request(NodeLookup(self._next_id(), [int(h) for h in sequence_hashes])),
            NodePinned,
        )
        if pinned.lease_id is None:
            return 0
        num_blocks = min(len(pinned.slot_ids), len(block_ids))
        try:
            remote = dataclasses.replace(
                self._block_set, block_ids=tuple(pinned.slot_ids[:num_blocks])
            )
            local, far = plan_read(
                dst, block_ids[:num_blocks], remote, compat_hash=self._compat_hash
            )
            transfer = self._agent.read(local, far, self._peer)
            self._agent.wait(transfer, READ_TIMEOUT_S)  # releases it on every path
        except BaseException:
            self._unpin_quietly(pinned.lease_id)
            raise
        try:
            expect_reply(
                self._signal.request(NodeRelease(self._next_id(), pinned.lease_id)), NodeAck
            )
        except FabricError as exc:
            raise TransferError(
                f"the remote node cache's pin {pinned.lease_id} ended before the READ did "
                f"({exc}); treat the blocks as not loaded"
            ) from exc
        return num_blocks

    def close(self) -> None:
        """Close the signal channel (the agent is the caller's). Idempotent."""
        self._signal.close()

    def _next_id(self) -> str:
        return f"{self._signal.identity}-{next(self._ids)}"

    def _unpin_quietly(self, lease_id: int) -> None:
        try:
            self._signal.request(NodeRelease(self._next_id(), lease_id))
        except FabricError as exc:
            logger.warning(
                "could not unpin remote lease %d (%s); it ends at its deadline", lease_id, exc
            )
