"""The decode and aggregated roles: prefill admitted requests, decode them in one batch.

Runs on the scheduler thread, which owns the engine, the manager, the prefill links and the
decode handoff. Admission (the waiting queue, where each prompt is computed) is
``admission.Admission``'s; this module runs what it admits. One ``step``:

1. collect remote prefill outcomes (``remote_outcomes.RemoteOutcomes``: it reads the offered
   blocks this worker lacks into the blocks reserved at admission, layer by layer as
   ``KvLayers`` arrive when ``layerwise`` asked for it, and sends ``TransferDone``): stream the
   first token of a prompt read; or, when the prefill worker or the read failed, queue the
   prompt to be computed here (``PrefillFallback.RECOMPUTE``) or end the request with an error
   chunk (``FAIL``);
2. admit waiting requests in arrival order while the device pool has room for all of a
   request's blocks (prompt + ``max_tokens - 1``): send it to its prefill worker, or queue its
   prompt to be computed here while this step's token budget has room;
3. one engine ``step`` (a single forward call) over every decoding request (continuous
   batching) and the prompt chunks the budget allows, streaming each new token as a
   ``TokenChunk`` and each finished prompt's first token; finished requests release their
   blocks;
4. end requests past their deadline.

Chunked prefill (``max_num_batched_tokens``, as vLLM v1 schedules in effect; here decodes go
first strictly): a step holds at most that many new tokens. Decodes come first (one token each,
never held back); the prompts being computed here fill the rest, in admission order, each with
as many of its remaining positions as fit, so a long prompt is prefilled over several steps and
every running decode gets a token at each of them instead of waiting for the whole prompt. A
chunk's full blocks are registered (hashed, offloadable, announced) as soon as the step
computed them, never before. A new local prompt is admitted only while the step has budget
left. With no budget (``None``), each prompt is computed whole in one step, at most one new
prompt per step, beside the step's decodes.

Each request's KV trace (``RequestStats.kv_trace``) is set where its prompt's source is decided:
the cached prefix and ``recompute`` when its prompt is queued here (also after a fallback), the
cached prefix, ``node`` and ``remote_source`` (``prefill`` on a decode worker, ``peer`` on an
aggregated one) when an offer was read.

Aggregated workers compute a prompt here unless ``prefill_worker`` names another worker: that
is a peer hit (the router saw that peer hold a longer cached prefix), read like a remote
prefill, with the same fallback. Only the blocks this worker lacks are read. A request the pool
can never hold, an invalid one, or one arriving at a full queue gets a final error chunk at
once; a client whose chunks cannot be delivered is treated as gone (its request is released).
``Abort`` ends a request in any phase with a final error chunk ("aborted: ...") and releases its
blocks here and, through ``Abort``, on its prefill worker.

Invariants: every request ends with exactly one final chunk (unless its client is gone) and,
when it ends, holds no block; ``_id_to_gen`` holds exactly the requests not yet ended, each in
the structure of its phase (waiting ones in the admission queue, PREFILLING ones in
``_prefilling`` with ``seq.num_computed`` the positions computed so far, DECODING ones in
``_decoding``); a step never holds more than the budget's new tokens plus its decodes.
"""

from __future__ import annotations

import logging
import time

from fabric.config import PrefillFallback
from fabric.engine import DecodeRequest, Engine, PrefillChunk, greedy
from fabric.errors import ConfigError, FabricError
from fabric.signal.framing import PeerId, wall_ms
from fabric.signal.kv_trace import KvSource
from fabric.signal.messages import GenerateRequest, TokenChunk
from fabric.worker.admission import Admission
from fabric.worker.handoff import DecodeHandoff
from fabric.worker.metrics import ErrorKind, WorkerMetrics
from fabric.worker.outbox import Outbox
from fabric.worker.remote_outcomes import Read, RemoteOutcomes
from fabric.worker.remote_prefill import RemotePrefills
from fabric.worker.request import FinishReason, Phase, WorkerRequest, error_chunk

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
        max_num_batched_tokens: int | None = None,
        layerwise: bool = False,
        remote_source: KvSource = KvSource.PREFILL,
    ) -> None:
        if (remote is None) != (handoff is None):
            raise ValueError("remote prefills need a decode handoff, and the reverse")
        if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens={max_num_batched_tokens}: give at least 1 token, or "
                "None for whole-prompt prefills"
            )
        self._engine = engine
        self._kvbm = engine.kvbm
        self._outbox = outbox
        self._metrics = metrics
        self._worker_id = worker_id
        self._admission = Admission(
            engine, worker_id=worker_id, max_waiting=max_waiting, remote_prefills=remote is not None
        )
        self._remote = (
            None
            if remote is None or handoff is None
            else RemoteOutcomes(
                engine,
                remote,
                handoff,
                metrics,
                worker_id=worker_id,
                layerwise=layerwise,
                source=remote_source,
            )
        )
        self._fallback = fallback
        self._budget = max_num_batched_tokens
        self._id_to_gen: dict[str, WorkerRequest] = {}
        self._prefilling: dict[str, WorkerRequest] = {}  # admission order
        self._decoding: dict[str, WorkerRequest] = {}

    @property
    def has_local_work(self) -> bool:
        """Something to compute now (decodes, prompt chunks, or an admissible waiting request)."""
        return bool(self._decoding) or bool(self._prefilling) or self._admission.has_work

    @property
    def num_requests(self) -> int:
        """Requests accepted and not ended yet (waiting, prefilling or decoding)."""
        return len(self._id_to_gen)

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
        self._compute_step()
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
        num_new_local = 0
        while True:
            room = self._has_room_for_a_prompt(num_new_local)
            gen = self._admission.admit_next(local_budget=1 if room else 0)
            if gen is None:
                return
            if gen.phase is Phase.REMOTE_PREFILL and self._start_remote(gen):
                continue
            num_new_local += 1
            self._start_prefill(gen)

    def _has_room_for_a_prompt(self, num_new_local: int) -> bool:
        """Whether this step may start computing one more prompt here."""
        if self._budget is None:
            return num_new_local == 0
        return self._budget - len(self._decoding) - self._num_prefill_tokens_left() > 0

    def _num_prefill_tokens_left(self) -> int:
        total = 0
        for gen in self._prefilling.values():
            assert gen.seq is not None
            total += len(gen.seq.tokens) - gen.seq.num_computed
        return total

    def _start_remote(self, gen: WorkerRequest) -> bool:
        """Ask the request's prefill worker; False when the prompt is to be computed here."""
        assert self._remote is not None
        problem = self._remote.start(gen)
        return problem is None or not self._prefill_failed(gen, problem)

    def _collect_remote(self, timeout_s: float) -> None:
        """Apply what the remote prefills brought (``remote_outcomes``): decode a prompt read,
        or the fallback for one lost."""
        assert self._remote is not None
        for result in self._remote.collect(timeout_s, self._id_to_gen):
            if isinstance(result, Read):
                self._start_decoding(result.gen, result.first_token)
            elif self._prefill_failed(result.gen, result.reason):
                self._start_prefill(result.gen)

    def _prefill_failed(self, gen: WorkerRequest, reason: str) -> bool:
        """Apply the fallback; True when the prompt is to be computed here."""
        if self._fallback is PrefillFallback.RECOMPUTE:
            logger.warning("request %s: %s; recomputing the prompt here", gen.request_id, reason)
            gen.stats.fallback = reason
            self._metrics.fallbacks.inc()
            return True
        logger.warning("request %s: %s", gen.request_id, reason)
        self._fail(gen, f"prefill failed: {reason}", ErrorKind.PREFILL_FAILED)
        return False

    def _start_prefill(self, gen: WorkerRequest) -> None:
        """Queue ``gen``'s prompt to be computed here, chunk by chunk, from its cached prefix."""
        assert gen.seq is not None
        gen.phase = Phase.PREFILLING
        num_cached = gen.seq.num_computed
        gen.trace_cached().add(KvSource.RECOMPUTE, len(gen.prompt))
        gen.stats.cached_tokens = num_cached
        gen.stats.computed_tokens = len(gen.prompt) - num_cached
        self._metrics.computed_tokens.inc(len(gen.prompt) - num_cached)
        self._metrics.cached_tokens.inc(num_cached)
        self._prefilling[gen.request_id] = gen

    def _start_decoding(self, gen: WorkerRequest, first_token: int) -> None:
        gen.phase = Phase.DECODING
        gen.stats.ttft_ms = (time.perf_counter() - gen.arrived_at) * 1000
        self._decoding[gen.request_id] = gen
        self._emit(gen, first_token)

    def _schedule_chunks(self, num_decodes: int) -> list[tuple[WorkerRequest, int, int]]:
        """``(request, start, end)`` of this step's prompt chunks: the budget left after
        ``num_decodes`` decodes, given to the prompts in admission order."""
        left = None if self._budget is None else self._budget - num_decodes
        chunks = []
        for gen in self._prefilling.values():
            assert gen.seq is not None
            start, end = gen.seq.num_computed, len(gen.seq.tokens)
            if left is not None:
                if left <= 0:
                    break
                end = min(end, start + left)
                left -= end - start
            chunks.append((gen, start, end))
        return chunks

    def _compute_step(self) -> None:
        """One engine step: every decode, then the prompt chunks the budget allows."""
        decoding = list(self._decoding.values())
        chunks = self._schedule_chunks(len(decoding))
        if not decoding and not chunks:
            return
        decodes = []
        for gen in decoding:
            assert gen.seq is not None
            decodes.append(DecodeRequest(gen.next_token, gen.seq.block_table, len(gen.seq.tokens)))
            gen.seq.append(gen.next_token)
        now = time.perf_counter()
        prompt_chunks = []
        for gen, start, end in chunks:
            assert gen.seq is not None
            prompt_chunks.append(
                PrefillChunk(gen.seq.tokens[start:end], gen.seq.block_table, start)
            )
            if gen.prefill_began is None:
                gen.prefill_began = now
        try:
            logits = self._engine.step(decodes, prompt_chunks)
        except FabricError as exc:
            for gen in [*decoding, *(chunk[0] for chunk in chunks)]:
                self._fail(gen, f"compute failed: {exc}", ErrorKind.INTERNAL)
            return
        rows = greedy(logits)
        if decodes:
            self._metrics.decode_steps.inc()
            self._metrics.decode_tokens.inc(len(decodes))
        self._metrics.prefill_chunks.inc(len(chunks))
        for gen in decoding:
            assert gen.seq is not None
            gen.seq.commit()
        finished = []
        for (gen, _, end), token in zip(chunks, rows[len(decodes) :], strict=True):
            assert gen.seq is not None
            gen.seq.commit(end)
            if end == len(gen.prompt):
                finished.append((gen, token))
        for gen, token in zip(decoding, rows[: len(decodes)], strict=True):
            self._emit(gen, token)
        done = time.perf_counter()
        for gen, token in finished:
            del self._prefilling[gen.request_id]
            gen.stats.prefill_ms = (done - (gen.prefill_began or now)) * 1000
            self._start_decoding(gen, token)

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
            self._remote.end(gen.request_id)  # before its blocks go back to the pool
        self._prefilling.pop(gen.request_id, None)
        self._decoding.pop(gen.request_id, None)
        if gen.seq is not None:
            gen.seq.release()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.waiting.set(len(self._admission))
        self._metrics.active.set(len(self._id_to_gen) - len(self._admission))
