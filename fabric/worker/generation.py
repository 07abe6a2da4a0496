"""The decode and aggregated roles: prefill admitted requests, decode them in one batch.

Runs on the scheduler thread, which owns the engine, the manager, the prefill links and the
decode handoff. Admission (the waiting queue, where each prompt is computed) is
``admission.Admission``'s; this module runs what it admits. One ``step``:

1. collect remote prefill outcomes: read the offered blocks this worker lacks into the blocks
   reserved at admission, register them, ``TransferDone``, stream the first token; or, when the
   prefill worker failed, recompute the prompt here (``PrefillFallback.RECOMPUTE``) or end the
   request with an error chunk (``FAIL``);
2. admit waiting requests in arrival order while the device pool has room for all of a
   request's blocks (prompt + ``max_tokens - 1``): send it to its prefill worker, or compute its
   prompt here (at most one local prompt per step, so running requests keep decoding);
3. one ``decode_step`` over every decoding request (continuous batching), streaming each new
   token as a ``TokenChunk``; finished requests release their blocks;
4. end requests past their deadline.

Aggregated workers compute a prompt here unless ``prefill_worker`` names another worker: that
is a peer hit (the router saw that peer hold a longer cached prefix), read like a remote
prefill, with the same fallback. Only the blocks this worker lacks are read. A request the pool
can never hold, an invalid one, or one arriving at a full queue gets a final error chunk at
once; a client whose chunks cannot be delivered is treated as gone (its request is released).
``Abort`` ends a request in any phase with a final error chunk ("aborted: ...") and releases its
blocks here and, through ``Abort``, on its prefill worker.

Invariants: every request ends with exactly one final chunk (unless its client is gone) and,
when it ends, holds no block; ``_id_to_gen`` holds exactly the requests not yet ended, each in
the structure of its phase (waiting ones in the admission queue).
"""

from __future__ import annotations

import logging
import time

from fabric.config import PrefillFallback
from fabric.engine import DecodeRequest, Engine, greedy
from fabric.errors import FabricError
from fabric.signal.framing import PeerId, wall_ms
from fabric.signal.messages import GenerateRequest, TokenChunk
from fabric.worker.admission import Admission
from fabric.worker.handoff import DecodeHandoff
from fabric.worker.metrics import ErrorKind, WorkerMetrics
from fabric.worker.outbox import Outbox
from fabric.worker.remote_prefill import RemoteFailed, RemotePrefills, RemoteReady
from fabric.worker.request import (
    FinishReason,
    Phase,
    WorkerRequest,
    compute_prompt,
    error_chunk,
)

logger = logging.getLogger(__name__)


class GenerationService:
    """Serves ``GenerateRequest``s (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        outbox: Outbox,
        metrics: WorkerMetrics,
        *,
        worker_id: str,
        max_waiting: int,
        remote: RemotePrefills | None = None,
        handoff: DecodeHandoff | None = None,
        fallback: PrefillFallback = PrefillFallback.RECOMPUTE,
    ) -> None:
        if (remote is None) != (handoff is None):
            raise ValueError("remote prefills need a decode handoff, and the reverse")
        self._engine = engine
        self._kvbm = engine.kvbm
        self._outbox = outbox
        self._metrics = metrics
        self._worker_id = worker_id
        self._admission = Admission(
            engine, worker_id=worker_id, max_waiting=max_waiting, remote_prefills=remote is not None
        )
        self._remote = remote
        self._handoff = handoff
        self._fallback = fallback
        self._id_to_gen: dict[str, WorkerRequest] = {}
        self._decoding: dict[str, WorkerRequest] = {}

    @property
    def has_local_work(self) -> bool:
        """Something to compute now (decode steps, or an admissible waiting request)."""
        return bool(self._decoding) or self._admission.has_work

    @property
    def has_remote_work(self) -> bool:
        return self._remote is not None and self._remote.num_in_flight > 0

    def retry_admission(self) -> None:
        """Blocks were freed outside a request's end (offload copies done): retry the head."""
        self._admission.retry()

    def submit(self, request: GenerateRequest, peer: PeerId, arrived_at: float) -> None:
        self._metrics.requests.labels("generate").inc()
        queued = self._admission.submit(
            request, peer, arrived_at, known=request.request_id in self._id_to_gen
        )
        if isinstance(queued, str):
            self._refuse(peer, error_chunk(request.request_id, queued))
            return
        self._id_to_gen[request.request_id] = queued
        self._update_gauges()

    def abort(self, request_id: str, reason: str) -> None:
        gen = self._id_to_gen.get(request_id)
        if gen is None:
            logger.debug("abort of unknown request %s (already ended?)", request_id)
            return
        self._fail(gen, f"aborted: {reason or 'by the client'}", ErrorKind.ABORTED)

    def step(self, poll_timeout_s: float) -> None:
        """One scheduler iteration (module docstring); waits up to ``poll_timeout_s`` for remote
        prefill outcomes when prefills are in flight."""
        if self.has_remote_work:
            self._collect_remote(poll_timeout_s)
        self._admit()
        self._decode_step()
        self._end_expired(wall_ms())
        self._update_gauges()

    def close(self) -> None:
        """End every request with an error chunk and release its blocks (idempotent)."""
        for gen in list(self._id_to_gen.values()):
            self._fail(gen, "the worker is shutting down", ErrorKind.SHUTDOWN)
        if self._remote is not None:
            self._remote.close()

    def fail_all(self, message: str) -> None:
        """End every request after an unexpected failure of the step (the worker goes on)."""
        for gen in list(self._id_to_gen.values()):
            self._fail(gen, message, ErrorKind.INTERNAL)

    # -- phases --------------------------------------------------------------------------------

    def _admit(self) -> None:
        local_budget = 1
        while (gen := self._admission.admit_next(local_budget=local_budget)) is not None:
            if gen.phase is Phase.REMOTE_PREFILL and self._start_remote(gen):
                continue
            local_budget -= 1
            self._prefill_here(gen)

    def _start_remote(self, gen: WorkerRequest) -> bool:
        """Ask the request's prefill worker; False when the prompt is to be computed here."""
        assert self._remote is not None
        worker_id = gen.request.prefill_worker
        problem = self._remote.start(gen.prefill_request(self._worker_id), worker_id)
        if problem is None:
            logger.debug("request %s: prefill sent to %s", gen.request_id, worker_id)
            return True
        return not self._prefill_failed(gen, problem)

    def _collect_remote(self, timeout_s: float) -> None:
        assert self._remote is not None
        for outcome in self._remote.poll(timeout_s):
            gen = self._id_to_gen.get(outcome.request_id)
            if gen is None or gen.phase is not Phase.REMOTE_PREFILL:
                if isinstance(outcome, RemoteReady):
                    self._remote.abort(outcome.request_id, "ended", worker_id=outcome.worker_id)
                continue
            if isinstance(outcome, RemoteFailed):
                if self._prefill_failed(gen, outcome.reason):
                    self._prefill_here(gen)
            else:
                self._read_offer(gen, outcome)

    def _read_offer(self, gen: WorkerRequest, outcome: RemoteReady) -> None:
        assert self._remote is not None and self._handoff is not None and gen.seq is not None
        seq, ready = gen.seq, outcome.ready
        num_blocks = -(-len(gen.prompt) // self._kvbm.block_size)
        start = seq.num_cached_tokens // self._kvbm.block_size
        began = time.perf_counter()
        try:
            if ready.num_tokens != len(gen.prompt):
                raise FabricError(f"offer covers {ready.num_tokens} tokens, not the prompt's")
            self._handoff.read_into(ready, start, seq.block_table[start:num_blocks])
        except FabricError as exc:
            self._remote.abort(gen.request_id, "read failed", worker_id=outcome.worker_id)
            if self._prefill_failed(gen, f"reading its blocks failed: {exc}"):
                self._prefill_here(gen)
            return
        stats = gen.stats
        stats.kv_transfer_ms = (time.perf_counter() - began) * 1000
        seq.commit()
        self._remote.done(outcome, num_blocks)
        computed = outcome.stats.get("computed_tokens", 0)
        stats.computed_tokens = computed if isinstance(computed, int) else 0
        stats.cached_tokens = len(gen.prompt) - stats.computed_tokens
        prefill_ms = outcome.stats.get("prefill_ms", 0.0)
        stats.prefill_ms = float(prefill_ms) if isinstance(prefill_ms, int | float) else 0.0
        stats.prefill_worker = outcome.worker_id
        stats.transferred_blocks = num_blocks - start
        self._metrics.transferred_blocks.inc(num_blocks - start)
        self._metrics.cached_tokens.inc(stats.cached_tokens)
        logger.debug(
            "request %s: read %d blocks from %s in %.2f ms (%d held here)",
            gen.request_id,
            num_blocks - start,
            outcome.worker_id,
            stats.kv_transfer_ms,
            start,
        )
        self._start_decoding(gen, ready.first_token)

    def _prefill_failed(self, gen: WorkerRequest, reason: str) -> bool:
        """Apply the fallback; True when the prompt is to be computed here."""
        if self._fallback is PrefillFallback.RECOMPUTE:
            logger.warning("request %s: %s; recomputing the prompt here", gen.request_id, reason)
            gen.stats.fallback = reason
            gen.phase = Phase.PREFILLING
            self._metrics.fallbacks.inc()
            return True
        logger.warning("request %s: %s", gen.request_id, reason)
        self._fail(gen, f"prefill failed: {reason}", ErrorKind.PREFILL_FAILED)
        return False

    def _prefill_here(self, gen: WorkerRequest) -> None:
        assert gen.seq is not None
        try:
            token, computed, ms = compute_prompt(self._engine, gen.seq)
        except FabricError as exc:
            self._fail(gen, f"prompt compute failed: {exc}", ErrorKind.INTERNAL)
            return
        gen.stats.computed_tokens = computed
        gen.stats.cached_tokens = len(gen.prompt) - computed
        gen.stats.prefill_ms = ms
        self._metrics.computed_tokens.inc(computed)
        self._metrics.cached_tokens.inc(len(gen.prompt) - computed)
        self._start_decoding(gen, token)

    def _start_decoding(self, gen: WorkerRequest, first_token: int) -> None:
        gen.phase = Phase.DECODING
        gen.stats.ttft_ms = (time.perf_counter() - gen.arrived_at) * 1000
        self._decoding[gen.request_id] = gen
        self._emit(gen, first_token)

    def _decode_step(self) -> None:
        if not self._decoding:
            return
        gens = list(self._decoding.values())
        batch = []
        for gen in gens:
            assert gen.seq is not None
            batch.append(DecodeRequest(gen.next_token, gen.seq.block_table, len(gen.seq.tokens)))
            gen.seq.append(gen.next_token)
        logits = self._engine.decode_step(batch)
        self._metrics.decode_steps.inc()
        self._metrics.decode_tokens.inc(len(batch))
        for gen in gens:
            assert gen.seq is not None
            gen.seq.commit()
        for gen, token in zip(gens, greedy(logits), strict=True):
            self._emit(gen, token)

    def _emit(self, gen: WorkerRequest, token: int) -> None:
        """Stream ``token``; end the request when it was the last one."""
        gen.num_generated += 1
        gen.next_token = token
        finish = None
        if token == gen.stop_token:
            finish = FinishReason.STOP
        elif gen.num_generated >= gen.request.max_tokens:
            finish = FinishReason.LENGTH
        if not self._push(gen, gen.chunk([token], finish)):
            return
        self._metrics.generated_tokens.inc()
        if finish is not None:
            self._metrics.finished.labels(finish.value).inc()
            logger.debug(
                "request %s finished (%s): %d tokens, ttft %.1f ms",
                gen.request_id,
                finish.value,
                gen.num_generated,
                gen.stats.ttft_ms,
            )
            self._end(gen)

    def _end_expired(self, now_ms: int) -> None:
        for gen in [g for g in self._id_to_gen.values() if g.expired(now_ms)]:
            self._fail(gen, "deadline exceeded", ErrorKind.REFUSED)

    # -- endings -------------------------------------------------------------------------------

    def _fail(self, gen: WorkerRequest, message: str, kind: ErrorKind) -> None:
        """End ``gen`` with an error chunk (best effort) and release it."""
        logger.info("request %s ended: %s", gen.request_id, message)
        self._metrics.record_error(kind)
        try:
            self._outbox.send(gen.peer, gen.error_chunk(message))
        except FabricError as exc:
            logger.debug("error chunk of %s not delivered: %s", gen.request_id, exc)
        self._end(gen)

    def _push(self, gen: WorkerRequest, chunk: TokenChunk) -> bool:
        """Send ``chunk``; on failure the client is gone: end the request and return False."""
        try:
            self._outbox.send(gen.peer, chunk)
        except FabricError as exc:
            logger.warning("request %s: client %s is gone (%s)", gen.request_id, gen.peer, exc)
            self._metrics.record_error(ErrorKind.DISCONNECTED)
            self._end(gen)
            return False
        return True

    def _refuse(self, peer: PeerId, chunk: TokenChunk) -> None:
        logger.info("request %s refused: %s", chunk.request_id, chunk.stats.get("error"))
        self._metrics.record_error(ErrorKind.REFUSED)
        try:
            self._outbox.send(peer, chunk)
        except FabricError as exc:
            logger.debug("refusal of %s not delivered: %s", chunk.request_id, exc)

    def _end(self, gen: WorkerRequest) -> None:
        """Forget ``gen`` and release its blocks here and on its prefill worker."""
        if self._id_to_gen.pop(gen.request_id, None) is None:
            return
        self._admission.retry()  # blocks may have been freed: the queue head may fit now
        if gen.phase is Phase.WAITING:
            self._admission.remove(gen)
        elif gen.phase is Phase.REMOTE_PREFILL and self._remote is not None:
            self._remote.abort(gen.request_id, "request ended")
        self._decoding.pop(gen.request_id, None)
        if gen.seq is not None:
            gen.seq.release()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.waiting.set(len(self._admission))
        self._metrics.active.set(len(self._id_to_gen) - len(self._admission))
