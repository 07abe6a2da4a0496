"""``NodeCacheClient``: a process's handle on its node's KV cache (``attach_node_cache``).

Owns one ``SignalClient`` to the node cache and the process's read/write mapping of the shared
segment (kvbm's ``host_storage(..., create=False)``). Bytes move with kvbm's ``copy_blocks``,
one call per store or load, between the caller's storage and the segment; the service only
hands out slots under leases (``fabric.node.cache`` draws the lease state machine).

* ``store``: reserve (slots for the hashes the node lacks), one copy into those slots, commit.
* ``load``: lookup (the longest held prefix, pinned), one copy out, unpin; or, when the
  service's slot index (``fabric.node.index``) shows every asked block published, no request
  at all: probe the index, one copy out, check the slots' generations did not move (a seqlock:
  a block overwritten meanwhile is cut from the prefix), mark the slots read. Partial hits and
  misses still go to the service (it counts them, and may hold what the index does not show).

Invariants:

* Attaching checks the geometry before mapping: the service refuses another compat hash
  (``IncompatiblePeer``), and the client refuses a segment whose layout facts differ from its
  own (``LayoutMismatch``, naming the fields).
* A result is reported only when the service confirmed it: a store counts blocks whose commit
  was acknowledged; a load counts blocks whose pin was live until its copy ended (so no writer
  could have reused those slots meanwhile): by this process's clock when the copy ended before
  the pin's lease time from the lookup's send (the unpin then goes one-way, its answer
  discarded), else by the service's answer to the unpin. Anything else raises a
  ``FabricError`` (``TransferError`` with the reason), after aborting the reservation or
  releasing the pin it held, best effort (the lease's deadline covers a service that is gone).
* A writer never copies into slots whose lease already ended by its own clock, and a reader
  trusts its own clock only as far as the lease goes: the local deadline is taken before the
  request is sent, so it is never later than the service's (one host, one monotonic clock).

Threads: like its ``SignalClient``, a client belongs to one thread.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from fabric.errors import (
    FabricError,
    InvalidInput,
    LayoutMismatch,
    ProtocolMismatch,
    TransferError,
)
from fabric.kvbm import (
    LayoutKind,
    LayoutSpec,
    SequenceHash,
    Storage,
    TensorStorage,
    copy_blocks,
    host_storage,
)
from fabric.kvbm.core.layout import SUPPORTED_DTYPES, dtype_name
from fabric.node.index import IndexReader, open_index, segment_inode
from fabric.signal.client import SignalClient
from fabric.signal.messages import (
    Message,
    NodeAck,
    NodeAttach,
    NodeCommit,
    NodeGeometry,
    NodeLookup,
    NodePinned,
    NodeRelease,
    NodeRenew,
    NodeReserve,
    NodeReserved,
    NodeStats,
    NodeStatsRequest,
)

logger = logging.getLogger(__name__)

_DTYPES = {dtype_name(d): d for d in SUPPORTED_DTYPES}
_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What one ``store`` did with its blocks.

    Attributes:
        num_stored: copied into the node and committed by this call.
        num_held: the node held them already (nothing copied).
        num_skipped: no room (every slot pinned or reserved) or not admitted yet.
    """

    num_stored: int
    num_held: int
    num_skipped: int


class NodeCacheClient:
    """Attached to one node cache (build with ``attach_node_cache``); see the module doc."""

    def __init__(
        self,
        signal: SignalClient,
        geometry: NodeGeometry,
        storage: TensorStorage,
        index: IndexReader | None = None,
    ):
        self._signal = signal
        self.geometry = geometry
        self.storage = storage
        self._index = index
        self._ids = itertools.count(1)
        self.num_optimistic_loads = 0
        """Loads served from the index without a request (tests and benchmarks read it)."""

    @property
    def optimistic(self) -> bool:
        """Whether full hits are read through the service's slot index (no round trip)."""
        return self._index is not None

    # -- the two verbs ---------------------------------------------------------------------------

    def store(
        self,
        sequence_hashes: Sequence[SequenceHash],
        src: Storage,
        block_ids: Sequence[int],
        *,
        parent_hash: SequenceHash | None = None,
    ) -> StoreResult:
        """Copy the blocks ``block_ids[i]`` of ``src`` (holding ``sequence_hashes[i]``) into the
        node cache, those it lacks and has room for.

        Raises:
            TransferError: the copy failed or the commit was refused (the lease ended: the
                copy took longer than the lease), nothing of this call was stored.
            FabricError: the service could not be reached (``TransferTimeout``) or refused.
        """
        _pair(sequence_hashes, block_ids)
        if not sequence_hashes:
            return StoreResult(0, 0, 0)
        sent_at = time.monotonic()  # the lease runs from no earlier than this
        reserved = self.reserve(sequence_hashes, parent_hash=parent_hash)
        num_skipped = len(sequence_hashes) - len(reserved.positions) - len(reserved.held)
        if reserved.lease_id is None:
            return StoreResult(0, len(reserved.held), num_skipped)
        lease_id = reserved.lease_id
        try:
            if time.monotonic() >= sent_at + reserved.lease_ms / 1000:
                raise TransferError(
                    f"reservation {lease_id} ended before its copy could start; raise --lease-s"
                )
            src_ids = [block_ids[p] for p in reserved.positions]
            copy_blocks(src, src_ids, self.storage, reserved.slot_ids)
        except BaseException:
            self._release_quietly(lease_id)
            raise
        try:
            self.commit(lease_id, sequence_hashes)
        except FabricError as exc:
            raise TransferError(
                f"node cache refused the commit of reservation {lease_id} "
                f"({len(reserved.positions)} blocks): {exc}; nothing was stored"
            ) from exc
        return StoreResult(len(reserved.positions), len(reserved.held), num_skipped)

    def load(
        self, sequence_hashes: Sequence[SequenceHash], dst: Storage, block_ids: Sequence[int]
    ) -> int:
        """Copy the longest prefix of ``sequence_hashes`` the node holds into ``dst``'s blocks
        ``block_ids[:n]``; returns ``n`` (0 on a miss).

        Raises:
            TransferError: the copy failed, or the pin ended before the copy did (the bytes in
                ``dst`` may be wrong: treat the blocks as not loaded).
            FabricError: the service could not be reached (``TransferTimeout``) or refused.
        """
        _pair(sequence_hashes, block_ids)
        return self.load_into(sequence_hashes, dst, lambda n: block_ids[:n])

    def load_into(
        self,
        sequence_hashes: Sequence[SequenceHash],
        dst: Storage,
        allocate: Callable[[int], Sequence[int]],
    ) -> int:
        """``load`` into blocks chosen once the node pinned its prefix: ``allocate(m)`` gives up
        to ``m`` block ids of ``dst`` for the ``m`` pinned blocks (fewer: no room for more); the
        first ``n`` of them receive the prefix; returns ``n``. Raises as ``load``."""
        if not sequence_hashes:
            return 0
        optimistic = self._load_optimistic(sequence_hashes, dst, allocate)
        if optimistic is not None:
            return optimistic
        sent_at = time.monotonic()  # the pin runs from no earlier than this
        pinned = self.lookup(sequence_hashes)
        if pinned.lease_id is None:
            return 0
        try:
            block_ids = list(allocate(len(pinned.slot_ids)))[: len(pinned.slot_ids)]
            num_blocks = len(block_ids)
            if num_blocks:
                copy_blocks(self.storage, pinned.slot_ids[:num_blocks], dst, block_ids)
        except BaseException:
            self._release_quietly(pinned.lease_id)
            raise
        if time.monotonic() < sent_at + pinned.lease_ms / 1000:
            # The pin outlived the copy (the service's deadline is no earlier than ours): the
            # bytes are good whatever the unpin meets, so it goes one-way (no round trip).
            self._signal.send(NodeRelease(self._next_id(), pinned.lease_id))
            return num_blocks
        try:
            self.release(pinned.lease_id)
        except FabricError as exc:
            raise TransferError(
                f"the node cache's pin {pinned.lease_id} on {num_blocks} blocks ended before "
                f"the copy did ({exc}); the loaded bytes may have been overwritten: treat the "
                "blocks as not loaded"
            ) from exc
        return num_blocks

    def _load_optimistic(
        self,
        sequence_hashes: Sequence[SequenceHash],
        dst: Storage,
        allocate: Callable[[int], Sequence[int]],
    ) -> int | None:
        """``load_into`` through the slot index when it shows every block; None otherwise."""
        index = self._index
        if index is None or not index.current():
            return None
        probe = index.probe(sequence_hashes)
        if probe.slots.size < len(sequence_hashes):
            return None
        block_ids = list(allocate(probe.slots.size))[: probe.slots.size]
        if block_ids:
            copy_blocks(self.storage, probe.slots[: len(block_ids)], dst, block_ids)
        num_blocks = index.num_unchanged(probe, len(block_ids))
        index.touch(probe.slots[:num_blocks])
        self.num_optimistic_loads += 1
        if num_blocks < len(block_ids):
            logger.debug(
                "optimistic load: %d of %d blocks were overwritten while copied; cut there",
                len(block_ids) - num_blocks,
                len(block_ids),
            )
        return num_blocks

    # -- the protocol, one request each ----------------------------------------------------------

    def reserve(
        self, sequence_hashes: Sequence[SequenceHash], *, parent_hash: SequenceHash | None = None
    ) -> NodeReserved:
        """Slots for the hashes the node lacks (a lease; commit or release it)."""
        reply = self._request(
            NodeReserve(self._next_id(), [int(h) for h in sequence_hashes], parent_hash)
        )
        return expect_reply(reply, NodeReserved)

    def commit(self, lease_id: int, sequence_hashes: Sequence[SequenceHash]) -> NodeAck:
        """Register a reservation's slots (their bytes written); the lease ends."""
        reply = self._request(
            NodeCommit(self._next_id(), lease_id, [int(h) for h in sequence_hashes])
        )
        return expect_reply(reply, NodeAck)

    def lookup(self, sequence_hashes: Sequence[SequenceHash]) -> NodePinned:
        """Pin the longest held prefix (a lease; release it)."""
        reply = self._request(NodeLookup(self._next_id(), [int(h) for h in sequence_hashes]))
        return expect_reply(reply, NodePinned)

    def release(self, lease_id: int) -> NodeAck:
        """End a lease: abort a reservation, unpin a lookup."""
        return expect_reply(self._request(NodeRelease(self._next_id(), lease_id)), NodeAck)

    def renew(self, lease_id: int) -> NodeAck:
        """Extend a live lease by the service's lease time."""
        return expect_reply(self._request(NodeRenew(self._next_id(), lease_id)), NodeAck)

    def stats(self) -> dict[str, int]:
        return expect_reply(self._request(NodeStatsRequest(self._next_id())), NodeStats).stats

    def close(self) -> None:
        """Unmap the segment (never unlinks it) and close the socket. Idempotent."""
        if self._index is not None:
            self._index.close()
            self._index = None
        self.storage.close()
        self._signal.close()

    def __enter__(self) -> NodeCacheClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"{self._signal.identity}-{next(self._ids)}"

    def _request(self, message: Message) -> Message:
        while self._signal.num_pending_pushes:  # answers to one-way unpins: nothing to act on
            self._signal.receive(0.0)
        return self._signal.request(message)

    def _release_quietly(self, lease_id: int) -> None:
        try:
            self.release(lease_id)
        except FabricError as exc:
            logger.warning(
                "could not release node cache lease %d (%s); it ends at its deadline",
                lease_id,
                exc,
            )


def attach_node_cache(
    endpoint: str,
    *,
    identity: str,
    compat_hash: int,
    layout: LayoutSpec,
    timeout_s: float = 5.0,
    attach_timeout_s: float | None = None,
    optimistic: bool = True,
) -> NodeCacheClient:
    """Attach to the node cache at ``endpoint`` and map its segment.

    Args:
        identity: this process's id (unique per node cache; attaching again under it ends the
            leases of the earlier holder).
        compat_hash: this process's KV compatibility hash (its block manager's seed).
        layout: the layout of the storages this process copies from and to (only the
            compatibility facts are compared).
        timeout_s: bound on each request.
        attach_timeout_s: bound on the attach itself (default ``timeout_s``): a caller that
            retries attaching keeps each try short.
        optimistic: read full hits through the service's slot index, without a round trip
            (when the service publishes one and this machine's memory order allows it).

    Raises:
        IncompatiblePeer: the node cache serves another compat hash.
        LayoutMismatch: its blocks have another geometry.
        StorageError: the segment cannot be mapped.
        TransferTimeout: no node cache answered at ``endpoint``.
    """
    signal = SignalClient(endpoint, identity=identity, compat_hash=compat_hash, timeout_s=timeout_s)
    try:
        geometry = expect_reply(
            signal.request(NodeAttach(identity), attach_timeout_s), NodeGeometry
        )
        if geometry.compat_hash != compat_hash:
            raise ProtocolMismatch(
                f"node cache at {endpoint} serves compat hash {geometry.compat_hash:#018x}, "
                f"this process has {compat_hash:#018x}"
            )
        node_layout = _layout_of(geometry)
        diff = layout.geometry_diff(node_layout)
        if diff:
            details = ", ".join(f"{k}: ours {a}, node's {b}" for k, (a, b) in diff.items())
            raise LayoutMismatch(f"node cache at {endpoint} holds other blocks ({details})")
        before = segment_inode(geometry.segment)  # the index must describe the mapped segment
        storage = host_storage(node_layout, shared_name=geometry.segment, create=False)
        fault_in(storage, write=False)
        same = before if segment_inode(geometry.segment) == before else None
        index = open_index(geometry.segment, geometry.num_blocks, same) if optimistic else None
    except BaseException:
        signal.close()
        raise
    logger.info(
        "attached to the node cache at %s: %d blocks in %s",
        endpoint,
        geometry.num_blocks,
        geometry.segment,
    )
    return NodeCacheClient(signal, geometry, storage, index)


def fault_in(storage: TensorStorage, *, write: bool) -> None:
    """Map every page of ``storage`` into this process now (one touch per page), so that copies
    never take page faults: a first load of fresh slots measured 2-6x slower than later ones.
    ``write`` fills the pages with zeros (the service, allocating its segment's memory at
    start); a read only maps pages that exist (clients)."""
    for tensor in storage.tensors:
        raw = tensor.view(torch.uint8).reshape(-1)
        if write:
            raw.zero_()
        else:
            int(raw[:: mmap.PAGESIZE].sum())


def _layout_of(geometry: NodeGeometry) -> LayoutSpec:
    dtype = _DTYPES.get(geometry.dtype)
    if dtype is None:
        raise LayoutMismatch(f"node cache blocks have dtype {geometry.dtype!r}, unknown here")
    kinds = {kind.value: kind for kind in LayoutKind}
    if geometry.layout_kind not in kinds:
        raise LayoutMismatch(f"node cache layout {geometry.layout_kind!r} is unknown here")
    return LayoutSpec(
        kind=kinds[geometry.layout_kind],
        num_blocks=geometry.num_blocks,
        num_layers=geometry.num_layers,
        outer_dim=geometry.outer_dim,
        block_size=geometry.block_size,
        inner_dim=geometry.inner_dim,
        dtype=dtype,
        alignment=geometry.alignment,
    )


def _pair(sequence_hashes: Sequence[SequenceHash], block_ids: Sequence[int]) -> None:
    if len(sequence_hashes) != len(block_ids):
        raise InvalidInput(
            f"{len(sequence_hashes)} sequence hashes but {len(block_ids)} block ids; pass one "
            "block per hash"
        )


def expect_reply(reply: Message, kind: type[_M]) -> _M:
    if not isinstance(reply, kind):
        raise ProtocolMismatch(f"node cache answered {type(reply).__name__}, not {kind.__name__}")
    return reply
