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
  ``abort``, ``expire`` (older than ``hold_timeout_s``: a decode that died never leaks prefill
  blocks) or ``close``, whichever comes first; afterwards the request id is unknown and a late
  ``complete`` / ``abort`` returns False (an expected outcome after an expiry, not an error).
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
* Neither class is thread-safe: one owner thread each, like the ``KvBlockManager`` they use. The
  agent must already have the device storage registered (``agent.register(kvbm.storage()
  .buffers())`` once at start), on both sides.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fabric.errors import InvalidInput, ProtocolMismatch, TransferError
from fabric.kvbm import (
    BlockId,
    ImmutableBlocks,
    KvBlockManager,
    RemoteBlockSet,
    SequenceHash,
    Tier,
    export_block_set,
    read_remote_blocks,
)
from fabric.signal.messages import BlocksReady, TransferDone
from fabric.transfer.agent import TransferAgent

logger = logging.getLogger(__name__)


class DecodePoolFull(TransferError):
    """The decode device pool cannot take the blocks now (all referenced); retry or abort."""


class Releasable(Protocol):
    """Something holding block references that it returns, once, on ``release``
    (``SequenceBlocks`` is one)."""

    def release(self) -> None: ...


@dataclass(slots=True)
class _Held:
    """One offered request: the references the prefill keeps until the decode acknowledges."""

    release: Callable[[], None]
    num_blocks: int
    offered_at: float


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
        self._request_to_held: dict[str, _Held] = {}  # offer order, so oldest first

    @property
    def num_held(self) -> int:
        """Requests whose blocks are held for a decode."""
        return len(self._request_to_held)

    def offer(
        self, request_id: str, blocks: ImmutableBlocks, *, first_token: int, num_tokens: int
    ) -> BlocksReady:
        """Export ``blocks`` for a decode to read and hold a reference on them.

        The caller keeps its own handle on ``blocks`` (release it when its request is done).

        Raises:
            InvalidInput: ``request_id`` is already held, or ``blocks`` live on disk.
        """
        if request_id in self._request_to_held:
            raise InvalidInput(f"request {request_id!r} already has blocks on offer")
        block_set = export_block_set(
            self._kvbm.storage(blocks.tier), blocks.block_ids, self._agent, self._kvbm.compat_hash
        )
        held = self._kvbm.pool(blocks.tier).retain(blocks)
        self._hold(request_id, _Held(lambda: self._kvbm.release(held), len(held), time.monotonic()))
        return BlocksReady(
            request_id, first_token, self._agent.name, block_set.to_bytes(), num_tokens
        )

    def offer_owned(
        self,
        request_id: str,
        block_ids: Sequence[BlockId],
        owner: Releasable,
        *,
        first_token: int,
        num_tokens: int,
    ) -> BlocksReady:
        """Export device blocks ``block_ids`` that ``owner`` keeps referenced, and take ``owner``.

        Unlike ``offer``, the blocks may include a partial, unregistered last block. From here
        on the handoff owns ``owner`` and calls its ``release`` exactly once (``complete``,
        ``abort``, ``expire`` or ``close``). If this raises, the caller still owns it.

        Raises:
            InvalidInput: ``request_id`` is already held.
        """
        if request_id in self._request_to_held:
            raise InvalidInput(f"request {request_id!r} already has blocks on offer")
        block_set = export_block_set(
            self._kvbm.storage(Tier.DEVICE), block_ids, self._agent, self._kvbm.compat_hash
        )
        self._hold(request_id, _Held(owner.release, len(block_ids), time.monotonic()))
        return BlocksReady(
            request_id, first_token, self._agent.name, block_set.to_bytes(), num_tokens
        )

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

    def expire(self, now: float) -> list[str]:
        """Release every handoff offered ``hold_timeout_s`` or more before ``now``
        (``time.monotonic()``); returns their request ids."""
        expired = []
        for request_id, held in self._request_to_held.items():
            if now - held.offered_at < self.hold_timeout_s:
                break
            expired.append(request_id)
        for request_id in expired:
            self._release(request_id)
            logger.warning(
                "request %s: no TransferDone within %.1f s; released its prefill blocks (did the "
                "decode die?)",
                request_id,
                self.hold_timeout_s,
            )
        return expired

    def close(self) -> None:
        """Release every held handoff (idempotent)."""
        for request_id in list(self._request_to_held):
            self._release(request_id)

    def _hold(self, request_id: str, held: _Held) -> None:
        self._request_to_held[request_id] = held
        logger.debug("offered %d blocks of request %s", held.num_blocks, request_id)

    def _release(self, request_id: str) -> bool:
        held = self._request_to_held.pop(request_id, None)
        if held is None:
            return False
        held.release()
        return True


class DecodeHandoff:
    """The decode side: reads a prefill's offered blocks into this worker's device pool."""

    def __init__(self, kvbm: KvBlockManager, agent: TransferAgent, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise InvalidInput(f"timeout_s={timeout_s} must be > 0")
        self._kvbm = kvbm
        self._agent = agent
        self.timeout_s = timeout_s
        self._peer_to_metadata: dict[str, bytes] = {}
        self.on_registered: Callable[[ImmutableBlocks], None] | None = None
        """Sees the blocks ``receive`` registers (the worker's offload manager)."""

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
        remote = self._block_set(ready)
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
        remote = self._block_set(ready)
        end = start + len(block_ids)
        if not 0 <= start <= end <= len(remote.block_ids):
            raise InvalidInput(
                f"request {ready.request_id}: blocks {start}..{end - 1} asked for, "
                f"{len(remote.block_ids)} offered"
            )
        try:
            self._add_peer(remote)
            read_remote_blocks(
                self._agent,
                self._kvbm.storage(Tier.DEVICE),
                block_ids,
                dataclasses.replace(remote, block_ids=remote.block_ids[start:end]),
                compat_hash=self._kvbm.compat_hash,
                timeout_s=self.timeout_s,
            )
        except TransferError:
            self._forget_peer(remote.agent_name)
            raise
        logger.debug(
            "request %s: read %d blocks from %s",
            ready.request_id,
            len(block_ids),
            remote.agent_name,
        )

    @staticmethod
    def _block_set(ready: BlocksReady) -> RemoteBlockSet:
        remote = RemoteBlockSet.from_bytes(ready.block_set)
        if remote.agent_name != ready.agent_name:
            raise ProtocolMismatch(
                f"request {ready.request_id}: BlocksReady names agent {ready.agent_name!r} but "
                f"its block set is {remote.agent_name!r}'s"
            )
        return remote

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
            self._add_peer(remote)
            read_remote_blocks(
                self._agent,
                self._kvbm.storage(Tier.DEVICE),
                allocation.block_ids,
                dataclasses.replace(remote, block_ids=remote.block_ids[num_local:]),
                compat_hash=self._kvbm.compat_hash,
                timeout_s=self.timeout_s,
            )
        except BaseException as exc:
            self._kvbm.release(allocation)
            if isinstance(exc, TransferError):
                self._forget_peer(remote.agent_name)
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

    def _add_peer(self, remote: RemoteBlockSet) -> None:
        """Load the peer's metadata unless this exact metadata is loaded under its name."""
        name = remote.agent_name
        if self._peer_to_metadata.get(name) == remote.agent_metadata:
            return
        if self._agent.add_peer(remote.agent_metadata) != name:
            raise ProtocolMismatch(f"the block set names agent {name!r} but its metadata does not")
        self._peer_to_metadata[name] = remote.agent_metadata

    def _forget_peer(self, name: str) -> None:
        """Drop a peer whose transfer failed (dead or stalled); its next offer loads it again."""
        if self._peer_to_metadata.pop(name, None) is None:
            return
        try:
            self._agent.remove_peer(name)
        except TransferError as exc:
            logger.debug("removing peer %s: %s", name, exc)
