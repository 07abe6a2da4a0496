"""KV events: what the pools tell the outside world about stored and removed blocks.

Owns the event records and the ``EventSink`` protocol with the in-process sinks (null,
recording, fan-out). The wire codec that makes our events readable by vLLM's and Dynamo's
KV-aware routers is ``event_wire``; the ZMQ publisher is ``event_publisher``.

Invariants:

* One event describes a batch of blocks of one tier (pools register in batches). In a
  ``BlockStored``, ``block_hashes`` (when given) has one entry per sequence hash and ``token_ids``
  (when given) ``block_size`` entries per sequence hash; the constructor checks both.
* Records are immutable, so a sink may hand them to another thread without copying.
* ``NullSink.enabled`` is False so producers can skip building events at all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from fabric.errors import InvalidInput
from fabric.kvbm.core.types import BlockHash, SequenceHash, Tier

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks of one tier became matchable, in chain order.

    Attributes:
        sequence_hashes: the blocks' chained hashes (what they are registered and matched by).
        parent_hash: sequence hash of the block before the first one, None at a prompt's start.
        block_hashes: each block's local token hash, for in-process consumers (not on the wire).
        token_ids: all blocks' tokens concatenated (``block_size`` per block), or None.
    """

    tier: Tier
    sequence_hashes: tuple[SequenceHash, ...]
    parent_hash: SequenceHash | None
    block_hashes: tuple[BlockHash, ...] | None
    token_ids: tuple[int, ...] | None
    block_size: int

    def __post_init__(self) -> None:
        num_blocks = len(self.sequence_hashes)
        if self.block_size <= 0:
            raise InvalidInput(f"BlockStored.block_size must be positive, got {self.block_size}")
        if self.block_hashes is not None and len(self.block_hashes) != num_blocks:
            raise InvalidInput(
                f"BlockStored has {num_blocks} sequence hashes but {len(self.block_hashes)} "
                "block hashes; pass one of each per block"
            )
        if self.token_ids is not None and len(self.token_ids) != num_blocks * self.block_size:
            raise InvalidInput(
                f"BlockStored has {len(self.token_ids)} token ids for {num_blocks} blocks of "
                f"{self.block_size}; pass exactly block_size tokens per block (or None)"
            )


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks of one tier stopped being matchable (evicted or reset)."""

    tier: Tier
    sequence_hashes: tuple[SequenceHash, ...]


@dataclass(frozen=True, slots=True)
class AllCleared:
    """Every block of one tier stopped being matchable."""

    tier: Tier


KvEvent: TypeAlias = BlockStored | BlockRemoved | AllCleared


class EventSink(Protocol):
    """Where a pool sends its events. ``enabled`` False lets producers skip building them."""

    @property
    def enabled(self) -> bool: ...

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Take one batch of events, in order; must not block on I/O."""

    def close(self) -> None:
        """Release threads and sockets; idempotent."""


class NullSink:
    """Discards everything; the default, so producers check ``enabled`` and build nothing."""

    enabled = False

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Discard the batch."""

    def close(self) -> None:
        """Nothing to release."""


class RecordingSink:
    """Keeps every event in ``events`` (for tests and the demo)."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[KvEvent] = []
        self.closed = False

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Append the batch to ``events``."""
        self.events.extend(events)

    def close(self) -> None:
        """Mark the sink closed; the recorded events stay readable."""
        self.closed = True


class FanoutSink:
    """Hands each batch to every subscriber; a failing subscriber is logged and skipped.

    Subscribers can be added and removed while other threads publish: ``publish`` iterates an
    immutable snapshot.
    """

    enabled = True

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self._lock = threading.Lock()
        self._sinks: tuple[EventSink, ...] = tuple(sinks)

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        """The current subscribers."""
        return self._sinks

    def add(self, sink: EventSink) -> None:
        """Subscribe ``sink`` to every later batch."""
        with self._lock:
            self._sinks = (*self._sinks, sink)

    def remove(self, sink: EventSink) -> None:
        """Unsubscribe ``sink`` (not closed: the caller owns it); unknown sinks are ignored."""
        with self._lock:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Hand the batch to every subscriber; one's exception does not stop the others."""
        for sink in self._sinks:
            try:
                sink.publish(events)
            except Exception:
                logger.exception("KV event subscriber %r failed; it misses this batch", sink)

    def close(self) -> None:
        """Close every subscriber, logging (not raising) individual failures."""
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("closing KV event subscriber %r failed", sink)
