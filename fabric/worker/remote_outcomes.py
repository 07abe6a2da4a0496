"""The decode side of a remote prefill's outcome: read the offer, or say why it was lost.

``RemoteOutcomes`` owns what happens between a ``PrefillRequest`` sent and the prompt's KV held
here: the prefills in flight (``remote_prefill.RemotePrefills``), the layer-wise reads in
flight (``streams.DecodeStreams``) and the whole-offer reads (``handoff.DecodeHandoff``).
``collect`` turns what arrived into one value per request that moved::

    RemoteProgress (KvStream / KvLayers) ──▶ begin / advance the layer-wise read (no value)
    RemoteReady (BlocksReady) ──▶ finish the layer-wise read, or read the whole offer
        ──▶ Read(gen, first_token): blocks committed, TransferDone sent, stats and trace set
    RemoteFailed, a failed READ, a read in flight that failed (polled) ──▶ Lost(gen, reason):
        nothing of it is in flight any more, its prefill worker was told (``Abort``)

The caller (``generation.GenerationService``) applies the value: start decoding, or the
fallback (recompute here or fail). ``collect`` is a generator and yields each value before it
looks at the next outcome, so a request the caller moved out of ``REMOTE_PREFILL`` is never
read afterwards (a later outcome for it is aborted).

Invariants: a request's READs write only into the blocks it reserved at admission; after a
``Lost`` or ``end`` nothing of it is in flight (its blocks may be recomputed into or released);
``kv_transfer_ms`` is the whole read (a layer-wise one from its first READ to its last) and
``kv_wait_ms`` the part after ``BlocksReady``. Runs on the scheduler thread (the agent's owner).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from fabric.engine import Engine
from fabric.errors import FabricError
from fabric.signal.kv_trace import KvSource
from fabric.signal.messages import KvStream
from fabric.worker.handoff import DecodeHandoff
from fabric.worker.metrics import WorkerMetrics
from fabric.worker.remote_prefill import (
    RemoteFailed,
    RemotePrefills,
    RemoteProgress,
    RemoteReady,
)
from fabric.worker.request import Phase, WorkerRequest
from fabric.worker.streams import DecodeStreams

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Read:
    """``gen``'s prompt KV is held here: decode from ``first_token``."""

    gen: WorkerRequest
    first_token: int


@dataclass(frozen=True, slots=True)
class Lost:
    """``gen``'s remote prefill failed (``reason``): apply the fallback."""

    gen: WorkerRequest
    reason: str


class RemoteOutcomes:
    """Remote prefills and their reads, for one decode or aggregated worker (module docstring)."""

    def __init__(
        self,
        engine: Engine,
        remote: RemotePrefills,
        handoff: DecodeHandoff,
        metrics: WorkerMetrics,
        *,
        worker_id: str,
        layerwise: bool,
        source: KvSource,
    ) -> None:
        self._kvbm = engine.kvbm
        self._remote = remote
        self._handoff = handoff
        self._streams = DecodeStreams(handoff)
        self._metrics = metrics
        self._worker_id = worker_id
        self._layerwise = layerwise  # ask prefill workers for layer-wise handoffs
        self._source = source  # what a read offer is in the KV trace

    @property
    def num_in_flight(self) -> int:
        return self._remote.num_in_flight

    def start(self, gen: WorkerRequest) -> str | None:
        """Ask ``gen``'s prefill worker for its prompt; None when sent, else why not."""
        worker_id = gen.request.prefill_worker
        request = gen.prefill_request(self._worker_id, layerwise=self._layerwise)
        problem = self._remote.start(request, worker_id)
        if problem is None:
            logger.debug("request %s: prefill sent to %s", gen.request_id, worker_id)
        return problem

    def collect(
        self, timeout_s: float, id_to_gen: Mapping[str, WorkerRequest]
    ) -> Iterator[Read | Lost]:
        """What arrived (waiting up to ``timeout_s``), one value per request that moved; the
        caller applies each before the next is made (module docstring)."""
        for outcome in self._remote.poll(timeout_s):
            gen = id_to_gen.get(outcome.request_id)
            if gen is None or gen.phase is not Phase.REMOTE_PREFILL:
                if not isinstance(outcome, RemoteFailed):
                    self._remote.abort(outcome.request_id, "ended", worker_id=outcome.worker_id)
                continue
            result: Read | Lost | None
            if isinstance(outcome, RemoteFailed):
                self._streams.cancel(gen.request_id)
                result = Lost(gen, outcome.reason)
            elif isinstance(outcome, RemoteProgress):
                result = self._on_progress(gen, outcome)
            else:
                result = self._read_offer(gen, outcome)
            if result is not None:
                yield result
        for request_id, exc in self._streams.poll():
            gen = id_to_gen.get(request_id)
            if gen is not None:
                yield self._read_failed(gen, exc, None)

    def end(self, request_id: str) -> None:
        """``request_id`` ended while its prefill was remote: cancel its READs (before its
        blocks go back to the pool) and tell its prefill worker."""
        self._streams.cancel(request_id)
        self._remote.abort(request_id, "request ended")

    def close(self) -> None:
        """Cancel every read and abort every prefill in flight (idempotent)."""
        self._streams.close()
        self._remote.close()

    def _on_progress(self, gen: WorkerRequest, progress: RemoteProgress) -> Lost | None:
        """A layer-wise handoff opened (``KvStream``) or moved (``KvLayers``): read what is new."""
        assert gen.seq is not None
        message = progress.message
        try:
            if isinstance(message, KvStream):
                start = self._local_start(gen)
                num_blocks = -(-len(gen.prompt) // self._kvbm.block_size)
                self._streams.begin(message, start, gen.seq.block_table[start:num_blocks])
            else:
                self._streams.advance(message)
        except FabricError as exc:
            return self._read_failed(gen, exc, progress.worker_id)
        return None

    def _read_failed(self, gen: WorkerRequest, exc: FabricError, worker_id: str | None) -> Lost:
        """Reading ``gen``'s offer failed: tell its prefill worker."""
        self._remote.abort(gen.request_id, "read failed", worker_id=worker_id)
        return Lost(gen, f"reading its blocks failed: {exc}")

    def _local_start(self, gen: WorkerRequest) -> int:
        """The first of ``gen``'s prompt blocks to read: those before are held here (a local
        prefix) or were just loaded from this host's node cache (the prefill stores its full
        blocks there too)."""
        assert gen.seq is not None
        start = gen.seq.num_cached_tokens // self._kvbm.block_size
        if self._kvbm.node_attached:
            hashes = self._kvbm.hash_tokens(gen.prompt).sequence_hashes
            start += self._kvbm.load_node_into(hashes[start:], gen.seq.block_table[start:])
        return start

    def _read_offer(self, gen: WorkerRequest, outcome: RemoteReady) -> Read | Lost:
        assert gen.seq is not None
        seq, ready = gen.seq, outcome.ready
        num_blocks = -(-len(gen.prompt) // self._kvbm.block_size)
        began = time.perf_counter()
        try:
            if ready.num_tokens != len(gen.prompt):
                raise FabricError(f"offer covers {ready.num_tokens} tokens, not the prompt's")
            streamed = self._streams.finish(ready)  # the rest of a layer-wise read
            if streamed is not None:
                start, gen.stats.kv_early_reads = streamed.start, streamed.num_early_reads
            else:  # a whole offer
                start = self._local_start(gen)
                if start < num_blocks:  # what this host's node cache lacks, over NIXL
                    self._handoff.read_into(ready, start, seq.block_table[start:num_blocks])
        except FabricError as exc:
            return self._read_failed(gen, exc, outcome.worker_id)
        stats = gen.stats
        stats.kv_wait_ms = (time.perf_counter() - began) * 1000
        stats.kv_transfer_ms = stats.kv_wait_ms if streamed is None else streamed.read_ms
        trace = gen.trace_cached()
        trace.add(KvSource.NODE, start * self._kvbm.block_size)
        trace.add(self._source, len(gen.prompt))
        seq.commit()
        self._remote.done(outcome, num_blocks)
        stats.record_offer(outcome.stats, outcome.worker_id, len(gen.prompt), num_blocks - start)
        self._metrics.transferred_blocks.inc(num_blocks - start)
        self._metrics.cached_tokens.inc(stats.cached_tokens)
        logger.debug(
            "request %s: read %d blocks from %s in %.2f ms, %.2f ms of it after the offer (%d "
            "held here or in the node cache)",
            gen.request_id,
            num_blocks - start,
            outcome.worker_id,
            stats.kv_transfer_ms,
            stats.kv_wait_ms,
            start,
        )
        return Read(gen, ready.first_token)
