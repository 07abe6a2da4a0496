"""``NodeCache``: one host pool in shared memory, lent to the processes of a node under leases.

Owns the node's ``BlockPool`` (kvbm's pool, eviction policy and events: the index from sequence
hash to block is the pool's registry), the ``FrequencyFilter`` that admits blocks, and the
leases of writers and readers (``LeaseTable``). It never touches block bytes: clients copy them
into and out of the shared segment themselves (``fabric.node.client``); this only decides which
slots they may write or read, and when those bytes become visible.

Lifecycle of a lease (one reservation or one pin, over a batch of blocks)::

    reserve ──▶ RESERVED: fresh slots owned by the reservation (a MutableBlocks: never in the
      │         registry, so never matchable), the hashes already held pinned beside them
      ├── commit (the writer copied its bytes) ──▶ slots registered (register_positions:
      │         BlockStored events, chained), cached; held pins released
      ├── abort ──▶ slots RESET (free again), held pins released
      └── the deadline passed ──▶ slots QUARANTINED for one more lease time (a writer stalled
                past its deadline may still be copying into them), then RESET; held pins
                released at once

    lookup ──▶ PINNED: a reference on each block of the longest held prefix (not evictable)
      └── unpin, or the deadline passed ──▶ references released: cached, evictable

    renew: a live lease's deadline moves to one lease time from now; a lease that ended is gone
    for good (commit, unpin and renew of it are refused: ``UNKNOWN_REQUEST``).

Crash safety follows: a writer killed before its commit leaves only unregistered slots, which
its deadline returns to the free list (after the quarantine); a reader killed while pinning
leaves references its deadline releases. The quarantine bounds the damage of a writer that
stalled rather than died: its late bytes land in slots no one else holds, provided its copy
ends within one more lease time (its commit is refused either way). Deadlines are enforced at
the start of every call and by ``sweep`` (the process calls it periodically), under one lock:
the pool is touched by one thread at a time.

Invariants (besides the pool's own): every block a lease holds is referenced exactly once by
that lease; a slot handed to a writer is in no registry until its commit, and a slot whose
reservation expired is handed to no one for one lease time; the pool's registry is the only
index (a hash is matchable iff a committed block holds it). Only clients that attached to this
service instance are served (a client of an earlier instance, whose segment was unlinked, is
told to attach again instead of writing into a mapping no one reads).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fabric.errors import FabricError
from fabric.kvbm import (
    BlockPool,
    FrequencyFilter,
    ImmutableBlocks,
    LayoutSpec,
    MutableBlocks,
    SequenceHash,
    register_positions,
)
from fabric.node.disk import DISK_STATS, NodeDisk, onboard_prefix
from fabric.node.index import IndexWriter
from fabric.node.leases import LeaseGone, LeaseTable
from fabric.signal.errors import ErrorCode
from fabric.signal.framing import PeerId
from fabric.signal.messages import (
    ErrorReply,
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


@dataclass(slots=True)
class Reservation:
    """A writer's slots (``blocks``, one per entry of ``positions``) and the pins on the hashes
    the node already held (``present``)."""

    sequence_hashes: list[SequenceHash]
    parent_hash: SequenceHash | None
    positions: list[int]
    blocks: MutableBlocks
    present: ImmutableBlocks


@dataclass(slots=True)
class Pin:
    """A reader's references on a held prefix."""

    blocks: ImmutableBlocks


Lease = Reservation | Pin


@dataclass(slots=True)
class LeaseCounters:
    reservations: int = 0
    committed_blocks: int = 0
    aborted: int = 0
    expired_reservations: int = 0
    pins: int = 0
    unpinned: int = 0
    expired_pins: int = 0
    refused_unattached: int = 0
    optimistic_hits: int = 0


class NodeCache:
    """The node cache's state and its signal handler (``handle``); see the module docstring.

    Args:
        pool: the node's pool (HOST tier), with its eviction policy and event sink.
        layout: the shared segment's layout (``pool.num_blocks`` blocks).
        segment: the shared segment's name.
        compat_hash: the KV compatibility hash clients must share.
        admission: which blocks are worth storing.
        leases: the lease table (its lease time and clock).
        index: the slot index readers probe without a round trip (``fabric.node.index``); kept
            equal to the registry's published slots here, under the lock.
        disk: the node's disk tier (``fabric.node.disk``): committed blocks are written
            through to it, and a lookup extends the pool's prefix with its blocks.
    """

    def __init__(
        self,
        pool: BlockPool,
        layout: LayoutSpec,
        *,
        segment: str,
        compat_hash: int,
        admission: FrequencyFilter,
        leases: LeaseTable[Lease],
        index: IndexWriter | None = None,
        disk: NodeDisk | None = None,
    ) -> None:
        self._pool = pool
        self._index = index
        self._disk = disk
        self._admission = admission
        self._leases = leases
        self._lock = threading.Lock()
        self._attached: set[PeerId] = set()
        self._quarantine: deque[tuple[float, MutableBlocks]] = deque()
        """Slots of expired reservations and when they may be reused (oldest first)."""
        self.counters = LeaseCounters()
        self.geometry = NodeGeometry(
            segment=segment,
            layout_kind=layout.kind.value,
            num_blocks=layout.num_blocks,
            num_layers=layout.num_layers,
            outer_dim=layout.outer_dim,
            block_size=layout.block_size,
            inner_dim=layout.inner_dim,
            alignment=layout.alignment,
            dtype=str(layout.dtype).removeprefix("torch."),
            compat_hash=compat_hash,
            lease_ms=_ms(leases.lease_s),
        )
        self._handlers: dict[type[Message], Callable[[PeerId, Message], Message]] = {
            NodeAttach: self._attach,
            NodeReserve: self._reserve,
            NodeCommit: self._commit,
            NodeLookup: self._lookup,
            NodeRelease: self._release,
            NodeRenew: self._renew,
            NodeStatsRequest: self._stats,
        }

    # -- entry points ----------------------------------------------------------------------------

    def handle(self, message: Message, peer: PeerId) -> Message:
        """The ``SignalServer`` handler: one reply per request, leases swept first."""
        handler = self._handlers.get(type(message))
        if handler is None:
            return ErrorReply(
                getattr(message, "request_id", None),
                ErrorCode.UNKNOWN_TYPE,
                f"the node cache serves Node* requests only, not {type(message).__name__}",
            )
        with self._lock:
            self._expire()
            if peer not in self._attached and not isinstance(message, NodeAttach):
                self.counters.refused_unattached += 1
                return ErrorReply(
                    getattr(message, "request_id", None),
                    ErrorCode.UNKNOWN_REQUEST,
                    "this node cache does not know you (it restarted since you attached, with "
                    "a new segment): attach again",
                )
            try:
                return handler(peer, message)
            except LeaseGone as exc:
                return ErrorReply(
                    getattr(message, "request_id", None), ErrorCode.UNKNOWN_REQUEST, str(exc)
                )

    def busy(self) -> bool:
        """Whether a reservation or pin is live (read without the lock: a hint for pollers)."""
        return len(self._leases) > 0

    def sweep(self) -> int:
        """Reclaim every lease past its deadline now; how many were."""
        with self._lock:
            return self._expire()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return self._stats_now()

    def check_invariants(self) -> None:
        """The pool's invariants, every lease's blocks referenced, quarantined slots held
        (tests)."""
        with self._lock:
            self._pool.check_invariants()
            for _, slots in self._quarantine:
                assert all(self._pool.ref_count(b) == 1 for b in slots.block_ids)
            for lease in self._leases.items():
                held = lease.blocks if isinstance(lease, Pin) else lease.present
                assert all(self._pool.ref_count(b) > 0 for b in held.block_ids)
                if isinstance(lease, Reservation):
                    for block_id in lease.blocks.block_ids:
                        assert self._pool.ref_count(block_id) == 1, f"slot {block_id} shared"

    # -- requests (under the lock) ---------------------------------------------------------------

    def _attach(self, peer: PeerId, message: Message) -> Message:
        stale = self._leases.take_peer(peer)
        if stale:
            logger.warning(
                "%s attached again: its %d earlier leases are released", peer, len(stale)
            )
            for lease in stale:
                self._end(lease, committed=False)
        self._attached.add(peer)
        logger.info("%s attached (%s)", peer, getattr(message, "client", peer))
        return self.geometry

    def _reserve(self, peer: PeerId, message: Message) -> Message:
        assert isinstance(message, NodeReserve)
        hashes = [SequenceHash(h) for h in message.sequence_hashes]
        self._admission.observe(hashes)
        present = self._pool.match_present(hashes)
        held_hashes = set(present.sequence_hashes)
        held = [i for i, h in enumerate(hashes) if h in held_hashes]
        wanted = [
            i for i, h in enumerate(hashes) if h not in held_hashes and self._admission.admits(h)
        ]
        positions = wanted[: self._pool.num_free]
        blocks = self._pool.allocate(len(positions))
        assert blocks is not None  # at most num_free blocks were asked for
        if self._index is not None:  # before the writer hears of them (readers' seqlock)
            self._index.unpublish(blocks.block_ids)
        if not positions:
            self._pool.release(blocks)
            self._pool.release(present)
            return NodeReserved(message.request_id, None, [], [], held, 0)
        lease = Reservation(
            hashes,
            None if message.parent_hash is None else SequenceHash(message.parent_hash),
            positions,
            blocks,
            present,
        )
        lease_id, _ = self._leases.grant(peer, lease)
        self.counters.reservations += 1
        if len(positions) < len(wanted):
            logger.info(
                "reservation %d of %s: room for %d of %d blocks (the rest is pinned or reserved)",
                lease_id,
                peer,
                len(positions),
                len(wanted),
            )
        return NodeReserved(
            message.request_id,
            lease_id,
            positions,
            [int(b) for b in blocks.block_ids],
            held,
            _ms(self._leases.lease_s),
        )

    def _commit(self, peer: PeerId, message: Message) -> Message:
        assert isinstance(message, NodeCommit)
        lease = self._leases.peek(message.lease_id, peer)
        if not isinstance(lease, Reservation):
            raise LeaseGone(f"lease {message.lease_id} is a pin, not a reservation")
        if message.sequence_hashes != lease.sequence_hashes:
            return ErrorReply(
                message.request_id,
                ErrorCode.MALFORMED,
                f"commit of lease {message.lease_id} names other hashes than its reservation",
            )
        self._leases.take(message.lease_id, peer)
        self._end(lease, committed=True)
        return NodeAck(message.request_id, len(lease.positions), 0)

    def _lookup(self, peer: PeerId, message: Message) -> Message:
        assert isinstance(message, NodeLookup)
        hashes = [SequenceHash(h) for h in message.sequence_hashes]
        self._admission.observe(hashes)
        if self._disk is not None:
            try:
                onboard_prefix(self._pool, self._disk, self._index, hashes)
            except FabricError as exc:  # the disk cannot serve: the pool's prefix still can
                logger.warning("node disk: a lookup's blocks not read (%s)", exc)
        matched = self._pool.match(hashes)
        if not len(matched):
            self._pool.release(matched)
            return NodePinned(message.request_id, None, [], 0)
        lease_id, _ = self._leases.grant(peer, Pin(matched))
        self.counters.pins += 1
        return NodePinned(
            message.request_id,
            lease_id,
            [int(b) for b in matched.block_ids],
            _ms(self._leases.lease_s),
        )

    def _release(self, peer: PeerId, message: Message) -> Message:
        assert isinstance(message, NodeRelease)
        lease = self._leases.take(message.lease_id, peer)
        num_blocks = self._end(lease, committed=False)
        return NodeAck(message.request_id, num_blocks, 0)

    def _renew(self, peer: PeerId, message: Message) -> Message:
        assert isinstance(message, NodeRenew)
        lease, deadline = self._leases.renew(message.lease_id, peer)
        num_blocks = len(lease.blocks)
        return NodeAck(message.request_id, num_blocks, _ms(self._leases.remaining_s(deadline)))

    def _stats(self, peer: PeerId, message: Message) -> Message:
        assert isinstance(message, NodeStatsRequest)
        return NodeStats(message.request_id, self._stats_now())

    # -- internals -------------------------------------------------------------------------------

    def _end(self, lease: Lease, *, committed: bool, expired: bool = False) -> int:
        """Give back what ``lease`` holds; its number of blocks (slots or pinned blocks)."""
        pool, counters = self._pool, self.counters
        if isinstance(lease, Pin):
            num_blocks = len(lease.blocks)
            pool.release(lease.blocks)
            counters.expired_pins += expired
            counters.unpinned += not expired
            return num_blocks
        num_blocks = len(lease.blocks)
        if committed:
            hashes = lease.sequence_hashes
            parents = [lease.parent_hash, *hashes[:-1]]
            slots = list(lease.blocks.block_ids)
            register_positions(pool, lease.blocks, hashes, lease.positions, parents)
            counters.committed_blocks += num_blocks
            stored = [hashes[p] for p in lease.positions]
            if self._index is not None:
                self._index.publish_registered(pool, slots, stored)
            if self._disk is not None:  # write-through: referenced until its files are written
                held = pool.match_present(stored)
                if not self._disk.offload(held.sequence_hashes, held.block_ids, held):
                    pool.release(held)
        elif expired:  # its writer may still be copying: no one gets these slots for a while
            self._quarantine.append((self._leases.now() + self._leases.lease_s, lease.blocks))
            counters.expired_reservations += 1
        else:
            pool.release(lease.blocks)
            counters.aborted += 1
        pool.release(lease.present)
        return num_blocks

    def _refresh_touched(self) -> None:
        """Blocks readers copied through the index become the most recently used."""
        if self._index is None:
            return
        slots, hashes = self._index.drain_touched()
        if slots:
            self._pool.release(self._pool.match_present([SequenceHash(h) for h in hashes]))
            self.counters.optimistic_hits += len(slots)

    def _expire(self) -> int:
        self._refresh_touched()
        if self._disk is not None:
            for held in self._disk.drain():
                self._pool.release(held)
        now = self._leases.now()
        while self._quarantine and self._quarantine[0][0] <= now:
            self._pool.release(self._quarantine.popleft()[1])
        expired = self._leases.expire()
        for peer, lease in expired:
            kind = "reservation" if isinstance(lease, Reservation) else "pin"
            num_blocks = self._end(lease, committed=False, expired=True)
            logger.warning(
                "a %s of %s on %d blocks passed its deadline (the client died or stalled); "
                "reclaimed",
                kind,
                peer,
                num_blocks,
            )
        return len(expired)

    def _stats_now(self) -> dict[str, int]:
        pool = self._pool.stats()
        leases = self._leases.items()
        return {
            "num_blocks": pool.num_blocks,
            "num_free": pool.num_free,
            "num_cached": pool.num_cached,
            "num_in_use": pool.num_in_use,
            "hits": pool.hits + self.counters.optimistic_hits,  # by lookups or through the index
            "misses": pool.misses,
            "evictions": pool.evictions,
            "registered": pool.registered,
            "duplicates": pool.duplicates,
            "live_reservations": sum(isinstance(lease, Reservation) for lease in leases),
            "reserved_slots": sum(
                len(lease.blocks) for lease in leases if isinstance(lease, Reservation)
            ),
            "live_pins": sum(isinstance(lease, Pin) for lease in leases),
            "pinned_blocks": sum(len(lease.blocks) for lease in leases if isinstance(lease, Pin)),
            "quarantined_slots": sum(len(slots) for _, slots in self._quarantine),
            "reservations": self.counters.reservations,
            "committed_blocks": self.counters.committed_blocks,
            "aborted": self.counters.aborted,
            "expired_reservations": self.counters.expired_reservations,
            "pins": self.counters.pins,
            "unpinned": self.counters.unpinned,
            "expired_pins": self.counters.expired_pins,
            "refused_unattached": self.counters.refused_unattached,
            "optimistic_hits": self.counters.optimistic_hits,
            **(self._disk.stats() if self._disk is not None else dict.fromkeys(DISK_STATS, 0)),
            "attached_clients": len(self._attached),
        }


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
