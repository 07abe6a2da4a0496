"""Layer-wise handoff: how much of a prompt's KV a producer has written, and the consumer's
progressive read of it while the producer computes the rest.

A producer computes a prompt in chunks of positions (one chunk when it computes the prompt
whole), each chunk through every layer in order, and writes a layer's K/V of the chunk before it
computes that layer's attention. What is final at any moment is a ``KvFrontier``:

* every layer of positions ``< done_tokens`` (a cached prefix, the chunks completed), and
* layers ``0 .. num_layers - 1`` of the chunk in progress, positions ``done_tokens ..
  chunk_end - 1``.

A block's layer is final once every position of the block has been written in that layer
(``layers_ready``): a block straddling a chunk boundary waits for the later chunk, so no byte the
consumer reads is ever written again (the producer writes each prompt position once, per layer).

``LayerwiseRead`` is the consumer's read of one offer into blocks it owns: each ``advance``
posts READs of what the new frontier made final and the consumer has not read yet (grouped by
layer range: a few groups, each one planned, coalesced READ; fully contiguous slots give
one descriptor per block and layer range, layer-separate buffers one per layer and run of
blocks), ``poll`` checks them without waiting, ``finish`` reads the rest and waits for all,
bounded by the reader's timeout, and ``cancel`` releases (cancels) whatever is in flight.

Invariants: a (block, layer) is read at most once and only once a frontier said it is final
(frontiers may arrive out of order: one behind what was read posts nothing); every
posted transfer is released exactly once (done, failed or cancelled), so after ``finish``
returns, raises, or after ``cancel``, nothing is in flight. Not thread-safe: the thread that
owns the transfer agent.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fabric.errors import InvalidInput
from fabric.kvbm import RemoteBlockSet
from fabric.pd.reader import RemoteReader
from fabric.transfer.agent import Transfer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KvFrontier:
    """What of a prompt's KV a producer has written (module docstring)."""

    done_tokens: int
    """Every layer of positions ``< done_tokens`` is written."""
    chunk_end: int
    """The chunk in progress covers positions ``done_tokens .. chunk_end - 1``."""
    num_layers: int
    """Layers ``0 .. num_layers - 1`` of that chunk are written."""

    def __post_init__(self) -> None:
        if not 0 <= self.done_tokens <= self.chunk_end or self.num_layers < 0:
            raise InvalidInput(
                f"frontier {self.done_tokens}/{self.chunk_end}/{self.num_layers}: need "
                "0 <= done_tokens <= chunk_end and num_layers >= 0"
            )

    @classmethod
    def complete(cls, num_tokens: int) -> KvFrontier:
        """Every layer of every position written."""
        return cls(num_tokens, num_tokens, 0)


def layers_ready(
    frontier: KvFrontier, *, num_tokens: int, block_size: int, num_layers: int
) -> np.ndarray:
    """How many leading layers of each of the prompt's blocks are final, ``(num_blocks,)``."""
    num_blocks = -(-num_tokens // block_size)
    if frontier.chunk_end > num_tokens or frontier.num_layers > num_layers:
        raise InvalidInput(
            f"frontier past the prompt: chunk end {frontier.chunk_end} of {num_tokens} tokens, "
            f"{frontier.num_layers} of {num_layers} layers"
        )
    ends = np.minimum(np.arange(1, num_blocks + 1, dtype=np.int64) * block_size, num_tokens)
    in_chunk = np.where(ends <= frontier.chunk_end, frontier.num_layers, 0)
    return np.where(ends <= frontier.done_tokens, num_layers, in_chunk).astype(np.int64)


class LayerwiseRead:
    """The consumer's progressive read of one offer (module docstring).

    Args:
        reader: the consumer's reader (its agent, storage, timeout).
        remote: the offer's block set (every block of the prompt).
        local_ids: the caller's blocks receiving offered blocks ``start ..``, in order; the
            caller owns them (allocates, registers or releases them, never this class).
        start: the first offered block to read (the ones before are held locally).
        num_tokens: the prompt's length.
    """

    def __init__(
        self,
        reader: RemoteReader,
        remote: RemoteBlockSet,
        local_ids: Sequence[int],
        *,
        start: int,
        num_tokens: int,
    ) -> None:
        layout = reader.storage.layout
        self._num_blocks = -(-num_tokens // layout.block_size)
        if start + len(local_ids) != self._num_blocks or len(remote.block_ids) < self._num_blocks:
            raise InvalidInput(
                f"{len(local_ids)} local blocks from block {start} for a prompt of "
                f"{self._num_blocks} blocks ({len(remote.block_ids)} offered)"
            )
        self._reader = reader
        self._remote = remote
        self._local_ids = list(local_ids)
        self._start = start
        self._num_tokens = num_tokens
        self._block_size = layout.block_size
        self._num_layers = layout.num_layers
        self._read = np.zeros(len(local_ids), dtype=np.int64)  # layers read (or posted)
        self._in_flight: list[Transfer] = []
        self.num_reads = 0
        """READs posted so far."""

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def complete(self) -> bool:
        """Every layer of every block read, and no transfer in flight."""
        return not self._in_flight and bool((self._read == self._num_layers).all())

    def advance(self, frontier: KvFrontier) -> None:
        """Post READs of what ``frontier`` made final and is not read yet; never waits.

        Raises:
            InvalidInput: the frontier is past the prompt.
            TransferError / ProtocolMismatch / LayoutMismatch: posting failed (what was in
                flight is cancelled first).
        """
        ready = layers_ready(
            frontier,
            num_tokens=self._num_tokens,
            block_size=self._block_size,
            num_layers=self._num_layers,
        )[self._start :]
        todo = ready > self._read
        if not todo.any():
            return
        ranges = np.stack([self._read[todo], ready[todo]], axis=1)
        indices = np.flatnonzero(todo)
        try:
            for first, end in np.unique(ranges, axis=0).tolist():
                group = indices[(ranges[:, 0] == first) & (ranges[:, 1] == end)]
                self._post(group, (first, end))
        except BaseException:
            self.cancel()
            raise
        self._read[todo] = ready[todo]

    def poll(self) -> bool:
        """Check the READs in flight without waiting; True when none is left.

        Raises:
            TransferError: one failed (every other one in flight is cancelled).
        """
        try:
            self._in_flight = [t for t in self._in_flight if not self._reader.poll(t)]
        except BaseException:
            self.cancel()
            raise
        return not self._in_flight

    def finish(self) -> None:
        """Read everything not read yet and wait for every READ, bounded by the reader's
        timeout in all.

        Raises:
            TransferTimeout: not done in time. TransferError: a READ failed. Either way
                nothing is left in flight.
        """
        self.advance(KvFrontier.complete(self._num_tokens))
        deadline = time.monotonic() + self._reader.timeout_s
        try:
            while self._in_flight:
                transfer = self._in_flight[0]
                self._reader.wait(transfer, max(0.0, deadline - time.monotonic()))
                self._in_flight.pop(0)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Release (cancel) every READ in flight; the blocks' bytes are then undefined."""
        in_flight, self._in_flight = self._in_flight, []
        for transfer in in_flight:
            self._reader.release(transfer)
        if in_flight:
            logger.debug("cancelled %d layer-wise READs in flight", len(in_flight))

    def _post(self, group: np.ndarray, layers: tuple[int, int]) -> None:
        offered = [self._start + int(i) for i in group]
        local = [self._local_ids[int(i)] for i in group]
        ids = tuple(self._remote.block_ids[i] for i in offered)
        wanted = dataclasses.replace(self._remote, block_ids=ids)
        transfer = self._reader.post(wanted, local, layers=layers)
        if transfer is not None:
            self._in_flight.append(transfer)
            self.num_reads += 1
