"""The consumer's reader: a producer's offered blocks into this process's KV, over NIXL.

``RemoteReader`` is the one place a consumer (the reference engine's decode worker, vLLM's
connector, the transfer benchmark) turns an offer into bytes:

1. ``block_set(ready)``: decode the ``BlocksReady``'s ``RemoteBlockSet`` and check that it is the
   named agent's;
2. ``read(remote, local_ids, start=...)``: take the slice ``start .. start + len(local_ids)`` of
   the offered blocks, plan the paired regions (``fabric.kvbm.remote.plan_read``: compatibility
   hash, geometry, layout kinds), load the producer's agent metadata unless this exact metadata
   is already loaded, post the READ and wait for it, bounded by ``timeout_s``. ``post`` (a
   subset of layers too) / ``poll`` / ``wait`` / ``release`` are its steps, for a consumer that
   keeps several READs in flight (``fabric.pd.layerwise``).

Invariants:

* A producer's metadata is loaded into the agent once per metadata blob (a restarted producer
  sends new metadata under a new agent name, or the same name with new metadata: loaded again);
  after a failed transfer the peer is removed from the agent and from the cache, so a dead or
  stalled producer's stale metadata is never reused.
* ``local_ids`` are blocks the caller owns; the reader never allocates, registers or releases
  blocks: the caller does, on success and on failure.
* Not thread-safe: one owner thread, the one that owns the transfer agent.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from fabric.errors import InvalidInput, ProtocolMismatch, TransferError
from fabric.kvbm import RemoteBlockSet, Storage
from fabric.kvbm.remote import plan_read
from fabric.signal.messages import BlocksReady, KvStream
from fabric.transfer.agent import Transfer, TransferAgent, TransferState

logger = logging.getLogger(__name__)


class RemoteReader:
    """Reads offered blocks into ``storage`` (registered with ``agent``); module docstring."""

    def __init__(
        self, agent: TransferAgent, storage: Storage, *, compat_hash: int, timeout_s: float
    ) -> None:
        if timeout_s <= 0:
            raise InvalidInput(f"timeout_s={timeout_s} must be > 0")
        self._agent = agent
        self._storage = storage
        self._compat_hash = compat_hash
        self.timeout_s = timeout_s
        self._peer_to_metadata: dict[str, bytes] = {}

    @property
    def storage(self) -> Storage:
        return self._storage

    @staticmethod
    def block_set(ready: BlocksReady | KvStream) -> RemoteBlockSet:
        """The offer's block set (a whole offer's or a layer-wise one's).

        Raises:
            ProtocolMismatch: the block set is another agent's than ``ready`` names, or of
                another wire version.
            InvalidInput / LayoutMismatch: it is malformed.
        """
        remote = RemoteBlockSet.from_bytes(ready.block_set)
        if remote.agent_name != ready.agent_name:
            raise ProtocolMismatch(
                f"request {ready.request_id}: BlocksReady names agent {ready.agent_name!r} but "
                f"its block set is {remote.agent_name!r}'s"
            )
        return remote

    def read(
        self,
        remote: RemoteBlockSet,
        local_ids: Sequence[int],
        *,
        start: int = 0,
        notify: bytes | None = None,
    ) -> None:
        """Read offered blocks ``start + i`` into ``local_ids[i]`` and wait for them; ``notify``
        reaches the producer's agent once the bytes have landed (also when nothing is read).

        Raises:
            InvalidInput: the offer holds fewer blocks than asked for, or the ids are invalid.
            ProtocolMismatch / LayoutMismatch: the producer's KV cannot be read into this cache.
            PeerUnavailable: the producer is gone. TransferTimeout: not done within
                ``timeout_s``. TransferError: the transfer failed. The transfer handle is
                released on every path.
        """
        transfer = self.post(remote, local_ids, start=start, notify=notify)
        if transfer is not None:
            self.wait(transfer, self.timeout_s)
        logger.debug("read %d blocks from %s", len(local_ids), remote.agent_name)

    def post(
        self,
        remote: RemoteBlockSet,
        local_ids: Sequence[int],
        *,
        start: int = 0,
        layers: tuple[int, int] | None = None,
        notify: bytes | None = None,
    ) -> Transfer | None:
        """Post the READ of offered blocks ``start + i`` into ``local_ids[i]`` (only layers
        ``layers[0] .. layers[1] - 1`` when given) without waiting; None when there is nothing
        to read (``notify`` is then sent at once). Hand the transfer to ``wait``, ``poll`` or
        ``release``.

        Raises:
            as ``read``, except ``TransferTimeout``.
        """
        end = start + len(local_ids)
        if not 0 <= start <= end <= len(remote.block_ids):
            raise InvalidInput(
                f"blocks {start}..{end - 1} asked for, {len(remote.block_ids)} offered by "
                f"{remote.agent_name!r}"
            )
        wanted = dataclasses.replace(remote, block_ids=remote.block_ids[start:end])
        local, theirs = plan_read(
            self._storage, local_ids, wanted, compat_hash=self._compat_hash, layers=layers
        )
        peer = self._add_peer(remote)
        try:
            if not len(local):
                if notify is not None:
                    self._agent.send_notification(peer, notify)
                return None
            return self._agent.read(local, theirs, peer, notify=notify)
        except TransferError:
            self._forget_peer(peer)
            raise

    def wait(self, transfer: Transfer, timeout_s: float) -> None:
        """Wait for a posted READ, at most ``timeout_s``; released on every path.

        Raises:
            PeerUnavailable / TransferTimeout / TransferError: as ``read`` (the producer's
                metadata is forgotten: its next offer loads it again).
        """
        try:
            self._agent.wait(transfer, timeout_s)
        except TransferError:
            self._forget_peer(transfer.peer)
            raise

    def poll(self, transfer: Transfer) -> bool:
        """Whether a posted READ is done (then released), without waiting.

        Raises:
            PeerUnavailable / TransferError: it failed (released; the peer forgotten).
        """
        state = self._agent.poll(transfer)
        if state is TransferState.PENDING:
            return False
        self._agent.release(transfer)
        if state is TransferState.FAILED:
            self._forget_peer(transfer.peer)
            raise transfer.error or TransferError(f"{transfer.describe()} failed")
        return True

    def release(self, transfer: Transfer) -> None:
        """Release a posted READ, cancelling it when still in flight."""
        if not transfer.released:
            self._agent.release(transfer)

    def _add_peer(self, remote: RemoteBlockSet) -> str:
        """Load the producer's metadata unless this exact metadata is loaded under its name."""
        name = remote.agent_name
        if self._peer_to_metadata.get(name) == remote.agent_metadata:
            return name
        # A producer restarted under the same agent name: add_peer replaces its metadata.
        if self._agent.add_peer(remote.agent_metadata) != name:
            raise ProtocolMismatch(
                f"the block set names agent {name!r} but its metadata is another agent's"
            )
        self._peer_to_metadata[name] = remote.agent_metadata
        return name

    def _forget_peer(self, name: str) -> None:
        """Drop a peer whose transfer failed (dead or stalled); its next offer loads it again."""
        if self._peer_to_metadata.pop(name, None) is None:
            return
        try:
            self._agent.remove_peer(name)
        except TransferError as exc:
            logger.debug("removing peer %s: %s", name, exc)
