"""The prefill role: compute prompts for decode workers and hold their blocks until read.

Runs on the scheduler thread (it owns the engine and the manager). A ``PrefillRequest``::

    queued ──room in the pool──▶ prompt computed (prefix hits skip compute), full blocks
        registered ──offer_owned──▶ held ──TransferDone / Abort / decode left / hold timeout──▶
        released

Replies are pushed to the asking decode worker's signal client, in this order: a
``TokenChunk([first token], stats)`` with this worker's ``computed_tokens``, ``cached_tokens``
and ``prefill_ms`` (``BlocksReady`` has no stats field), then ``BlocksReady``. A layer-wise
handoff (the request ``wants_layerwise`` and this worker allows it, ``layerwise``) is held from
before the compute (its hold timeout counts from ``BlocksReady``, however long the compute;
a decode that left still frees it at once): ``KvStream`` (the blocks, held from now on), one
``KvLayers`` per layer as the engine writes it (``on_layer``: a frontier of the whole prompt as
one chunk after the cached prefix), then the same ``TokenChunk`` and ``BlocksReady``; a failure
after ``KvStream`` aborts the hold and answers ``ErrorReply``, and a decode that stops receiving
gets nothing more (its hold is aborted once the prompt is computed). A request that
cannot be served gets ``ErrorReply(request_id, code, message)`` instead: ``UNAVAILABLE`` (queue
full, prompt larger than the pool, or invalid), ``DEADLINE_EXCEEDED``, ``INTERNAL``. A prompt
larger than the pool is refused at once; one that fits waits, in order, until held blocks are
released.

Invariants: every queued request is answered exactly once (blocks or an error) unless aborted
(or its decode worker left); a request's blocks are held by its ``SequenceBlocks`` from compute
to release, and released exactly once, through ``PrefillHandoff`` (which owns it after the
offer). ``close`` releases everything held.

A decode worker that leaves the fleet (a LEFT from the worker directory the runtime wires to
``on_worker_change``: exact, no grace, so a killed decode leaves one lease TTL after its death)
gets nothing more: at the next ``step`` every handoff offered to it and every request it queued
before the LEFT was seen is dropped, the blocks released at once rather than at the hold
timeout, which stays the backstop for a decode whose record outlives it. A handoff belongs to
the peer that asked for it (the decode's signal identity, its worker id). ``on_worker_change``
runs on the directory's watch thread and only queues the departure (a ``SimpleQueue``, as the
scheduler's inbox takes messages from the signal thread); the scheduler thread applies it. A
decode that re-registers under the same id keeps what it asked for after its LEFT was seen.

While the worker drains (``Scheduler.drain``) nothing changes here: holds stay served until
read, aborted or past the hold timeout, and a ``PrefillRequest`` still arriving (from a decode
whose frontend had not seen the drain yet) is computed and offered, so no decode recomputes;
``num_in_flight`` is what the drain waits for.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fabric.discovery.registration import WorkerEvent, WorkerEventKind
from fabric.engine import Engine
from fabric.errors import FabricError
from fabric.kvbm import SequenceBlocks
from fabric.signal.errors import ErrorCode
from fabric.signal.framing import PeerId, wall_ms
from fabric.signal.messages import (
    ErrorReply,
    KvLayers,
    KvStream,
    Message,
    PrefillRequest,
    TokenChunk,
    TransferDone,
)
from fabric.worker.handoff import PrefillHandoff
from fabric.worker.metrics import ErrorKind, WorkerMetrics
from fabric.worker.outbox import Outbox
from fabric.worker.request import StatValue, check_fits, check_prompt, compute_prompt

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Queued:
    request: PrefillRequest
    peer: PeerId
    arrived_at: float
    submitted_at: float  # time.monotonic(), comparable with a departure's


class PrefillService:
    """The prefill worker's side of the handoff (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        handoff: PrefillHandoff,
        outbox: Outbox,
        metrics: WorkerMetrics,
        *,
        max_waiting: int,
        layerwise: bool = True,
    ) -> None:
        self._engine = engine
        self._layerwise = layerwise
        self._kvbm = engine.kvbm
        self._handoff = handoff
        self._outbox = outbox
        self._metrics = metrics
        # Read at scrape time: every path that ends a hold (read, abort, expiry) is counted.
        metrics.held_handoffs.set_function(lambda: handoff.num_held)
        self._max_waiting = max_waiting
        self._queue: deque[_Queued] = deque()
        self._blocked = False  # the queue head found no room; nothing was released since
        self._free_when_blocked = 0  # the pool's free blocks then: retry once more are free
        # Workers that left, with when the LEFT was seen: filled on the directory's thread.
        self._departures: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()

    @property
    def has_work(self) -> bool:
        """A queued request may be computable now."""
        return bool(self._queue) and not self._blocked

    @property
    def has_held(self) -> bool:
        """Blocks are held for decodes to read: the agent must be progressed (``step``)."""
        return self._handoff.num_held > 0

    @property
    def num_in_flight(self) -> int:
        """Prefills queued or computed and held for a decode that has not read them yet."""
        return len(self._queue) + self._handoff.num_held

    def retry_admission(self) -> None:
        """Blocks were freed outside a release (offload copies done): retry the head."""
        self._blocked = False

    def submit(self, request: PrefillRequest, peer: PeerId, arrived_at: float) -> None:
        self._metrics.requests.labels("prefill").inc()
        problem = check_prompt(request.token_ids, self._engine.config) or check_fits(
            len(request.token_ids), self._kvbm.block_size, self._kvbm.pool().num_blocks
        )
        if problem is None and len(self._queue) >= self._max_waiting:
            problem = f"{len(self._queue)} prefills already wait for blocks; try another worker"
        if problem is not None:
            self._reply_error(peer, request.request_id, ErrorCode.UNAVAILABLE, problem)
            return
        self._queue.append(_Queued(request, peer, arrived_at, time.monotonic()))
        self._metrics.waiting.set(len(self._queue))

    def complete(self, done: TransferDone) -> None:
        if not self._handoff.complete(done):
            logger.debug("TransferDone for %s: nothing held (aborted or expired)", done.request_id)
        self._released()

    def abort(self, request_id: str) -> None:
        for queued in self._queue:
            if queued.request.request_id == request_id:
                self._queue.remove(queued)
                break
        else:
            self._handoff.abort(request_id)
        logger.debug("prefill %s aborted", request_id)
        self._metrics.waiting.set(len(self._queue))
        self._released()

    def on_worker_change(self, event: WorkerEvent) -> None:
        """A ``WorkerDirectory`` ``on_change`` (any thread): queue a LEFT for the next ``step``."""
        if event.kind is WorkerEventKind.LEFT:
            self._departures.put((event.record.worker_id, time.monotonic()))

    def step(self) -> bool:
        """Drop the work of decode workers that left, then compute the oldest queued prefill if
        the pool has room; True when one was served. Progresses the agent for held reads."""
        self._drop_departed()
        self._handoff.progress()
        if not self._queue:
            return False
        if self._blocked and self._kvbm.pool().num_free <= self._free_when_blocked:
            return False  # nothing freed since the head found no room: a retry would re-onboard
        head = self._queue[0]
        request = head.request
        if 0 < request.deadline_ms <= wall_ms():
            self._queue.popleft()
            self._reply_error(
                head.peer, request.request_id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed"
            )
            return True
        seq = SequenceBlocks.open(
            self._kvbm, request.token_ids, on_registered=self._engine.on_registered
        )
        room = seq.reserve(len(request.token_ids))  # it fits: submit checked
        self._blocked = not room
        if not room:
            seq.release()  # wait until a decode acknowledges (or a handoff expires)
            self._free_when_blocked = self._kvbm.pool().num_free
            return False
        self._queue.popleft()
        self._metrics.waiting.set(len(self._queue))
        self._serve(head, seq)
        return True

    def expire(self) -> None:
        """Release handoffs no decode acknowledged within the hold timeout."""
        if self._handoff.expire(time.monotonic()):
            self._released()

    def fail_queued(self, message: str) -> None:
        """Answer every queued request with an error (offered blocks stay held for their reads)."""
        while self._queue:
            queued = self._queue.popleft()
            self._reply_error(queued.peer, queued.request.request_id, ErrorCode.INTERNAL, message)
        self._metrics.waiting.set(0)

    def close(self) -> None:
        """Refuse what is queued and release everything held (idempotent)."""
        self.fail_queued("the prefill worker is shutting down")
        self._handoff.close()
        self._released()

    def _released(self) -> None:
        self._blocked = False

    def _drop_departed(self) -> None:
        """Release the handoffs and drop the queued requests of every worker reported LEFT."""
        while True:
            try:
                worker_id, left_at = self._departures.get_nowait()
            except queue.Empty:
                return
            num_queued = len(self._queue)
            self._queue = deque(
                q for q in self._queue if q.peer != worker_id or q.submitted_at >= left_at
            )
            num_dropped = num_queued - len(self._queue)
            num_handoffs, num_blocks = self._handoff.abandon(worker_id, held_before=left_at)
            if not (num_dropped or num_handoffs):
                logger.debug("worker %s left; nothing held or queued for it", worker_id)
                continue
            logger.info(
                "decode worker %s left: released %d handoffs (%d blocks) held for it, dropped "
                "%d queued prefills",
                worker_id,
                num_handoffs,
                num_blocks,
                num_dropped,
            )
            self._metrics.waiting.set(len(self._queue))
            self._released()

    def _serve(self, queued: _Queued, seq: SequenceBlocks) -> None:
        request, peer = queued.request, queued.peer
        request_id, num_tokens = request.request_id, len(request.token_ids)
        num_cached = seq.num_computed
        block_ids = seq.block_table[: -(-num_tokens // self._kvbm.block_size)]
        layerwise = self._layerwise and request.wants_layerwise
        sender = None
        try:
            if layerwise:  # held from here: the handoff owns seq
                stream = self._handoff.stream_owned(
                    request_id,
                    block_ids,
                    seq,
                    num_tokens=num_tokens,
                    done_tokens=num_cached,
                    decode=peer,
                )
                sender = _LayerSender(self._push, self._handoff.progress, peer, stream)
                if not sender.delivered:  # the decode is gone: nobody will read
                    self._handoff.abort(request_id)
                    return
            token, num_computed, ms = compute_prompt(
                self._engine, seq, None if sender is None else sender.on_layer
            )
            if layerwise:
                ready = self._handoff.stream_ready(
                    request_id, block_ids, first_token=token, num_tokens=num_tokens
                )
            else:
                ready = self._handoff.offer_owned(
                    request_id,
                    block_ids,
                    seq,
                    first_token=token,
                    num_tokens=num_tokens,
                    decode=peer,
                )
        except FabricError as exc:
            if not (layerwise and self._handoff.abort(request_id)):
                seq.release()
            logger.warning("prefill %s failed: %s", request_id, exc, exc_info=True)
            self._reply_error(peer, request_id, ErrorCode.INTERNAL, str(exc))
            return
        self._metrics.computed_tokens.inc(num_computed)
        self._metrics.cached_tokens.inc(num_cached)
        stats: dict[str, StatValue] = {
            "computed_tokens": num_computed,
            "cached_tokens": num_cached,
            "prefill_ms": round(ms, 3),
        }
        logger.debug(
            "prefill %s: %d cached, %d computed in %.1f ms, %d blocks offered to %s%s",
            request_id,
            num_cached,
            num_computed,
            ms,
            len(block_ids),
            peer,
            " layer by layer" if layerwise else "",
        )
        chunk = TokenChunk(request_id, [token], False, "", stats)
        delivered = sender is None or sender.delivered
        # One hand-over to the signal thread for both: the decode needs them together.
        if not (delivered and ready and self._push(peer, chunk, ready)):
            self._handoff.abort(request_id)

    def _reply_error(self, peer: PeerId, request_id: str, code: ErrorCode, message: str) -> None:
        logger.info("prefill %s refused (%s): %s", request_id, code.name, message)
        self._metrics.errors.labels(ErrorKind.REFUSED.value).inc()
        self._push(peer, ErrorReply(request_id, code, message))

    def _push(self, peer: PeerId, *messages: Message) -> bool:
        try:
            self._outbox.send_all(peer, messages)
        except FabricError as exc:
            logger.warning("cannot reach decode %s: %s", peer, exc)
            return False
        return True


class _LayerSender:
    """Sends a layer-wise handoff's ``KvStream``, then one ``KvLayers`` per layer written
    (``Engine.step``'s ``on_layer``); after a failed push it sends nothing more (the decode
    is gone: the hold is aborted once the prompt is computed). Each layer also progresses the
    agent (``PrefillHandoff.progress``): over TCP the decode's READs of the layers announced
    move only while it is polled, and the scheduler loop does not poll during a forward."""

    def __init__(
        self,
        push: Callable[[PeerId, Message], bool],
        progress: Callable[[], None],
        peer: PeerId,
        stream: KvStream,
    ) -> None:
        self._push = push
        self._progress = progress
        self._peer = peer
        self._stream = stream
        self.delivered = push(peer, stream)

    def on_layer(self, layer: int) -> None:
        self._progress()
        if self.delivered:
            stream = self._stream
            frontier = KvLayers(stream.request_id, stream.done_tokens, stream.num_tokens, layer + 1)
            self.delivered = self._push(self._peer, frontier)
