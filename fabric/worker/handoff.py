"""The prefill -> decode KV handoff: offer registered blocks, read the missing ones, release.

Owns both ends of one request's handoff; the signal channel (``fabric.signal``) carries the
messages and the transfer agent moves the bytes. The sequence::

    decode                                   prefill
      PrefillRequest ─────────────────────▶  compute, register blocks
                                             PrefillHandoff.offer: export a RemoteBlockSet,
      ◀───────────────────────── BlocksReady retain the blocks (held)
      DecodeHandoff.receive: match locally,
      allocate the rest, READ them, register
      TransferDone ───────────────────────▶  PrefillHandoff.complete: release (blocks stay cached)
      (or Abort on failure) ──────────────▶  PrefillHandoff.abort

Invariants:

* The prefill holds exactly one reference per offered block from ``offer`` (or, for
  ``offer_owned``, the owner it was given, released once) until ``complete``,
  ``abort``, ``abandon`` (the decode it was offered to left the fleet: its record left the
  prefill's worker directory), ``expire`` (offered ``hold_timeout_s`` ago: the backstop, so a
  decode that died never leaks prefill blocks even unseen) or ``close``, whichever comes first;
  afterwards the request id is unknown and a late ``complete`` / ``abort`` returns False (an
  expected outcome after an expiry, not an error).
* ``abandon(decode, held_before)`` releases only what was offered to that decode worker id
  before ``held_before``: offers to a decode restarted under the same id after it was seen
  leaving stay held.
* ``receive`` reads only blocks the decode does not already hold (its device prefix, onboarded
  from host or disk where the manager has them, is reused) and registers them chained to that
  prefix. On any failure every block it allocated or matched goes back to the pool before the
  exception leaves: ``TransferError`` subclasses for the transfer (``PeerUnavailable``,
  ``TransferTimeout``, ``DecodePoolFull``), ``ProtocolMismatch`` / ``LayoutMismatch`` when the
  peer's KV is incompatible. The caller then sends ``Abort``, else
  ``TransferDone(request_id, len(blocks))``.
* ``offer_owned`` / ``read_into`` are the serving path's pair: the prefill offers every block of
  the prompt, the partial last one included (it is owned, not registered, so the owner's
  references stand in for the retained ones), and the decode reads the offered blocks it lacks
  into blocks it already reserved, then registers them itself (``SequenceBlocks.commit``). The
  whole prompt's KV crosses, so the decode computes nothing of the prompt.
* ``stream_owned`` / ``stream_ready`` are the layer-wise pair (``fabric.pd.layerwise``): the
  prefill holds and offers the prompt's blocks before computing them (``KvStream``), and ends
  the stream with the ``BlocksReady`` of the computed prompt; ``layerwise_read`` is the
  decode's reader of such an offer. The hold is the same as ``offer_owned``'s, its deadline
  re-armed by ``stream_ready`` (``hold_timeout_s`` counts from the offer, as for
  ``offer_owned``, not from before the compute).
* Neither class is thread-safe: one owner thread each, like the ``KvBlockManager`` they use. The
  agent must already have the device storage registered (``agent.register(kvbm.storage()
  .buffers())`` once at start), on both sides.

The mechanisms are ``fabric.pd``'s, shared with vLLM's connector: the hold table
(``HoldTable``), the offers (``BlockExporter``), the reads (``RemoteReader``) and the polling
of the agent while blocks are held (``HoldProgress``). This module
adds what the reference engine's block manager needs around them: references held through the
``KvBlockManager``, local prefix matches, allocation and registration of what was read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from fabric.errors import InvalidInput, TransferError
from fabric.kvbm import (
    BlockId,
    ImmutableBlocks,
    KvBlockManager,
    RemoteBlockSet,
    SequenceHash,
    Tier,
)
from fabric.pd import BlockExporter, HoldProgress, HoldTable, LayerwiseRead, RemoteReader
from fabric.signal.messages import BlocksReady, KvStream, TransferDone
from fabric.transfer.agent import TransferAgent

logger = logging.getLogger(__name__)


class DecodePoolFull(TransferError):
    """The decode device pool cannot take the blocks now (all referenced); retry or abort."""


class Releasable(Protocol):
    """Something holding block references that it returns, once, on ``release``
    (``SequenceBlocks`` is one)."""

    def release(self) -> None: ...


class _HeldBlocks:
    """Blocks retained for a decode: released through the manager, once."""

    def __init__(self, kvbm: KvBlockManager, blocks: ImmutableBlocks) -> None:
        self._kvbm = kvbm
        self._blocks = blocks

    def release(self) -> None:
        self._kvbm.release(self._blocks)


class PrefillHandoff:
    """The prefill side: offers blocks to a decode and holds them until it is done with them."""

    def __init__(
        self, kvbm: KvBlockManager, agent: TransferAgent, *, hold_timeout_s: float
    ) -> None:
        if hold_timeout_s <= 0:
            raise InvalidInput(f"hold_timeout_s={hold_timeout_s} must be > 0")
        self._kvbm = kvbm
        self._agent = agent
        self.hold_timeout_s = hold_timeout_s
        self._holds: HoldTable[Releasable] = HoldTable()
        self._progress = HoldProgress(agent, self._holds)
        self._exporters: dict[Tier, BlockExporter] = {}

    @property
    def num_held(self) -> int:
        """Requests whose blocks are held for a decode."""
        return len(self._holds)

    def progress(self) -> None:
        """Drive this side's transfer agent while blocks are held (call it often then): over
        a network a decode's READ completes only while it is polled (``fabric.pd.progress``)."""
        self._progress.maybe_progress()

    def offer(
        self,
        request_id: str,
        blocks: ImmutableBlocks,
        *,
        first_token: int,
        num_tokens: int,
        decode: str | None = None,
    ) -> BlocksReady:
        """Export ``blocks`` for a decode to read and hold a reference on them.

        The caller keeps its own handle on ``blocks`` (release it when its request is done).
        ``decode`` is the reading worker's id, for ``abandon``.

        Raises:
            InvalidInput: ``request_id`` is already held, or ``blocks`` live on disk.
        """
        self._check_new(request_id)
        ready = self._exporter(blocks.tier).ready(
            request_id, blocks.block_ids, first_token=first_token, num_tokens=num_tokens
        )
        held = self._kvbm.pool(blocks.tier).retain(blocks)
        self._hold(request_id, _HeldBlocks(self._kvbm, held), len(held), decode)
        return ready

    def offer_owned(
        self,
        request_id: str,
        block_ids: Sequence[BlockId],
        owner: Releasable,
        *,
        first_token: int,
        num_tokens: int,
        decode: str | None = None,
    ) -> BlocksReady:
        """Export device blocks ``block_ids`` that ``owner`` keeps referenced, and take ``owner``.

        Unlike ``offer``, the blocks may include a partial, unregistered last block. From here
        on the handoff owns ``owner`` and calls its ``release`` exactly once (``complete``,
        ``abort``, ``abandon``, ``expire`` or ``close``). If this raises, the caller still owns
        it. ``decode`` is the reading worker's id, for ``abandon``.

        Raises:
            InvalidInput: ``request_id`` is already held.
        """
        self._check_new(request_id)
        ready = self._exporter(Tier.DEVICE).ready(
            request_id, block_ids, first_token=first_token, num_tokens=num_tokens
        )
        self._hold(request_id, owner, len(block_ids), decode)
        return ready

    def stream_owned(
        self,
        request_id: str,
        block_ids: Sequence[BlockId],
        owner: Releasable,
        *,
        num_tokens: int,
        done_tokens: int,
        decode: str | None = None,
    ) -> KvStream:
        """As ``offer_owned``, but before the prompt is computed (a layer-wise handoff): the
        blocks are held from now on and the decode reads each layer as ``KvLayers`` announce
        it; ``stream_ready`` ends the stream. If this raises, the caller still owns ``owner``.

        Raises:
            InvalidInput: ``request_id`` is already held.
        """
        self._check_new(request_id)
        stream = self._exporter(Tier.DEVICE).stream(
            request_id, block_ids, num_tokens=num_tokens, done_tokens=done_tokens
        )
        self._hold(request_id, owner, len(block_ids), decode)
        return stream

    def stream_ready(
        self, request_id: str, block_ids: Sequence[BlockId], *, first_token: int, num_tokens: int
    ) -> BlocksReady | None:
        """The ``BlocksReady`` that ends a stream (every layer written, the first token known);
        None when its hold already ended (aborted, abandoned or expired).

        The hold's deadline is re-armed here, ``hold_timeout_s`` from now: the hold was taken
        before the compute, and the decode's allowance starts when the offer is complete (a
        prefill longer than the timeout must not expire the hold as it ends). A decode that
        vanished meanwhile still frees it (``abandon``, or this deadline)."""
        ready = self._exporter(Tier.DEVICE).ready(
            request_id, block_ids, first_token=first_token, num_tokens=num_tokens
        )
        if not self._holds.rearm(request_id, time.monotonic() + self.hold_timeout_s):
            return None
        return ready

    def complete(self, done: TransferDone) -> bool:
        """Release the blocks of ``done.request_id``; False when none are held under that id
        (completed, aborted or expired before): answer it with ``ErrorCode.UNKNOWN_REQUEST``."""
        released = self._release(done.request_id)
        if released:
            logger.debug(
                "request %s done: decode holds %d blocks", done.request_id, done.num_blocks
            )
        return released

    def abort(self, request_id: str) -> bool:
        """Release the blocks of ``request_id``; False when none are held under that id."""
        return self._release(request_id)

    def abandon(self, decode: str, *, held_before: float) -> tuple[int, int]:
        """Release every handoff offered to worker ``decode`` before ``held_before``
        (``time.monotonic()``): it left the fleet, so no ``TransferDone`` will come.

        Returns:
            ``(handoffs, blocks)`` released.
        """
        abandoned = self._holds.abandon(decode, held_before=held_before)
        for freed in abandoned:
            freed.item.release()
        return len(abandoned), sum(freed.num_blocks for freed in abandoned)

    def expire(self, now: float) -> list[str]:
        """Release every handoff offered ``hold_timeout_s`` or more before ``now``
        (``time.monotonic()``); returns their request ids."""
        expired = self._holds.collect(now)
        for freed in expired:
            freed.item.release()
        return [freed.request_id for freed in expired]

    def close(self) -> None:
        """Release every held handoff (idempotent)."""
        for freed in self._holds.expire_all():
            freed.item.release()

    def _check_new(self, request_id: str) -> None:
        if request_id in self._holds:
            raise InvalidInput(f"request {request_id!r} already has blocks on offer")

    def _exporter(self, tier: Tier) -> BlockExporter:
        exporter = self._exporters.get(tier)
        if exporter is None:
            exporter = BlockExporter(
                self._kvbm.storage(tier), self._agent, compat_hash=self._kvbm.compat_hash
            )
            self._exporters[tier] = exporter
        return exporter

    def _hold(
        self, request_id: str, owner: Releasable, num_blocks: int, decode: str | None
    ) -> None:
        deadline = time.monotonic() + self.hold_timeout_s
        self._holds.hold(
            request_id, owner, num_blocks=num_blocks, deadline=deadline, consumer=decode
        )

    def _release(self, request_id: str) -> bool:
        owner = self._holds.finish(request_id)
        if owner is None:
            return False
        owner.release()
        return True


class DecodeHandoff:
    """The decode side: reads a prefill's offered blocks into this worker's device pool."""

    def __init__(self, kvbm: KvBlockManager, agent: TransferAgent, *, timeout_s: float) -> None:
        self._kvbm = kvbm
        self._reader = RemoteReader(
            agent, kvbm.storage(Tier.DEVICE), compat_hash=kvbm.compat_hash, timeout_s=timeout_s
        )
        self.on_registered: Callable[[ImmutableBlocks], None] | None = None
        """Sees the blocks ``receive`` registers (the worker's offload manager)."""

    @property
    def timeout_s(self) -> float:
        return self._reader.timeout_s

    def receive(
        self, ready: BlocksReady, sequence_hashes: Sequence[SequenceHash]
    ) -> ImmutableBlocks:
        """Device blocks holding the offered prefix, read from the prefill where not held here.

        Args:
            ready: the prefill's offer.
            sequence_hashes: this worker's hashes of the prompt's full blocks, one per offered
                block.

        Returns:
            One handle on the whole prefix, in order; release it when the request is done.

        Raises:
            TransferError: ``PeerUnavailable`` (the prefill is gone), ``TransferTimeout``,
                ``DecodePoolFull``, or another failed transfer.
            ProtocolMismatch / LayoutMismatch: the prefill's KV cannot be read into this cache.
            InvalidInput: the offer is malformed or its block count differs from the hashes'.
            PoolExhausted: the prompt needs more blocks than the decode pool holds in total.
        """
        remote = self._reader.block_set(ready)
        if len(remote.block_ids) != len(sequence_hashes):
            raise InvalidInput(
                f"request {ready.request_id}: {len(remote.block_ids)} blocks offered for "
                f"{len(sequence_hashes)} sequence hashes; hash the same prompt on both sides"
            )
        local = self._kvbm.match_and_onboard(sequence_hashes)
        num_local = len(local)
        if num_local == len(sequence_hashes):
            logger.debug("request %s: all %d blocks held locally", ready.request_id, num_local)
            return local
        try:
            return local.join(self._read(ready.request_id, remote, sequence_hashes, num_local))
        except BaseException:
            self._kvbm.release(local)
            raise

    def read_into(self, ready: BlocksReady, start: int, block_ids: Sequence[BlockId]) -> None:
        """Read offered blocks ``start .. start + len(block_ids) - 1`` into ``block_ids``.

        ``block_ids`` are device blocks the caller owns (allocated, not registered); it
        registers or releases them afterwards: the pool is not touched here, on success or
        failure.

        Raises:
            TransferError: ``PeerUnavailable`` (the prefill is gone), ``TransferTimeout``, or
                another failed transfer.
            ProtocolMismatch / LayoutMismatch: the prefill's KV cannot be read into this cache.
            InvalidInput: the offer is malformed or holds fewer blocks than asked for.
        """
        self._reader.read(self._reader.block_set(ready), block_ids, start=start)
        logger.debug(
            "request %s: read %d blocks from %s", ready.request_id, len(block_ids), ready.agent_name
        )

    def layerwise_read(
        self, offer: KvStream, start: int, block_ids: Sequence[BlockId]
    ) -> LayerwiseRead:
        """A layer-wise read of ``offer``'s blocks ``start ..`` into ``block_ids`` (device
        blocks the caller owns, as ``read_into``'s); ``fabric.worker.streams`` drives it.

        Raises:
            ProtocolMismatch / LayoutMismatch / InvalidInput: as ``read_into``.
        """
        remote = self._reader.block_set(offer)
        return LayerwiseRead(
            self._reader, remote, block_ids, start=start, num_tokens=offer.num_tokens
        )

    def _read(
        self,
        request_id: str,
        remote: RemoteBlockSet,
        sequence_hashes: Sequence[SequenceHash],
        num_local: int,
    ) -> ImmutableBlocks:
        """Read the offered blocks from ``num_local`` on into new device blocks, registered."""
        missing = sequence_hashes[num_local:]
        allocation = self._kvbm.allocate(len(missing))
        if allocation is None:
            raise DecodePoolFull(
                f"request {request_id}: the decode device pool has no room for {len(missing)} "
                "blocks (all referenced); retry later or abort the request"
            )
        try:
            self._reader.read(remote, allocation.block_ids, start=num_local)
        except BaseException:
            self._kvbm.release(allocation)
            raise
        allocation.advance(allocation.capacity)
        parent = sequence_hashes[num_local - 1] if num_local else None
        logger.debug(
            "request %s: read %d blocks from %s, %d held locally",
            request_id,
            len(missing),
            remote.agent_name,
            num_local,
        )
        registered = self._kvbm.register(allocation, missing, parent_hash=parent)
        if self.on_registered is not None:
            self.on_registered(registered)
        return registered
