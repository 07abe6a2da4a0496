"""The decode's layer-wise handoffs in flight: one ``fabric.pd.LayerwiseRead`` per request.

A decode worker that asked for a layer-wise handoff (``PrefillRequest.wants_layerwise``) gets,
from a prefill worker that grants it::

    KvStream ──begin──▶ reading ──KvLayers: advance (post READs of the new layers)──▶ ...
        ──BlocksReady: finish (read the rest, wait for all, bounded)──▶ done (the caller
        registers the blocks, answers TransferDone)
    any failure, fallback or end of the request ──cancel──▶ gone (READs in flight cancelled)

``poll`` checks every read in flight once per scheduler step without waiting; a failed one (the
prefill died mid-stream: ``PeerUnavailable``) is cancelled, forgotten and returned, so the caller
falls back at once instead of waiting for the prefill's lease to expire.

Invariants: the reads write only into blocks the caller reserved for the request (``block_ids``)
and never touch the pool; after ``finish`` (returned or raised) or ``cancel`` nothing of the
request is in flight, so its blocks may be recomputed into or released; a request is in the
table from ``begin`` to ``finish`` / ``cancel`` / a failure ``poll`` returned. Runs on the
scheduler thread, the agent's owner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fabric.errors import FabricError, ProtocolMismatch
from fabric.kvbm import BlockId
from fabric.pd import KvFrontier, LayerwiseRead
from fabric.signal.messages import BlocksReady, KvLayers, KvStream
from fabric.worker.handoff import DecodeHandoff

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Stream:
    offer: KvStream
    read: LayerwiseRead
    start: int
    began: float  # time.perf_counter() before the first READ was posted


@dataclass(frozen=True, slots=True)
class StreamedRead:
    """A layer-wise read that ``finish`` completed."""

    start: int
    """The first block read (blocks before it were held here)."""
    num_early_reads: int
    """READs posted before ``BlocksReady`` came (while the prefill computed)."""
    read_ms: float
    """From the first READ posted (``begin``) to the last one completed: the whole read, the
    time its bytes took to cross (``kv_transfer_ms``), not what TTFT waited for."""


class DecodeStreams:
    """Layer-wise reads in flight, by request id (module docstring)."""

    def __init__(self, handoff: DecodeHandoff) -> None:
        self._handoff = handoff
        self._id_to_stream: dict[str, _Stream] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._id_to_stream

    def __len__(self) -> int:
        return len(self._id_to_stream)

    def begin(self, offer: KvStream, start: int, block_ids: Sequence[BlockId]) -> None:
        """Start reading ``offer``'s blocks ``start ..`` into ``block_ids`` (reserved by the
        caller), beginning with what is written already (a cached prefix on the prefill).

        Raises:
            FabricError: the offer cannot be read (malformed, incompatible, the peer gone).
        """
        self.cancel(offer.request_id)  # a repeated KvStream replaces the first, never leaks it
        began = time.perf_counter()
        read = self._handoff.layerwise_read(offer, start, block_ids)
        read.advance(KvFrontier(offer.done_tokens, offer.done_tokens, 0))
        self._id_to_stream[offer.request_id] = _Stream(offer, read, start, began)

    def advance(self, layers: KvLayers) -> None:
        """Post the READs of what ``layers`` made final (nothing when the stream is gone).

        Raises:
            FabricError: posting failed; the stream is cancelled and forgotten.
        """
        stream = self._id_to_stream.get(layers.request_id)
        if stream is None:
            return
        frontier = KvFrontier(layers.done_tokens, layers.chunk_end, layers.num_layers)
        try:
            stream.read.advance(frontier)
        except BaseException:
            self.cancel(layers.request_id)
            raise

    def poll(self) -> list[tuple[str, FabricError]]:
        """Check every read in flight once; the failed ones, cancelled and forgotten."""
        failed = []
        for request_id, stream in list(self._id_to_stream.items()):
            try:
                stream.read.poll()
            except FabricError as exc:
                del self._id_to_stream[request_id]
                failed.append((request_id, exc))
        return failed

    def finish(self, ready: BlocksReady) -> StreamedRead | None:
        """Read what is left of the stream ``ready`` ends and wait for every READ (bounded by
        the transfer timeout); None when ``ready`` ends no stream (read it whole).

        Raises:
            ProtocolMismatch: ``ready`` offers other blocks than the stream did.
            TransferError: a READ failed or timed out. Either way nothing is left in flight.
        """
        stream = self._id_to_stream.pop(ready.request_id, None)
        if stream is None:
            return None
        if (ready.agent_name, ready.block_set) != (stream.offer.agent_name, stream.offer.block_set):
            stream.read.cancel()
            raise ProtocolMismatch(
                f"request {ready.request_id}: BlocksReady offers other blocks than its KvStream"
            )
        num_early = stream.read.num_reads
        stream.read.finish()
        read_ms = (time.perf_counter() - stream.began) * 1000
        logger.debug(
            "request %s: layer-wise read done in %.2f ms, %d READs before the offer, %d after",
            ready.request_id,
            read_ms,
            num_early,
            stream.read.num_reads - num_early,
        )
        return StreamedRead(stream.start, num_early, read_ms)

    def cancel(self, request_id: str) -> None:
        """Cancel the READs in flight of ``request_id`` and forget it (no-op when absent)."""
        stream = self._id_to_stream.pop(request_id, None)
        if stream is not None:
            stream.read.cancel()

    def close(self) -> None:
        for request_id in list(self._id_to_stream):
            self.cancel(request_id)
